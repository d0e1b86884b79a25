#!/usr/bin/env bash
# The three recovered 192-value splits (and their conversions) against the original: agreement on 100 held-out chat
# prompts, held-out Wikipedia perplexity, ARC-Easy and SciQ (100 items each).
set -euo pipefail
cd /work/main
SRC=$HOME/.cache/mha2mla/models/SmolLM2-135M-Instruct
m() { ls -d /tmp/split/$1/*/$2; }
.venv/bin/mha2mla eval original=$SRC \
    r16-d48=$(m r16-d48 mha2mla-recovered) r32-d32=$(m r32-d32 mha2mla-recovered) r48-d16=$(m r48-d16 mha2mla-recovered) \
    r16-d48-converted=$(m r16-d48 mha2mla-model) r48-d16-converted=$(m r48-d16 mha2mla-model) \
    --tasks agreement,wikipedia,arc_easy,sciq --limit 100 --dtype float32 --output /tmp/split/eval 2>&1 | tail -25

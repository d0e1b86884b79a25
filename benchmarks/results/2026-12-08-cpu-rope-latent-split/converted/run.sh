#!/usr/bin/env bash
# Where conversion alone loses the original's behaviour: SmolLM2-135M-Instruct converted at 2-norm rope_dim 32
# (the 192-value recipe) with d_kv 32/64/96, and rope_dim 64 (full RoPE) with d_kv 64, no recovery.
set -euo pipefail
cd /work/main
SRC=$HOME/.cache/mha2mla/models/SmolLM2-135M-Instruct
OUT=/tmp/study
for spec in "32 32" "32 64" "32 96" "64 64"; do
  set -- $spec
  dst=$OUT/r$1-d$2
  [ -f $dst/config.json ] || /usr/bin/time -f "convert r$1-d$2 %e s" .venv/bin/mha2mla convert "$SRC" "$dst" \
      --rope-dim $1 --d-kv $2 --strategy 2-norm --svd aw-joint --layout exact --dtype float32 2>&1 | tail -3
done
/usr/bin/time -f "eval %e s" .venv/bin/mha2mla eval original=$SRC r64-d64=$OUT/r64-d64 r32-d96=$OUT/r32-d96 \
    r32-d64=$OUT/r32-d64 r32-d32=$OUT/r32-d32 --tasks agreement,wikipedia,arc_easy,sciq --limit 100 \
    --dtype float32 --output $OUT/eval 2>&1 | tail -30

#!/usr/bin/env bash
# The 192-value cache split three ways between rotary dims and latent (per kv-head: rope + d_kv = 64), each through
# the demo's whole recipe (convert, ~35 teacher chats, local stage, 40K-token global stage).
set -uo pipefail
cd /work/main
for spec in "16 48" "48 16" "32 32"; do
  set -- $spec
  /usr/bin/time -f "demo r$1-d$2 %e s" .venv/bin/mha2mla demo --rope-dim $1 --d-kv $2 --out /tmp/split/r$1-d$2 \
      > /tmp/split/r$1-d$2.log 2>&1
  tail -1 /tmp/split/r$1-d$2.log
done

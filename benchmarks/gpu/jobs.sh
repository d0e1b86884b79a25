#!/usr/bin/env bash
# Jobs on the lent GPU: recovery fine-tuning of SmolLM2-135M-Instruct, `mha2mla bench`, and any benchmark
# module with vLLM on the path. The machine is staged first (benchmarks/gpu/staging.sh: what travels, in
# which call); every call runs `bash benchmarks/gpu/staging.sh stage && bash benchmarks/gpu/jobs.sh MODE ...`.
#
#   run NAME ROPE DKV [finetune args]   convert the dequantised GGUF (2-norm + activation-aware joint SVD, exact
#                                       layout, calibrated on the default corpus), run `mha2mla finetune` and copy
#                                       the report and the plot into $OUT (COLLECT_WEIGHTS=1: also the trained
#                                       attention weights, bf16, for serving the result elsewhere)
#   ddp TOKENS [finetune args]          training throughput on 1 GPU, then on every GPU through torchrun
#   convert NAME ROPE DKV [STRATEGY]    only the conversion (cached per machine under /root/w; rotary pairs by
#                                       STRATEGY, default 2-norm)
#   profile-random NAME ROPE DKV [...]  benchmarks.studies.train_step_profile on SmolLM2's shape, random weights
#                                       (needs only c0)
#   profile NAME ROPE DKV [...]         the same on the real model's conversion
#   serve OUTNAME NAME [NAME ...]       benchmarks.end_to_end.recovered_serving: the original, the conversions and
#                                       the recovered runs in vLLM
#   bench [mha2mla bench args]          needs only c2..c4: `mha2mla bench` over every GPU of the machine into
#                                       /root/bench (rows of later calls in the same lease merge into its
#                                       summary.json); copies summary.json, summary.md and a tarball of the tools'
#                                       logs and JSON into $OUT. BENCH_SECONDS (default 540) bounds the whole mode
#                                       from the script's start (keep it ~40 s under the call's limit: the copy-out
#                                       comes after).
#   script MODULE [args]                a benchmark module (python -m MODULE, e.g. benchmarks.kernels.decode_tiles)
#                                       with vLLM and this package on the path (needs c2..c4)
set -euo pipefail
MODE=${1:?usage: jobs.sh run|ddp|convert|profile-random|profile|serve|bench|script ...}
shift
source "$(dirname "${BASH_SOURCE[0]}")/staging.sh"

convert() {  # NAME ROPE DKV [STRATEGY] -> /root/w/mla-rROPE-dDKV[-STRATEGY] (cached per machine)
  local strategy=${4:-2-norm}
  local mla=/root/w/mla-r$2-d$3  # shared by every run at this size: one conversion, one starting point
  [ "$strategy" = 2-norm ] || mla=$mla-$strategy
  mkdir -p /root/w
  [ -f "$mla/config.json" ] || python3 -m conversion.cli convert "$MODEL" "$mla" --rope-dim "$2" --d-kv "$3" \
    --strategy "$strategy" --svd aw-joint --layout exact --calib-tokens 16384 > /root/w/$1-convert.log
  echo "$mla"
}

collect() {  # NAME DST: the report, the plot (and with COLLECT_WEIGHTS=1 the attention weights, bf16, <= 16 MB a file)
  mkdir -p "$OUT"
  cp "$2/finetune_report.json" "$OUT/$1-finetune_report.json"
  cp "$2/loss.png" "$OUT/$1-loss.png"
  [ "${COLLECT_WEIGHTS:-0}" = 1 ] || return 0
  python3 - "$2" "$OUT/$1" <<'PY'
import sys, torch
from safetensors.torch import load_file, save_file
from pathlib import Path
state = {}
for f in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    state.update({k: v for k, v in load_file(str(f)).items() if ".self_attn." in k})
layers = sorted({int(k.split(".")[2]) for k in state})
for part, start in enumerate(range(0, len(layers), 8)):
    keep = {k: v.to(torch.bfloat16).contiguous() for k, v in state.items() if start <= int(k.split(".")[2]) < start + 8}
    save_file(keep, f"{sys.argv[2]}-attn{part}.safetensors")
PY
}

case $MODE in
  run)
    NAME=$1; ROPE=$2; DKV=$3; shift 3
    prepare
    case " $* " in *" --synthesize "*|*" --stage onpolicy "*|*" --stage all "*) vllm_env ;; esac  # they sample in vLLM
    MLA=$(convert "$NAME" "$ROPE" "$DKV")
    rm -rf "/root/w/$NAME-ft" "/root/w/.$NAME-ft.train"
    python3 -m vllm_mha2mla.tools.cli finetune "$MLA" "/root/w/$NAME-ft" --teacher "$MODEL" "$@" 2>&1 \
      | grep -v -E "it/s\]$|s/it\]$" | tee /root/w/$NAME-finetune.log | tail -40
    collect "$NAME" "/root/w/$NAME-ft"
    ;;
  ddp)  # TOKENS [finetune args]: training throughput on 1 GPU, then on every GPU through torchrun
    TOKENS=$1; shift
    prepare
    MLA=$(convert ddp 32 32)
    NGPU=$(nvidia-smi -L | wc -l)
    mkdir -p "$OUT"
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    for n in 1 "$NGPU"; do
      rm -rf /root/w/ddp$n-ft /root/w/.ddp$n-ft.train
      CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) torchrun --standalone --nproc-per-node $n -m conversion.cli finetune \
        $MLA /root/w/ddp$n-ft --teacher "$MODEL" --stage global --finetune-tokens $((TOKENS * n)) "$@" 2>&1 \
        | grep -v -E "it/s\]$|s/it\]$" | tail -8
      cp /root/w/ddp$n-ft/finetune_report.json "$OUT/ddp-${n}gpu-finetune_report.json"
    done
    ;;
  convert)  # NAME ROPE DKV [STRATEGY]: only the conversion (-> its folder's path, the last line)
    prepare
    convert "$1" "$2" "$3" "${4:-2-norm}"
    ;;
  profile-random)  # NAME ROPE DKV [train_step_profile args]: SmolLM2's shape, random weights (needs only c0)
    NAME=$1; ROPE=$2; DKV=$3; shift 3
    export PYTHONPATH=$PWD
    mkdir -p "$OUT" /root/cfg && cp $CARRY/config.json /root/cfg/
    python3 -m benchmarks.studies.train_step_profile "$OUT/$NAME-step-profile.json" --random /root/cfg \
      --rope-dim "$ROPE" --d-kv "$DKV" "$@" 2>&1 | tee "$OUT/$NAME-step-profile.log"
    ;;
  profile)  # NAME ROPE DKV [train_step_profile args]: the real model's conversion
    NAME=$1; ROPE=$2; DKV=$3; shift 3
    prepare
    MLA=$(convert "$NAME" "$ROPE" "$DKV")
    mkdir -p "$OUT" && python3 -m benchmarks.studies.train_step_profile "$OUT/$NAME-step-profile.json" --model "$MLA" \
      --teacher "$MODEL" "$@"
    ;;
  serve)  # OUTNAME NAME [NAME ...]: the original, the conversions /root/w/NAME-mla and the runs /root/w/NAME-ft in vLLM
    OUTNAME=$1; shift
    prepare
    vllm_env
    args=("original=$MODEL")
    for n in "$@"; do  # NAME: its recovered run if there is one, else its conversion; or LABEL=PATH
      case $n in *=*) args+=("$n") ;; *) [ -d "/root/w/$n-ft" ] && args+=("$n=/root/w/$n-ft") || args+=("$n=/root/w/$n-mla") ;; esac
    done
    mkdir -p "$OUT" && python3 -m benchmarks.end_to_end.recovered_serving "$OUT/$OUTNAME.json" "${args[@]}" 2>&1 \
      | grep -v -E "it/s\]$|s/it\]$" | tail -60
    ;;
  bench)  # [mha2mla bench args]
    vllm_env
    mkdir -p "$OUT" /root/bench
    nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
    # BENCH_SECONDS bounds the whole mode, the bundle's first unpacking (~40 s) included: a call killed at its
    # own limit returns nothing, so the summary must be copied out before it
    left=$(( ${BENCH_SECONDS:-540} - SECONDS ))
    (( left > 0 )) || left=1  # `timeout 0` would mean no bound at all
    rc=0
    timeout -k 20 "$left" python3 -m vllm_mha2mla.tools.cli bench --output /root/bench "$@" 2>&1 | tail -80 || rc=${PIPESTATUS[0]}
    if (( rc == 124 || rc == 137 )); then  # say so: the rows that did finish still come back
      echo "bench: stopped at BENCH_SECONDS=${BENCH_SECONDS:-540}; summary.json holds every finished run and serving rate, not the one in progress" >&2
    elif (( rc != 0 )); then
      echo "bench: mha2mla bench exited with $rc" >&2
    fi
    cp /root/bench/summary.json /root/bench/summary.md "$OUT/" 2>/dev/null || true
    tar cJf "$OUT/bench-logs.tar.xz" -C /root/bench logs raw 2>/dev/null || true
    ;;
  script)  # MODULE [args]: a benchmark module with vLLM and this package on the path
    vllm_env
    mkdir -p "$OUT"
    python3 -m "$@"
    ;;
  pack|stage) echo "$MODE is staging: bash benchmarks/gpu/staging.sh $MODE" >&2; exit 2 ;;
  *) echo "unknown mode $MODE" >&2; exit 2 ;;
esac

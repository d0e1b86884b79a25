"""Synthetic Llama-family checkpoints (random weights, no tokenizer) for GPU runs, where no
data or hub is reachable. Config-only folders for dummy-weight runs come from the package's
benchmark code (``vllm_mha2mla.bench``), re-exported here for the older GPU scripts."""

from __future__ import annotations

from pathlib import Path

import torch

from vllm_mha2mla.bench.folders import mla_config_for, write_config_only
from vllm_mha2mla.bench.shapes import llama_config

__all__ = ["llama_config", "mla_config_for", "save_random_llama", "write_config_only"]


def save_random_llama(folder: Path, config: dict, seed: int = 0, std: float = 0.04) -> Path:
    """A real safetensors checkpoint with random weights (float32) of ``config``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.8, 1.2) if "norm" in name else p.normal_(0, std)
    model.save_pretrained(str(folder))
    return folder

"""Synthetic Llama-family checkpoints (random weights, no tokenizer) for GPU runs, where no
data or hub is reachable, and configs for dummy-weight throughput runs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conversion.convert import ConversionPlan, ConvertOptions, build_config
from conversion.layout import plan_exact_layout, plan_native_layout
from conversion.rope import select_pairs_fixed
from conversion.source import read_source_spec


def llama_config(hidden: int, heads: int, kv_heads: int, head_dim: int, layers: int, vocab: int,
                 intermediate: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "num_hidden_layers": layers, "vocab_size": vocab, "intermediate_size": intermediate,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2,
    }


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


def write_config_only(folder: Path, config: dict) -> Path:
    """A folder with only config.json, for ``load_format='dummy'`` engines."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def mla_config_for(llama_folder: Path, rope_dim: int, d_kv: int, cache_size: int | None = 576,
                   layer_latent: list[int] | None = None) -> dict:
    """The converted config.json an MHA2MLA conversion of ``llama_folder`` would write
    (``cache_size`` None: the exact layout, true sizes; ``layer_latent``: per-layer latent
    widths, exact layout)."""
    spec = read_source_spec(llama_folder)
    dims = (spec.num_heads, spec.num_kv_heads, spec.head_dim, rope_dim, d_kv)
    layout = plan_exact_layout(*dims) if cache_size is None or layer_latent else plan_native_layout(*dims, cache_size)
    if layer_latent:
        layout = layout.with_latent(max(layer_latent))
    pairs = select_pairs_fixed("uniform", rope_dim // 2, spec.head_dim // 2)
    opts = ConvertOptions(rope_dim=rope_dim, strategy="uniform", d_kv=d_kv)
    plan = ConversionPlan(spec, layout, opts, torch.bfloat16, layer_latent=layer_latent)
    return build_config(plan, [[pairs] * spec.num_kv_heads] * spec.num_layers)

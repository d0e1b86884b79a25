"""The ``mha2mla`` section of a converted checkpoint's config: its writer and its reader.

A converted ``config.json`` is a DeepSeek-V2 config (``model_type: deepseek_v2`` so vLLM
switches MLA on) plus one ``mha2mla`` dict with what DeepSeek-V2 has no field for: the
original head geometry, the rotary pairs kept per layer and kv-head, and the rope
parameters. The converter (and ``mha2mla bench``'s config-only folders) write it with
:func:`build_config`; the reference model and the vLLM plugin read it with
:class:`MHA2MLASpec`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from conversion.mla_format.layout import MLALayout
from conversion.rope import rope_inv_freq
from conversion.source import SourceSpec

ARCHITECTURE = "MHA2MLAForCausalLM"
FORMAT_VERSION = 1



def build_config(source: SourceSpec, layout: MLALayout, rope_pairs: list[list[list[int]]], dtype: str, *,
                 strategy: str, svd: str, layer_latent: list[int] | None = None,
                 layer_rope: list[int] | None = None, allocation: str | None = None) -> dict:
    """config.json of a converted model: a DeepSeek-V2 config plus the ``mha2mla`` section.

    ``source``: the original model's spec; ``layout``: the (widest layer's) layout;
    ``rope_pairs``: ``[layer][kv_head] → pairs`` kept rotary; ``dtype``: the weights' torch
    dtype name; ``strategy`` / ``svd``: how the conversion chose them (recorded only);
    ``layer_latent`` / ``layer_rope``: each layer's latent width / rotary dims under a per-layer
    allocation (None: every layer has ``layout``'s); ``allocation``: how ``layer_latent`` was
    chosen (recorded with it).
    """
    from transformers import DeepseekV2Config  # heavy; only the writer needs it

    section = {
        "format_version": FORMAT_VERSION,
        "layout": layout.to_dict(),
        "rope_pairs": rope_pairs,
        "rope_theta": source.rope_theta,
        "rope_scaling": source.rope_scaling,
        "q_bias": source.qkv_bias,
        "kv_a_bias": source.qkv_bias,
        "o_bias": source.qkv_bias or source.o_bias,
        "strategy": strategy,
        "svd": svd,
        "source_model_type": source.model_type,
        "source_architecture": source.architecture,
        "original_num_key_value_heads": source.num_kv_heads,
        "original_head_dim": source.head_dim,
    }
    if layer_rope is not None:
        section["layer_rope_dim"] = list(layer_rope)
    if layer_latent is not None:
        section["layer_kv_lora_rank"] = list(layer_latent)
        section["allocation"] = allocation
    config = DeepseekV2Config(
        vocab_size=source.vocab_size,
        hidden_size=source.hidden_size,
        intermediate_size=source.intermediate_size,
        moe_intermediate_size=source.intermediate_size,
        num_hidden_layers=source.num_layers,
        num_attention_heads=source.num_heads,
        num_key_value_heads=source.num_heads,
        hidden_act="silu",
        max_position_embeddings=source.max_position_embeddings,
        rms_norm_eps=source.rms_norm_eps,
        tie_word_embeddings=source.tie_word_embeddings,
        bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id,
        q_lora_rank=None,
        kv_lora_rank=layout.kv_lora_rank,
        qk_rope_head_dim=layout.qk_rope_head_dim,
        qk_nope_head_dim=layout.qk_nope_head_dim,
        v_head_dim=layout.v_head_dim,
        n_routed_experts=0,
        n_shared_experts=0,
        first_k_dense_replace=source.num_layers,
        mha2mla=section,
    )
    data = config.to_dict()
    data["architectures"] = [ARCHITECTURE]
    data["dtype"] = dtype
    return data

@dataclass(frozen=True)
class MHA2MLASpec:
    layout: MLALayout
    rope_pairs: list[list[list[int]]]
    """[layer][kv_head] → sorted pair indices kept rotary."""
    rope_theta: float
    rope_scaling: dict | None
    q_bias: bool
    kv_a_bias: bool
    o_bias: bool
    layer_kv_lora_rank: tuple[int, ...] | None = None
    """Each layer's latent width (= its ``kv_lora_rank``, exact layouts) when the conversion
    allocated the cache per layer; None when every layer has ``layout``'s. ``layout`` then
    describes the widest layer, so code that sizes by it never undersizes."""
    layer_rope_dim: tuple[int, ...] | None = None
    """Each layer's rotary dims per head when the conversion also spent rotary dims per layer
    (exact layouts); None when every layer has ``layout.rope_dim``, which is then the widest."""

    def __post_init__(self) -> None:
        lay, layers = self.layout, len(self.rope_pairs)
        for name, values, top in (("layer_kv_lora_rank", self.layer_kv_lora_rank, lay.kv_lora_rank),
                                  ("layer_rope_dim", self.layer_rope_dim, lay.rope_dim)):
            if values is None:
                continue
            if len(values) != layers:
                raise ValueError(f"mha2mla.{name} has {len(values)} entries for {layers} layers")
            if lay.kv_lora_rank != lay.latent_width or lay.rope_overflow:
                raise ValueError(f"per-layer widths ({name}) need the exact layout (kv_lora_rank = latent width)")
            if any(not 1 <= v <= top for v in values):
                raise ValueError(f"mha2mla.{name} {list(values)} must lie in [1, {top}] (the layout is the widest "
                                 "layer's)")
        for i, heads in enumerate(self.rope_pairs):
            want = self.layer_layout(i).rope_dim // 2
            if any(len(pairs) != want for pairs in heads):
                raise ValueError(f"mha2mla.rope_pairs of layer {i} keep {[len(p) for p in heads]} pairs per kv-head; "
                                 f"its rotary dims say {want}")

    @classmethod
    def from_config(cls, config: Any) -> "MHA2MLASpec":
        section = config.mha2mla if not isinstance(config, dict) else config["mha2mla"]
        if not isinstance(section, dict) or section.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                "config.json has no usable 'mha2mla' section (format_version "
                f"{FORMAT_VERSION}); convert the model with `mha2mla convert`"
            )
        return cls(
            layout=MLALayout.from_dict(section["layout"]),
            rope_pairs=[[list(map(int, p)) for p in layer] for layer in section["rope_pairs"]],
            rope_theta=float(section["rope_theta"]),
            rope_scaling=section.get("rope_scaling"),
            q_bias=bool(section.get("q_bias", False)),
            kv_a_bias=bool(section.get("kv_a_bias", False)),
            o_bias=bool(section.get("o_bias", False)),
            layer_kv_lora_rank=None if section.get("layer_kv_lora_rank") is None
            else tuple(int(r) for r in section["layer_kv_lora_rank"]),
            layer_rope_dim=None if section.get("layer_rope_dim") is None
            else tuple(int(r) for r in section["layer_rope_dim"]),
        )

    @property
    def per_layer(self) -> bool:
        """True when layers cache rows of different shapes (latent or rotary widths)."""
        return any(values is not None and len(set(values)) > 1
                   for values in (self.layer_kv_lora_rank, self.layer_rope_dim))

    def layer_layout(self, layer_idx: int) -> MLALayout:
        """The layout of one layer (its own latent and rotary widths under a per-layer allocation)."""
        return self.layout.for_layer(
            None if self.layer_kv_lora_rank is None else self.layer_kv_lora_rank[layer_idx],
            None if self.layer_rope_dim is None else self.layer_rope_dim[layer_idx])

    def layer_inv_freq(self, layer_idx: int) -> torch.Tensor:
        """``[kv_heads, r]`` float32 frequencies of the pairs this layer keeps rotary."""
        full = rope_inv_freq(self.layout.head_dim, self.rope_theta, self.rope_scaling)
        return full[torch.tensor(self.rope_pairs[layer_idx], dtype=torch.long, device="cpu")]

    def input_constants(self, layer_idx: int, head_start: int = 0, head_end: int | None = None) -> tuple[torch.Tensor, ...]:
        """(inv_freq per query head, inv_freq per kv-head, q gather index, kv gather index) of
        one layer for query heads ``[head_start, head_end)`` (a tensor-parallel shard), on CPU:
        the constant arguments of ``mla_inputs``."""
        lay = self.layer_layout(layer_idx)
        head_end = lay.num_heads if head_end is None else head_end
        inv_freq = self.layer_inv_freq(layer_idx)
        per_head = inv_freq.repeat_interleave(lay.group_size, 0)[head_start:head_end]
        return per_head, inv_freq, lay.q_gather_index_for_heads(head_start, head_end), lay.kv_gather_index

    @property
    def softmax_scale(self) -> float:
        """1/√d of the original head dim: MHA2MLA keeps the original attention temperature."""
        return self.layout.head_dim**-0.5

"""Reading the MHA2MLA section of a converted checkpoint's config.

A converted ``config.json`` is a DeepSeek-V2 config (``model_type: deepseek_v2`` so vLLM
switches MLA on) plus one ``mha2mla`` dict with what DeepSeek-V2 has no field for: the
original head geometry, the rotary pairs kept per layer and kv-head, and the rope
parameters. The reference model and the vLLM plugin both read it through this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from conversion.layout import MLALayout
from conversion.rope import rope_inv_freq

ARCHITECTURE = "MHA2MLAForCausalLM"
FORMAT_VERSION = 1


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
            if lay.kv_lora_rank != lay.latent_dim or lay.rope_overflow:
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

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
        )

    def layer_inv_freq(self, layer_idx: int) -> torch.Tensor:
        """``[kv_heads, r]`` float32 frequencies of the pairs this layer keeps rotary."""
        full = rope_inv_freq(self.layout.head_dim, self.rope_theta, self.rope_scaling)
        return full[torch.tensor(self.rope_pairs[layer_idx], dtype=torch.long, device="cpu")]

    def input_constants(self, layer_idx: int, head_start: int = 0, head_end: int | None = None) -> tuple[torch.Tensor, ...]:
        """(inv_freq per query head, inv_freq per kv-head, q gather index, kv gather index) of
        one layer for query heads ``[head_start, head_end)`` (a tensor-parallel shard), on CPU:
        the constant arguments of ``mla_inputs``."""
        lay = self.layout
        head_end = lay.num_heads if head_end is None else head_end
        inv_freq = self.layer_inv_freq(layer_idx)
        per_head = inv_freq.repeat_interleave(lay.group_size, 0)[head_start:head_end]
        return per_head, inv_freq, lay.q_gather_index_for_heads(head_start, head_end), lay.kv_gather_index

    @property
    def softmax_scale(self) -> float:
        """1/√d of the original head dim: MHA2MLA keeps the original attention temperature."""
        return self.layout.head_dim**-0.5

"""KV-cache accounting: values and bytes cached per token, before and after conversion."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from conversion.mla_format.layout import MLALayout

BYTES_PER_VALUE = {"bf16": 2.0, "fp8": 1.0, "int4": 0.5}


@dataclass(frozen=True)
class KVAccounting:
    num_layers: int
    original_values: int
    """2·g·d: keys and values of every kv-head."""
    essential_values: float
    """C + R: the latent plus the rotated rope keys MHA2MLA needs (mean over layers)."""
    cached_values: float
    """kv_lora_rank + qk_rope_head_dim: what vLLM pages (essential plus zero padding; mean
    over layers, which differ under a per-layer allocation)."""

    @classmethod
    def from_layout(cls, layout: MLALayout, num_layers: int) -> "KVAccounting":
        return cls(
            num_layers=num_layers,
            original_values=2 * layout.num_kv_heads * layout.head_dim,
            essential_values=layout.essential_values,
            cached_values=layout.cache_values,
        )

    @classmethod
    def from_layouts(cls, layouts: Sequence[MLALayout]) -> "KVAccounting":
        """Per-layer layouts (a per-layer allocation); values are means over the layers."""
        first = layouts[0]
        mean = lambda values: _int_if_whole(sum(values) / len(layouts))  # noqa: E731
        return cls(
            num_layers=len(layouts),
            original_values=2 * first.num_kv_heads * first.head_dim,
            essential_values=mean([lay.essential_values for lay in layouts]),
            cached_values=mean([lay.cache_values for lay in layouts]),
        )

    def reduction(self, values: int, dtype: str = "bf16", original_dtype: str = "bf16") -> float:
        """Fractional cache reduction of ``values`` stored as ``dtype`` vs the bf16 original."""
        after = values * BYTES_PER_VALUE[dtype]
        return 1.0 - after / (self.original_values * BYTES_PER_VALUE[original_dtype])

    def rows(self) -> list[dict]:
        """Table rows: per token per layer values, bytes and reduction for each KV dtype."""
        out = [
            {
                "what": "original (K+V)",
                "values": self.original_values,
                "dtype": "bf16",
                "bytes_per_token_per_layer": self.original_values * 2,
                "bytes_per_token": self.original_values * 2 * self.num_layers,
                "reduction_pct": 0.0,
            }
        ]
        for label, values in (("MHA2MLA essential", self.essential_values), ("vLLM cache row", self.cached_values)):
            for dtype, width in BYTES_PER_VALUE.items():
                out.append(
                    {
                        "what": label,
                        "values": values,
                        "dtype": dtype,
                        "bytes_per_token_per_layer": values * width,
                        "bytes_per_token": values * width * self.num_layers,
                        "reduction_pct": 100 * self.reduction(values, dtype),
                    }
                )
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "rows": self.rows()}


def _int_if_whole(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value

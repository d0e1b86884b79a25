"""Which columns of an MHA2MLA query/key head prefill attention needs, and how to gather them.

vLLM's MLA prefill scores ``[q_nope | q_pe] · [k_nope | k_pe]`` over ``qk_nope + qk_rope``
dims, with ``k_pe`` (every kv-head's rotated keys) repeated for each head. In MHA2MLA's layout a
query head is zero on all of that except two runs: the first :attr:`MLALayout.nope_columns_used`
nope columns (its nope dims and any rotated dims whose keys live in the latent; the native
layouts pad the rest with zeros) and its own kv-head's columns of the rope slot
(:meth:`MLALayout.rope_slot_columns`). Attention over those columns alone is the same attention.
For Llama-2-7B that is 126 + 2 = 128 of 192 dims (native 576) or 112 + 16 = 128 of 624 (the
paper's 1024 values): FlashAttention's 128-wide kernel instead of its 192-wide one, or instead
of none at all.

Pure tensor code (no vLLM import): the prefill backends compact queries, the GPU attention
implementation builds keys compact from the start (:func:`compact_keys`) so the wide key is
never written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import torch

from conversion.mla_format.layout import MLALayout


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(eq=False)
class HeadCompaction:
    """The prefill head geometry of one layer (one tensor-parallel rank's heads)."""

    num_heads: int
    qk_nope: int
    """vLLM's ``qk_nope_head_dim``: the nope part of the heads vLLM hands over."""
    qk_rope: int
    """vLLM's ``qk_rope_head_dim``: the rope slot, repeated for every head."""
    nope_kept: int
    """Leading nope columns kept (the rest are zero in every query head)."""
    rope_columns: torch.Tensor | None
    """``[num_heads, K]`` slot columns each head keeps; None: no compaction (not MHA2MLA)."""
    padded_dim: int
    """Head size q, k and v are zero-padded to (one size for all three; the kernels want it)."""
    _indices_on: dict = field(default_factory=dict, init=False, repr=False)

    @property
    def qk_width(self) -> int:
        return self.qk_nope + self.qk_rope

    @property
    def width(self) -> int:
        """Columns kept per head before padding."""
        return self.qk_width if self.rope_columns is None else self.nope_kept + self.rope_columns.shape[1]

    @property
    def narrows_keys(self) -> bool:
        """Whether keys written compact are narrower than vLLM's full key: the one case the GPU
        implementation builds them so. The prefill backends tell the two apart by width (a key as
        wide as its query is the full one), which this keeps unambiguous."""
        return self.rope_columns is not None and self.padded_dim != self.qk_width

    def indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """On ``device`` (cached): the ``[num_heads · width]`` columns of a ``[T, num_heads ·
        qk_width]`` row that the compact heads take, head after head, and the ``[num_heads, K]``
        rope-slot columns of each head. Only for MHA2MLA heads (``rope_columns`` set)."""
        found = self._indices_on.get(device)
        if found is None:
            heads = torch.arange(self.num_heads)[:, None] * self.qk_width
            columns = torch.cat([torch.arange(self.nope_kept).expand(self.num_heads, -1),
                                 self.qk_nope + self.rope_columns], dim=1)
            found = self._indices_on[device] = ((heads + columns).reshape(-1).to(device), self.rope_columns.to(device))
        return found


def head_compaction(layout: MLALayout, first_head: int, num_heads: int, v_dim: int, pad_to: int) -> HeadCompaction:
    """The geometry of heads ``[first_head, first_head + num_heads)`` of one layer's ``layout``,
    q, k and v padded to one multiple of ``pad_to``."""
    columns = layout.rope_slot_columns(first_head, first_head + num_heads)
    kept = layout.nope_columns_used
    return HeadCompaction(num_heads, layout.qk_nope_head_dim, layout.qk_rope_head_dim, kept, columns,
                          round_up(max(kept + columns.shape[1], v_dim), pad_to))


def padded_heads(num_heads: int, qk_nope: int, qk_rope: int, v_dim: int, pad_to: int) -> HeadCompaction:
    """Heads of a checkpoint that is not MHA2MLA: kept whole, only padded to one size."""
    return HeadCompaction(num_heads, qk_nope, qk_rope, qk_nope, None, round_up(max(qk_nope + qk_rope, v_dim), pad_to))


def pad_last(x: torch.Tensor, width: int) -> torch.Tensor:
    return x if x.shape[-1] == width else torch.nn.functional.pad(x, [0, width - x.shape[-1]])


def compact_heads(x: torch.Tensor, heads: HeadCompaction) -> torch.Tensor:
    """``[T, H, qk_width]`` → ``[T, H, padded_dim]``: one gather of the kept columns, zeros after."""
    if heads.rope_columns is None:
        return pad_last(x, heads.padded_dim)
    rows = x.flatten(1)  # a view for vLLM's contiguous q and k
    kept = rows.index_select(1, heads.indices(x.device)[0]).view(x.shape[0], heads.num_heads, heads.width)
    return pad_last(kept, heads.padded_dim)


def compact_keys(k_nope: torch.Tensor, k_pe: torch.Tensor, heads: HeadCompaction) -> torch.Tensor:
    """What :func:`compact_heads` makes of ``[k_nope | k_pe repeated per head]``, written straight
    from ``k_nope`` ``[T, H, qk_nope]`` (any strides) and ``k_pe`` ``[T, 1, qk_rope]``, so the
    ``[T, H, qk_width]`` key vLLM would build never exists."""
    if heads.rope_columns is None:
        raise ValueError("keys of a checkpoint that is not MHA2MLA are not compacted")
    k = k_nope.new_empty(k_nope.shape[0], heads.num_heads, heads.padded_dim)
    kept, own = heads.nope_kept, heads.rope_columns.shape[1]
    k[..., :kept] = k_nope[..., :kept]
    k[..., kept : kept + own] = k_pe.reshape(k_pe.shape[0], heads.qk_rope)[:, heads.indices(k.device)[1]]
    if heads.padded_dim > kept + own:
        k[..., kept + own :] = 0
    return k

"""A low-bit latent cache row as bytes (issue 33): where each part of a token's row sits, and the row written and
read back.

:mod:`~conversion.mla_format.cache_quant` holds the math (groups, codes, scales); this module fixes the byte layout
a paged cache stores, so the plugin's write, its decode and its prefill-context gather agree on one definition and
KV capacity follows the true bytes. One row per token (and layer), two segments — the latent (``latent``
columns, what keys and values are decoded from) then the rotary keys (``rope`` columns) — each stored as

    [codes (packed two a byte at 4 bits, one at 8; padded to an even byte count) | scales (float16 × groups) |
     minima (float16 × groups)]

or, for a segment kept at the model's precision (``bits`` None), its values in ``dtype``. Every offset is even,
so float16 / bfloat16 views of a row's bytes are aligned; the row's byte count is the sum (``row_bytes``), which is
what a page of the cache holds per token. The Hadamard options rotate a segment into its stored basis before
quantising and back on reading, so readers get the model's basis (a kernel may instead rotate the query once:
``(Hq)·(Hk) = q·k``).

Pure functions, tensors in and out: the reference model's :func:`~conversion.mla_format.cache_quant.fake_quantize_row`
is what :func:`decode_rows` of :func:`encode_rows` returns (tested), so the plugin's cache and the reference attend
over the same values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from conversion.errors import ConversionError
from conversion.mla_format.cache_quant import (
    CacheQuant, dequantize_groups, hadamard, pack_int4, quantize_groups, unpack_int4,
)


@dataclass(frozen=True)
class Segment:
    """One segment's place in the row: ``columns`` values at ``bits`` (None: raw ``dtype``), starting at
    byte ``offset``; codes take ``code_bytes``, then ``groups`` float16 scales and as many minima."""

    columns: int
    bits: int | None
    rotate: bool
    offset: int
    code_bytes: int
    groups: int
    raw_bytes: int
    """Bytes of the segment unquantised (``bits`` None), else 0."""

    @property
    def nbytes(self) -> int:
        return self.raw_bytes or self.code_bytes + 4 * self.groups


@dataclass(frozen=True)
class RowLayout:
    """The byte layout of a ``fmt`` row of ``latent`` + ``rope`` columns; unquantised segments in ``dtype``."""

    fmt: CacheQuant
    latent: int
    rope: int
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        if self.latent < 1 or self.rope < 0:
            raise ConversionError(f"a cache row needs latent ≥ 1 and rope ≥ 0 columns, not {self.latent} / {self.rope}")
        if torch.empty((), dtype=self.dtype).element_size() != 2:
            raise ConversionError(f"unquantised cache segments are stored in a 2-byte float, not {self.dtype}")

    @property
    def segments(self) -> tuple[Segment, Segment]:
        out, offset = [], 0
        for columns, bits, rotate in ((self.latent, self.fmt.latent_bits, self.fmt.hadamard),
                                      (self.rope, self.fmt.rope_bits, self.fmt.rope_hadamard)):
            if bits is None or columns == 0:
                seg = Segment(columns, None, False, offset, 0, 0, 2 * columns)
            else:
                code_bytes = math.ceil(columns * bits / 8)
                seg = Segment(columns, bits, rotate and columns >= 2, offset, code_bytes + code_bytes % 2,
                              math.ceil(columns / self.fmt.group), 0)
            out.append(seg)
            offset += seg.nbytes
        return out[0], out[1]

    @property
    def row_bytes(self) -> int:
        """Bytes a token's row takes in the cache (codes, scales, minima, raw segments, even padding)."""
        latent, rope = self.segments
        return latent.nbytes + rope.nbytes


def _encode_segment(x: torch.Tensor, seg: Segment, group: int, dtype: torch.dtype) -> torch.Tensor:
    """``x`` ``[N, columns]`` → its ``[N, seg.nbytes]`` bytes."""
    n = x.shape[0]
    if seg.bits is None:
        return x.to(dtype).contiguous().view(torch.uint8).reshape(n, seg.raw_bytes)
    if seg.rotate:
        x = x.float() @ hadamard(seg.columns, torch.float32).to(x.device)
    codes, scale, minimum = quantize_groups(x, seg.bits, group)
    packed = pack_int4(codes) if seg.bits == 4 else codes
    if packed.shape[-1] < seg.code_bytes:
        packed = torch.nn.functional.pad(packed, (0, seg.code_bytes - packed.shape[-1]))
    meta = torch.cat([scale, minimum], dim=-1).contiguous().view(torch.uint8).reshape(n, 4 * seg.groups)
    return torch.cat([packed, meta], dim=-1)


def _decode_segment(rows: torch.Tensor, seg: Segment, group: int, dtype: torch.dtype,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """The segment's values ``[..., columns]`` read from rows ``[..., row_bytes]``, in ``out_dtype``."""
    lead = rows.shape[:-1]
    part = rows[..., seg.offset:seg.offset + seg.nbytes].contiguous()
    if seg.bits is None:
        return part.view(dtype).reshape(*lead, seg.columns).to(out_dtype)
    codes = part[..., :seg.code_bytes]
    codes = unpack_int4(codes, seg.columns) if seg.bits == 4 else codes[..., :seg.columns]
    meta = part[..., seg.code_bytes:].view(torch.float16).reshape(*lead, 2, seg.groups)
    values = dequantize_groups(codes, meta[..., 0, :], meta[..., 1, :], group)
    if seg.rotate:
        values = values @ hadamard(seg.columns, torch.float32).to(values.device).T
    return values.to(out_dtype)


def encode_rows(latent: torch.Tensor, rope: torch.Tensor, layout: RowLayout) -> torch.Tensor:
    """Tokens' ``latent`` ``[N, latent]`` and ``rope`` ``[N, rope]`` → their cache rows, uint8 ``[N, row_bytes]``."""
    if latent.shape[-1] != layout.latent or rope.shape[-1] != layout.rope or latent.shape[:-1] != rope.shape[:-1]:
        raise ConversionError(f"rows of {latent.shape[-1]} latent and {rope.shape[-1]} rotary columns do not fit a "
                              f"layout of {layout.latent} + {layout.rope}")
    seg_latent, seg_rope = layout.segments
    parts = [_encode_segment(latent.reshape(-1, layout.latent), seg_latent, layout.fmt.group, layout.dtype)]
    if layout.rope:
        parts.append(_encode_segment(rope.reshape(-1, layout.rope), seg_rope, layout.fmt.group, layout.dtype))
    return torch.cat(parts, dim=-1).reshape(*latent.shape[:-1], layout.row_bytes)


def decode_rows(rows: torch.Tensor, layout: RowLayout,
                out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache rows uint8 ``[..., row_bytes]`` → ``(latent [..., latent], rope [..., rope])`` in ``out_dtype``."""
    if rows.dtype != torch.uint8 or rows.shape[-1] != layout.row_bytes:
        raise ConversionError(f"cache rows of {rows.shape[-1]} {rows.dtype} values are not this layout's "
                              f"{layout.row_bytes} bytes")
    seg_latent, seg_rope = layout.segments
    latent = _decode_segment(rows, seg_latent, layout.fmt.group, layout.dtype, out_dtype)
    if not layout.rope:
        return latent, latent.new_zeros(*rows.shape[:-1], 0)
    return latent, _decode_segment(rows, seg_rope, layout.fmt.group, layout.dtype, out_dtype)

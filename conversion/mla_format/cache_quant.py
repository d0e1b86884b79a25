"""Low-bit formats for the latent cache row ``[latent | rotary keys]`` (issue 33): the math, once.

A converted model caches one row per token and layer: the SVD latent ``c`` (``C`` columns, what keys and values
are decoded from) and the rotated rotary keys (``R`` columns, in the latent part's tail when they overflow the
``k_pe`` slot, then in ``k_pe``). A low-bit cache stores each row as integer codes in groups of ``group``
columns, each group with its own scale and minimum (asymmetric: ``x ≈ code · scale + minimum``), both float16,
quantised on write, one token at a time, so a token's row never changes once written (what paged caches, prefix
caching and chunked prefill need). The rotary columns may keep the model's dtype (``rope_bits=None``): they carry
position, and retrieval is what conversion already loses most (issue 32).

Why groups and not one scale a row (vLLM's ``int4_per_token_head``): an SVD latent's columns fall in scale from
the first singular direction to the last, so one scale a row spends most of the 16 levels on the first few
columns. A group's scale follows its columns. The byte cost of a group's metadata is 4 bytes (two float16), so
int4 in groups of 64 stores 4.5 bits a value (3.56x fewer bytes than bfloat16), of 32 5 bits (3.2x).

Why an optional Hadamard rotation (:func:`hadamard`): the latent's basis is free (the converter may multiply
``kv_a`` by any orthogonal ``H`` and ``kv_b`` by ``Hᵀ`` and the model is unchanged), and a Hadamard mix spreads
outlier columns over a group, which is what a per-group scale quantises best. :func:`fake_quantize_row` applies it
on the fly so its value can be measured before the converter bakes it in.

These functions are pure (tensors in, tensors out): the PyTorch reference model applies
:func:`fake_quantize_row` to every row it caches, the plugin's kernels are tested against the same functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from conversion.errors import ConversionError

SUPPORTED_BITS = (4, 8)
META_BYTES_PER_GROUP = 4
"""A group's scale and minimum, float16 each."""


@dataclass(frozen=True)
class CacheQuant:
    """How a cache row is stored: latent columns in ``latent_bits``, rotary columns in ``rope_bits``
    (``None``: the model's dtype), every quantised segment in groups of ``group`` columns (a segment's last
    group may be shorter), the latent optionally Hadamard-rotated first (``hadamard``)."""

    latent_bits: int = 4
    rope_bits: int | None = 4
    group: int = 64
    hadamard: bool = False
    rope_hadamard: bool = False
    """The rotary keys Hadamard-mixed before quantising (exact if the queries' rotary part is mixed alike:
    ``(Hq)·(Hk) = q·k``), so a pair that rotates with a large amplitude shares its range with quiet ones."""

    def __post_init__(self) -> None:
        for name, bits in (("latent_bits", self.latent_bits), ("rope_bits", self.rope_bits)):
            if bits is not None and bits not in SUPPORTED_BITS:
                raise ConversionError(f"{name}={bits}: the cache stores {' or '.join(map(str, SUPPORTED_BITS))}-bit codes")
        if self.group < 2:
            raise ConversionError(f"group={self.group}: a quantisation group needs at least 2 columns")

    def segment_bytes(self, columns: int, bits: int | None, dtype_bytes: int = 2) -> int:
        """Bytes one token's segment of ``columns`` takes: packed codes plus a scale and minimum per group
        (``bits`` None: the columns in a ``dtype_bytes`` float)."""
        if columns == 0:
            return 0
        if bits is None:
            return columns * dtype_bytes
        return math.ceil(columns * bits / 8) + math.ceil(columns / self.group) * META_BYTES_PER_GROUP

    def row_bytes(self, latent: int, rope: int, dtype_bytes: int = 2) -> int:
        """Bytes of one cached row: ``latent`` latent columns and ``rope`` rotary ones (padding excluded)."""
        return self.segment_bytes(latent, self.latent_bits, dtype_bytes) + self.segment_bytes(
            rope, self.rope_bits, dtype_bytes)


def quantize_groups(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-group codes of the last dimension: ``(codes uint8 [..., n], scale, minimum)``, the
    latter two float16 ``[..., ceil(n / group)]``. Rounding to nearest; a constant group gets scale 0 and
    codes 0 (it decodes to its value exactly, up to float16)."""
    if bits not in SUPPORTED_BITS:
        raise ConversionError(f"{bits}-bit codes: choose one of {SUPPORTED_BITS}")
    n = x.shape[-1]
    groups = math.ceil(n / group)
    x = x.float()
    # A short last group is padded with its last value: padding must not widen the group's range.
    padded = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], groups * group - n)], dim=-1)
    g = padded.unflatten(-1, (groups, group))
    minimum = g.amin(-1).to(torch.float16)
    scale = ((g.amax(-1) - minimum.float()) / (2**bits - 1)).to(torch.float16)
    step = scale.float()[..., None]  # what the codes are read back with
    codes = torch.round((g - minimum.float()[..., None]) / step.clamp_min(torch.finfo(torch.float32).tiny))
    codes = torch.where(step > 0, codes.clamp_(0, 2**bits - 1), torch.zeros_like(codes))
    return codes.flatten(-2)[..., :n].to(torch.uint8), scale, minimum


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values ``codes · scale + minimum`` of :func:`quantize_groups`' output, in ``dtype``."""
    n = codes.shape[-1]
    per_column_scale = scale.float().repeat_interleave(group, dim=-1)[..., :n]
    per_column_min = minimum.float().repeat_interleave(group, dim=-1)[..., :n]
    return (codes.float() * per_column_scale + per_column_min).to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes a byte, the even column in the low nibble (an odd width gets a zero high nibble)."""
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """The ``columns`` codes :func:`pack_int4` packed."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)[..., :columns]


def hadamard(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An orthonormal ``n × n`` Hadamard matrix (Sylvester's construction) for ``n`` a power of two; other
    widths get a block-diagonal of the largest powers of two that sum to ``n`` (still orthonormal)."""
    blocks, left = [], n
    while left:
        size = 1 << (left.bit_length() - 1)
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < size:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        blocks.append(h / math.sqrt(size))
        left -= size
    return torch.block_diag(*blocks).to(dtype)


def fake_quantize(x: torch.Tensor, bits: int | None, group: int) -> torch.Tensor:
    """``x`` stored and read back in ``bits``-bit groups (``None``: unchanged), in ``x``'s dtype."""
    if bits is None or x.shape[-1] == 0:
        return x
    return dequantize_groups(*quantize_groups(x, bits, group), group, x.dtype)


def fake_quantize_row(latent: torch.Tensor, rope: torch.Tensor, fmt: CacheQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """One cached row's two segments as a ``fmt`` cache returns them (what the reference model attends over)."""
    return (_fake_quantize_segment(latent, fmt.latent_bits, fmt.group, fmt.hadamard),
            _fake_quantize_segment(rope, fmt.rope_bits, fmt.group, fmt.rope_hadamard))


def _fake_quantize_segment(x: torch.Tensor, bits: int | None, group: int, rotate: bool) -> torch.Tensor:
    """One segment stored and read back, Hadamard-rotated into the stored basis and back when ``rotate``."""
    if not rotate or bits is None or x.shape[-1] < 2:
        return fake_quantize(x, bits, group)
    h = hadamard(x.shape[-1], torch.float32).to(x.device)
    return (fake_quantize(x.float() @ h, bits, group) @ h.T).to(x.dtype)

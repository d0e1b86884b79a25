"""The low-bit latent cache write (issue 33), in Triton: each token's row quantised into its
:class:`~conversion.mla_format.cache_rows.RowLayout` bytes at its slot, in one launch, with no host synchronisation.

Why a kernel: the PyTorch write (:func:`vllm_mha2mla.attention.quantized_cache.write_rows`) drops vLLM's padding
slots (``slot < 0``) with a boolean index, which asks the host how many tokens remain (``keep.all()``, then a
gather of data-dependent size). vLLM 0.26 captures a decode step whole in a CUDA graph, the cache write included
(``CompilationConfig.set_splitting_ops_for_v1`` keeps ``vllm::unified_mla_kv_cache_update`` out of the piecewise
graphs but the FULL decode graph is captured around the whole forward), and a captured graph can neither sync nor
change sizes. Here the grid is one program per slot of the slot mapping (a function of the padded batch only), a
padding slot's program masks every store, so the launch is the same for every step a graph replays.

Bytes: identical to :func:`~conversion.mla_format.cache_rows.encode_rows` (tested for float32 and bfloat16 inputs
in Triton's interpreter): per group of ``fmt.group`` columns the minimum and maximum in float32, the minimum rounded
to float16, ``scale = float16((max - minimum) / (2**bits - 1))`` with a correctly rounded division
(``tl.math.div_rn``: Triton's ``/`` on float32 is an approximate ``div.full`` on NVIDIA GPUs), codes
``round((x - minimum) / max(scale, tiny))`` rounding half to even as ``torch.round`` does, clamped to the code range,
0 where the scale is not positive; int4 codes two a byte (even column in the low nibble, an odd width's last high
nibble 0), the even-padding byte of the codes written 0, raw segments converted to the layout's 2-byte float. A
segment's columns are taken from vLLM's ``[kv_c | k_pe]`` row wherever the layout's split falls (a native layout's
rotary keys that overflow into ``kv_c`` belong to the rotary segment).

Refused (``ValueError``, naming the format): Hadamard-rotated segments (``CacheQuant.hadamard`` /
``rope_hadamard``: the rotation is a matrix product the PyTorch write does; the engine's
``int4_per_token_head`` format has none) and int4 codes in groups of an odd size (a byte's two codes would belong to
two groups).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from conversion.mla_format.cache_rows import RowLayout
from vllm_mha2mla.attention.triton_low_bit_decode import segment_constants

RAW_BLOCK = 128
"""Columns a raw (2-byte float) segment is copied in per step."""


@triton.jit
def _row_columns(KVC, KPE, cols, mask, RANK: tl.constexpr):
    """Columns ``cols`` of a token's vLLM row ``[kv_c (RANK) | k_pe]`` in float32 (``KVC`` / ``KPE``: the token's
    ``kv_c`` and ``k_pe``)."""
    in_c = cols < RANK
    a = tl.load(KVC + cols, mask=mask & in_c, other=0.0).to(tl.float32)
    b = tl.load(KPE + (cols - RANK), mask=mask & (cols >= RANK), other=0.0).to(tl.float32)
    return tl.where(in_c, a, b)


@triton.jit
def _raw_bits(x, BF16: tl.constexpr):
    """float32 ``x`` rounded to the raw segment's 2-byte float (bfloat16 if ``BF16``, else float16), to nearest
    with ties to even as ``Tensor.to`` does, as its 16 bits (int16). bfloat16 by integer arithmetic on the float32
    bits: Triton's interpreter truncates a float32 → bfloat16 cast (a GPU rounds it), so the bytes would depend on
    where the kernel runs."""
    if BF16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
        rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays NaN
        return rounded.to(tl.int16, bitcast=True)
    return x.to(tl.float16).to(tl.int16, bitcast=True)


@triton.jit
def _live(offs, slot):
    """``slot >= 0`` broadcast over ``offs`` (an integer tensor): a store mask built from a vector (Triton's
    interpreter refuses a mask broadcast from a scalar)."""
    return (offs * 0 + slot) >= 0


@triton.jit
def _codes(x, minimum, step, MAX_CODE: tl.constexpr):
    """``round((x - minimum) / max(step, tiny))`` (half to even), clamped to ``[0, MAX_CODE]``; 0 where
    ``step <= 0`` — :func:`~conversion.mla_format.cache_quant.quantize_groups` exactly."""
    v = tl.math.div_rn(x - minimum, tl.maximum(step, 1.1754943508222875e-38))
    r = tl.floor(v)
    frac = v - r  # exact: |v| is far below 2**23 wherever the code is kept
    odd = r - 2.0 * tl.floor(r * 0.5)
    r = tl.where(frac > 0.5, r + 1.0, tl.where(frac == 0.5, r + odd, r))
    r = tl.minimum(tl.maximum(r, 0.0), MAX_CODE * 1.0)
    return tl.where(step > 0.0, r, 0.0).to(tl.int32)


@triton.jit
def _group_stats(lo, hi, MAX_CODE: tl.constexpr):
    """A group's float16 minimum and scale from its lowest and highest value (float32), and the scale as the codes
    are read back with (float32)."""
    minimum = lo.to(tl.float16)
    scale = tl.math.div_rn(hi - minimum.to(tl.float32), MAX_CODE * 1.0).to(tl.float16)
    return minimum, scale, scale.to(tl.float32)


@triton.jit
def _write_segment(KVC, KPE, RowBytes, RowHalf, RowRaw, slot,
                   FIRST: tl.constexpr, COLUMNS: tl.constexpr, BITS: tl.constexpr, OFFSET: tl.constexpr,
                   META: tl.constexpr, GROUPS: tl.constexpr, CODE_BYTES: tl.constexpr, RANK: tl.constexpr,
                   GROUP: tl.constexpr, BLOCK_G: tl.constexpr, RAW_COLS: tl.constexpr, RAW_BF16: tl.constexpr):
    """One segment of one token's row: vLLM row columns ``FIRST .. FIRST + COLUMNS`` into the row's bytes from
    ``OFFSET`` (``BITS`` 0: raw 2-byte floats; else codes, then the float16 scales at byte ``META``, then the
    minima). ``RowBytes`` / ``RowHalf`` / ``RowRaw``: the row's start as uint8 / float16 / int16 pointers; a
    negative ``slot`` stores nothing."""
    if BITS == 0:
        for c0 in range(0, COLUMNS, RAW_COLS):
            cols = c0 + tl.arange(0, RAW_COLS)
            m = cols < COLUMNS
            x = _row_columns(KVC, KPE, FIRST + cols, m, RANK)
            tl.store(RowRaw + OFFSET // 2 + cols, _raw_bits(x, RAW_BF16), mask=m & _live(cols, slot))
    else:
        MAX_CODE = (1 << BITS) - 1
        one = tl.arange(0, 1)
        for g in range(GROUPS):
            start = g * GROUP
            if BITS == 4:  # GROUP is even: a group's columns pair up within it, byte (start + 2k) / 2
                k = tl.arange(0, BLOCK_G // 2)
                c_lo = start + 2 * k
                m_lo = (2 * k < GROUP) & (c_lo < COLUMNS)
                m_hi = (2 * k + 1 < GROUP) & (c_lo + 1 < COLUMNS)
                x_lo = _row_columns(KVC, KPE, FIRST + c_lo, m_lo, RANK)
                x_hi = _row_columns(KVC, KPE, FIRST + c_lo + 1, m_hi, RANK)
                lo = tl.minimum(tl.min(tl.where(m_lo, x_lo, float("inf")), 0),
                                tl.min(tl.where(m_hi, x_hi, float("inf")), 0))
                hi = tl.maximum(tl.max(tl.where(m_lo, x_lo, float("-inf")), 0),
                                tl.max(tl.where(m_hi, x_hi, float("-inf")), 0))
                minimum, scale, step = _group_stats(lo, hi, MAX_CODE)
                code_lo = _codes(x_lo, minimum.to(tl.float32), step, MAX_CODE)
                code_hi = tl.where(m_hi, _codes(x_hi, minimum.to(tl.float32), step, MAX_CODE), 0)
                packed = (code_lo | (code_hi << 4)).to(tl.uint8)
                tl.store(RowBytes + OFFSET + start // 2 + k, packed, mask=m_lo & _live(k, slot))
            else:
                j = tl.arange(0, BLOCK_G)
                cols = start + j
                m = (j < GROUP) & (cols < COLUMNS)
                x = _row_columns(KVC, KPE, FIRST + cols, m, RANK)
                lo = tl.min(tl.where(m, x, float("inf")), 0)
                hi = tl.max(tl.where(m, x, float("-inf")), 0)
                minimum, scale, step = _group_stats(lo, hi, MAX_CODE)
                codes = _codes(x, minimum.to(tl.float32), step, MAX_CODE)
                tl.store(RowBytes + OFFSET + cols, codes.to(tl.uint8), mask=m & _live(cols, slot))
            tl.store(RowHalf + META // 2 + g + one, scale + tl.zeros([1], tl.float16), mask=_live(one, slot))
            tl.store(RowHalf + META // 2 + GROUPS + g + one, minimum + tl.zeros([1], tl.float16),
                     mask=_live(one, slot))
        USED = (COLUMNS * BITS + 7) // 8
        if CODE_BYTES > USED:  # the codes' even padding, 0 as encode_rows pads it
            tl.store(RowBytes + OFFSET + USED + one, tl.zeros([1], tl.uint8), mask=_live(one, slot))


@triton.jit
def _low_bit_write_kernel(
    KVC, stride_c, KPE, stride_p, Slots,
    CacheBytes, CacheHalf, CacheRaw, stride_page, stride_tok,
    RANK: tl.constexpr, PAGE: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, RAW_COLS: tl.constexpr,
    RAW_BF16: tl.constexpr,
    LATENT: tl.constexpr, LATENT_BITS: tl.constexpr, LATENT_META: tl.constexpr, LATENT_GROUPS: tl.constexpr,
    LATENT_CODE_BYTES: tl.constexpr,
    ROPE: tl.constexpr, ROPE_BITS: tl.constexpr, ROPE_OFFSET: tl.constexpr, ROPE_META: tl.constexpr,
    ROPE_GROUPS: tl.constexpr, ROPE_CODE_BYTES: tl.constexpr,
):
    """Program ``t``: token ``t``'s row into slot ``Slots[t]`` (page ``slot // PAGE``, offset ``slot % PAGE``);
    a negative slot stores nothing. Byte offsets within a row as in ``triton_low_bit_decode``."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(Slots + t).to(tl.int64)
    at = tl.maximum(slot, 0)  # a padding slot's program computes its addresses at slot 0 and stores nothing
    row = (at // PAGE) * stride_page + (at % PAGE) * stride_tok  # bytes; even
    kvc = KVC + t * stride_c
    kpe = KPE + t * stride_p
    _write_segment(kvc, kpe, CacheBytes + row, CacheHalf + row // 2, CacheRaw + row // 2, slot,
                   0, LATENT, LATENT_BITS, 0, LATENT_META, LATENT_GROUPS, LATENT_CODE_BYTES, RANK,
                   GROUP, BLOCK_G, RAW_COLS, RAW_BF16)
    if ROPE > 0:
        _write_segment(kvc, kpe, CacheBytes + row, CacheHalf + row // 2, CacheRaw + row // 2, slot,
                       LATENT, ROPE, ROPE_BITS, ROPE_OFFSET, ROPE_META, ROPE_GROUPS, ROPE_CODE_BYTES, RANK,
                       GROUP, BLOCK_G, RAW_COLS, RAW_BF16)


def check_writable(layout: RowLayout) -> None:
    """Raises ``ValueError`` for a format the kernel does not write (see the module docstring)."""
    fmt = layout.fmt
    for seg, name in zip(layout.segments, ("latent", "rotary")):
        if seg.rotate:
            raise ValueError(f"{fmt}: the {name} segment is Hadamard-rotated, which the Triton cache write does not "
                             "do (quantized_cache.write_rows does, with a host sync that CUDA graphs cannot capture)")
        if seg.bits == 4 and fmt.group % 2:
            raise ValueError(f"{fmt}: int4 codes in groups of {fmt.group} columns: the Triton cache write packs a "
                             "byte's two codes from one group, so groups of an even size only")


def write_constants(layout: RowLayout, page_size: int, rank: int) -> dict:
    """The kernel's compile-time description of a row (``rank``: vLLM's ``kv_c`` width, where ``k_pe`` starts): the
    row's bytes as the decode kernel reads them (:func:`~vllm_mha2mla.attention.triton_low_bit_decode.segment_constants`;
    a raw segment's scale offset and group count are never read), each segment's code bytes (their even padding is
    written), and the tiles."""
    latent, rope = layout.segments
    return dict(segment_constants(layout), LATENT_CODE_BYTES=latent.code_bytes, ROPE_CODE_BYTES=rope.code_bytes,
                RANK=rank, PAGE=page_size, BLOCK_G=max(2, triton.next_power_of_2(layout.fmt.group)),
                RAW_COLS=RAW_BLOCK, RAW_BF16=layout.dtype == torch.bfloat16, LATENT=layout.latent, ROPE=layout.rope)


def write_low_bit_rows(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                       layout: RowLayout) -> None:
    """Quantise tokens' rows into ``kv_cache`` (uint8 ``[pages, page_size, layout.row_bytes]``) at their slots;
    slots ``< 0`` (vLLM's padding) are left untouched. ``kv_c`` ``[T, kv_lora_rank]`` and ``k_pe`` ``[T, rope]`` or
    ``[T, 1, rope]`` are vLLM's row ``[kv_c | k_pe]``, split into the layout's segments wherever its latent ends.
    Tokens are the first ``len(slot_mapping)`` of ``kv_c``. No host synchronisation (capturable in a CUDA graph)."""
    check_writable(layout)
    if kv_cache.dtype != torch.uint8 or kv_cache.dim() != 3 or kv_cache.shape[-1] != layout.row_bytes:
        raise ValueError(f"a low-bit cache is uint8 [pages, page_size, {layout.row_bytes}], not {kv_cache.dtype} "
                         f"{list(kv_cache.shape)}")
    if kv_cache.stride(-1) != 1 or kv_cache.stride(1) % 2 or kv_cache.stride(0) % 2:
        raise ValueError("the cache's rows must be contiguous bytes at even strides")
    k_pe = k_pe.reshape(k_pe.shape[0], -1)
    if kv_c.shape[-1] + k_pe.shape[-1] != layout.latent + layout.rope or kv_c.shape[-1] < 1:
        raise ValueError(f"rows of {kv_c.shape[-1]} + {k_pe.shape[-1]} values do not fit a layout of "
                         f"{layout.latent} + {layout.rope}")
    tokens = slot_mapping.numel()
    if tokens == 0:
        return
    if kv_c.shape[0] < tokens or k_pe.shape[0] < tokens:
        raise ValueError(f"{tokens} slots for {kv_c.shape[0]} tokens")
    kv_c = kv_c if kv_c.stride(-1) == 1 else kv_c.contiguous()
    k_pe = k_pe if k_pe.stride(-1) == 1 or k_pe.shape[-1] == 0 else k_pe.contiguous()
    if k_pe.shape[-1] == 0:
        k_pe = kv_c  # never read: every column of the row is in kv_c
    _low_bit_write_kernel[(tokens,)](
        kv_c, kv_c.stride(0), k_pe, k_pe.stride(0), slot_mapping.reshape(-1),
        kv_cache, kv_cache.view(torch.float16), kv_cache.view(torch.int16), kv_cache.stride(0), kv_cache.stride(1),
        **write_constants(layout, kv_cache.shape[1], kv_c.shape[-1]),
        num_warps=1, enable_fp_fusion=False,  # no contraction into fused multiply-adds: every rounding as torch's
    )

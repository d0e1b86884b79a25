"""Paged MLA decode over a low-bit latent cache (issue 33), in Triton: the rows are dequantised in registers.

The cache is uint8 ``[pages, page_size, row_bytes]`` in the byte layout of
:class:`~conversion.mla_format.cache_rows.RowLayout` (int4 or int8 codes per group of columns, a float16 scale and
minimum per group, the rotary keys quantised too or kept in a 2-byte float). The kernel is the split kernel of
:mod:`~vllm_mha2mla.attention.triton_decode` with another tile loader: it reads a tile's codes, its groups' scales
and minima, forms ``code · scale + minimum`` in float32 and multiplies in the queries' dtype (bf16 on a GPU), so the
bytes moved per token are the row's (4.5 bits a latent value at int4 in groups of 64) and nothing is dequantised
into memory. Same launch plan (tiles, latent blocks, splits), same merge kernel, same CUDA-graph property: the grid
depends on the batch and the plan only, rows of length 0 give output 0 and log-sum-exp -inf.

A Hadamard-rotated segment (``CacheQuant.hadamard`` / ``rope_hadamard``) is read in its stored basis: the query's
segment is rotated once (``(qH)·(kH) = q·k``) and the output rotated back once, outside the loop.

The PyTorch reference is :func:`vllm_mha2mla.attention.quantized_cache.paged_decode` (tested equal in Triton's
interpreter); speed is measured on the GPU by ``benchmarks.kernels.low_bit_decode``.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from conversion.mla_format.cache_quant import hadamard
from conversion.mla_format.cache_rows import RowLayout, Segment
from vllm_mha2mla.attention.triton_decode import (
    SHARED_MEMORY_BUDGET, SHARED_MEMORY_MARGIN, DecodeLaunch, _query_blocks, _row_columns, _softmax_fold,
    _split_range, _store_blocks, device_shared_memory, merge_splits, plan_launch, shared_memory_bytes,
    split_kernel_constants,
)


@triton.jit
def _dequantize_tile(row_bytes, row_meta, row_raw, pos_ok, BASE: tl.constexpr, WIDTH: tl.constexpr,
                     LIMIT: tl.constexpr, BITS: tl.constexpr, GROUPS: tl.constexpr, GROUP: tl.constexpr, like):
    """Columns ``[BASE, BASE + WIDTH)`` of a segment (those at ``LIMIT`` or past it, and rows not in ``pos_ok``,
    read as 0) for rows whose segment starts at ``row_bytes`` (uint8 pointers ``[BLOCK_N, 1]``), whose scales start
    at ``row_meta`` (float16 pointers) and whose raw values start at ``row_raw`` (the 2-byte float's pointers,
    ``BITS`` 0), in ``like``'s dtype.

    Registers are what bounds this kernel (the float32 accumulators of every head), so a tile is formed with as
    little as possible beside it: int4 codes are loaded a byte per two columns and split into nibbles in registers
    (``tl.join`` interleaves them back into column order: the even column in the low nibble), and where the tile
    holds whole groups each group's scale and minimum are loaded once and broadcast over its columns, rather than
    loaded per column."""
    columns = BASE + tl.arange(0, WIDTH)
    ok = pos_ok[:, None] & (columns[None, :] < LIMIT)
    if BITS == 0:
        values = tl.load(row_raw + columns[None, :], mask=ok, other=0.0).to(tl.float32)
    else:
        if BITS == 4:
            pairs = BASE // 2 + tl.arange(0, WIDTH // 2)
            packed = tl.load(row_bytes + pairs[None, :], mask=pos_ok[:, None] & (2 * pairs[None, :] < LIMIT),
                             other=0).to(tl.int32)
            codes = tl.join(packed & 15, packed >> 4).reshape(packed.shape[0], WIDTH)
        else:
            codes = tl.load(row_bytes + columns[None, :], mask=ok, other=0).to(tl.int32)
        if WIDTH % GROUP == 0 and BASE % GROUP == 0:  # whole groups: one scale and minimum each
            groups = BASE // GROUP + tl.arange(0, WIDTH // GROUP)
            group_ok = pos_ok[:, None] & (groups[None, :] < GROUPS)
            scale = tl.load(row_meta + groups[None, :], mask=group_ok, other=0.0).to(tl.float32)
            minimum = tl.load(row_meta + GROUPS + groups[None, :], mask=group_ok, other=0.0).to(tl.float32)
            grouped = codes.reshape(codes.shape[0], WIDTH // GROUP, GROUP).to(tl.float32)
            values = (grouped * scale[:, :, None] + minimum[:, :, None]).reshape(codes.shape[0], WIDTH)
        else:  # a tile narrower than a group, or one that starts inside one: per column
            group = (columns // GROUP)[None, :]
            scale = tl.load(row_meta + group, mask=ok, other=0.0).to(tl.float32)
            minimum = tl.load(row_meta + GROUPS + group, mask=ok, other=0.0).to(tl.float32)
            values = codes.to(tl.float32) * scale + minimum
        values = tl.where(ok, values, 0.0)
    return values.to(like.dtype)


@triton.jit
def _low_bit_decode_split_kernel(
    Q, stride_qb, stride_qh,
    KVBytes, KVHalf, KVRaw, stride_kv_page, stride_kv_tok,
    BlockTable, stride_bt,
    SeqLens,
    Partial, stride_pb, stride_ph, stride_ps,
    sm_scale,
    num_heads,
    num_splits,
    LATENT: tl.constexpr, ROPE: tl.constexpr,
    NUM_BLOCKS: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    GROUP: tl.constexpr, LATENT_BITS: tl.constexpr, LATENT_META: tl.constexpr, LATENT_GROUPS: tl.constexpr,
    ROPE_BITS: tl.constexpr, ROPE_OFFSET: tl.constexpr, ROPE_META: tl.constexpr, ROPE_GROUPS: tl.constexpr,
):
    """Program (head group, request, split), as ``_mla_decode_split_kernel``: the latent blocks and the rotary
    slice of each tile of rows are dequantised from the row's bytes (``*_BITS`` 0: a raw 2-byte segment), scored
    against the head group's queries, and the latent blocks are the values. Byte offsets within a row:
    latent codes at 0, its scales at ``LATENT_META``; the rotary segment at ``ROPE_OFFSET``, its scales at
    ``ROPE_META`` (all even, so ``KVHalf`` / ``KVRaw``, the cache's 2-byte views, index them at half)."""
    head_group = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)

    heads = head_group * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads[:, None] < num_heads
    offs_0, offs_1, offs_2, offs_r, ok_0, ok_1, ok_2, ok_r = _row_columns(LATENT, ROPE, C0, C1, C2, BLOCK_R)
    q_0, q_1, q_2, q_r = _query_blocks(Q, stride_qb, stride_qh, b, heads, head_ok, offs_0, offs_1, offs_2, offs_r,
                                       ok_0, ok_1, ok_2, ok_r, NUM_BLOCKS, False)

    start, end = _split_range(SeqLens, b, split, num_splits)
    table_row = BlockTable + b * stride_bt

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc_0 = tl.zeros([BLOCK_H, C0], dtype=tl.float32)
    acc_1 = tl.zeros([BLOCK_H, C1], dtype=tl.float32)
    acc_2 = tl.zeros([BLOCK_H, C2], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pos_ok = pos < end
        page = tl.load(table_row + pos // PAGE, mask=pos_ok, other=0)
        row = (page.to(tl.int64) * stride_kv_page + (pos % PAGE) * stride_kv_tok)[:, None]  # bytes
        latent_bytes = KVBytes + row
        latent_meta = KVHalf + (row + LATENT_META) // 2
        latent_raw = KVRaw + row // 2
        rope_bytes = KVBytes + row + ROPE_OFFSET
        rope_meta = KVHalf + (row + ROPE_META) // 2
        rope_raw = KVRaw + (row + ROPE_OFFSET) // 2
        kv_0 = _dequantize_tile(latent_bytes, latent_meta, latent_raw, pos_ok, 0, C0, LATENT,
                                LATENT_BITS, LATENT_GROUPS, GROUP, q_0)
        kv_r = _dequantize_tile(rope_bytes, rope_meta, rope_raw, pos_ok, 0, BLOCK_R, ROPE,
                                ROPE_BITS, ROPE_GROUPS, GROUP, q_r)
        scores = tl.dot(q_0, tl.trans(kv_0)) + tl.dot(q_r, tl.trans(kv_r))
        if NUM_BLOCKS > 1:
            kv_1 = _dequantize_tile(latent_bytes, latent_meta, latent_raw, pos_ok, C0, C1, LATENT,
                                    LATENT_BITS, LATENT_GROUPS, GROUP, q_1)
            scores += tl.dot(q_1, tl.trans(kv_1))
        if NUM_BLOCKS > 2:
            kv_2 = _dequantize_tile(latent_bytes, latent_meta, latent_raw, pos_ok, C0 + C1, C2, LATENT,
                                    LATENT_BITS, LATENT_GROUPS, GROUP, q_2)
            scores += tl.dot(q_2, tl.trans(kv_2))
        p, alpha, m_i, l_i = _softmax_fold(scores * sm_scale, pos_ok, m_i, l_i)
        p = p.to(kv_0.dtype)
        acc_0 = acc_0 * alpha[:, None] + tl.dot(p, kv_0)
        if NUM_BLOCKS > 1:
            acc_1 = acc_1 * alpha[:, None] + tl.dot(p, kv_1)
        if NUM_BLOCKS > 2:
            acc_2 = acc_2 * alpha[:, None] + tl.dot(p, kv_2)

    out_rows = Partial + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    _store_blocks(out_rows, acc_0, acc_1, acc_2, (1.0 / safe_l)[:, None], head_ok, offs_0, offs_1, offs_2,
                  ok_0, ok_1, ok_2, NUM_BLOCKS)
    lse = tl.where(end > start, m_i + tl.log(safe_l), float("-inf"))
    tl.store(Partial + b * stride_pb + heads * stride_ph + split * stride_ps + LATENT, lse, mask=heads < num_heads)


def segment_constants(layout: RowLayout) -> dict:
    """The kernel's compile-time description of a row's bytes: bits (0 = raw), byte offsets and group counts."""
    latent, rope = layout.segments

    def bits(seg: Segment) -> int:
        return 0 if seg.bits is None else seg.bits

    return dict(GROUP=layout.fmt.group, LATENT_BITS=bits(latent), LATENT_META=latent.offset + latent.code_bytes,
                LATENT_GROUPS=max(1, latent.groups), ROPE_BITS=bits(rope), ROPE_OFFSET=rope.offset,
                ROPE_META=rope.offset + rope.code_bytes, ROPE_GROUPS=max(1, rope.groups))


def low_bit_decode_constants(plan: DecodeLaunch, layout: RowLayout, page: int) -> dict:
    """The low-bit split kernel's compile-time arguments for a launch: the bf16 split kernel's tiles and latent
    blocks (no cache scale, no float16 operands) and the row's bytes (:func:`segment_constants`); what
    :func:`low_bit_paged_decode` passes and what a compile without a GPU reproduces (``compile_sm90 --low-bit``)."""
    constants = split_kernel_constants(plan, layout.latent, layout.rope, page, False, False)
    del constants["SCALED_CACHE"], constants["FP16_OPERANDS"]
    return constants | segment_constants(layout)


LOW_BIT_SHARED_FACTOR = 1.55
"""Shared memory the low-bit kernel asks for, over :func:`shared_memory_bytes`' estimate of the bf16 kernel's tiles:
the dequantised tiles pass through shared memory on their way into the dots' operand layouts. Compiled for sm_90
(``compile_sm90 --low-bit 4,8,64``, Triton 3.9): 1.05x (2,048 + 512, 16 x 16 tiles) to 1.52x (512 + 512 and
256 + 256, 32 heads x 64 rows); 512 + 512 asked for 299,008 bytes at 64 rows, more than an H100's 232,448."""


def plan_low_bit_launch(batch: int, num_heads: int, layout: RowLayout, max_seq_len: int, num_sms: int,
                        shared_memory: int = SHARED_MEMORY_BUDGET) -> DecodeLaunch:
    """The split kernel's plan with the fp8 cache's tiles (a tile converted in registers before the dots, as an
    fp8 one is), with fewer rows a tile where the dequantised tiles would not fit the GPU's shared memory
    (:data:`LOW_BIT_SHARED_FACTOR`); fixed splits per request (the balanced scheduling is not wired for low-bit
    rows yet). Not yet timed on a GPU: ``benchmarks.kernels.low_bit_decode``."""
    plan = plan_launch(batch, num_heads, layout.latent, layout.rope, max_seq_len, num_sms, shared_memory,
                       fp8_cache=True, balanced=False)
    limit = shared_memory + SHARED_MEMORY_MARGIN  # the GPU's own per-block limit: the factor covers the scratch
    block_n = plan.block_n
    while block_n > 16 and LOW_BIT_SHARED_FACTOR * shared_memory_bytes(plan.block_h, block_n, plan.block_c,
                                                                       plan.block_r) > limit:
        block_n //= 2
    return replace(plan, block_n=block_n)


def _rotation(seg: Segment, device: torch.device) -> torch.Tensor | None:
    """The orthonormal matrix a segment is stored rotated by, or None."""
    return hadamard(seg.columns, torch.float32).to(device) if seg.rotate and seg.bits is not None else None


def low_bit_paged_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    layout: RowLayout,
    max_seq_len: int,
    kv_lora_rank: int | None = None,
    num_sms: int | None = None,
    launch: DecodeLaunch | None = None,
    shared_memory: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` ``[B, H, latent + rope]`` over the uint8 cache ``[pages, page_size, layout.row_bytes]`` →
    (``[B, H, kv_lora_rank]`` in ``q``'s dtype, log-sum-exp ``[B, H]`` float32); ``kv_lora_rank`` (the values: the
    first columns of the latent segment) defaults to ``layout.latent``. Arguments as
    :func:`~vllm_mha2mla.attention.triton_decode.mla_paged_decode`'s."""
    batch, num_heads, width = q.shape
    values = layout.latent if kv_lora_rank is None else kv_lora_rank
    if kv_cache.dtype != torch.uint8 or kv_cache.shape[-1] != layout.row_bytes:
        raise ValueError(f"a low-bit cache is uint8 [pages, page_size, {layout.row_bytes}], not {kv_cache.dtype} "
                         f"{list(kv_cache.shape)}")
    if width != layout.latent + layout.rope:
        raise ValueError(f"queries of {width} columns do not match rows of {layout.latent} + {layout.rope}")
    if not 1 <= values <= layout.latent:
        raise ValueError(f"the values are the first {values} columns of the row, which has a latent segment of "
                         f"{layout.latent}: a low-bit row decodes its values from the latent segment only")
    if kv_cache.stride(-1) != 1 or q.stride(-1) != 1 or kv_cache.stride(1) % 2 or kv_cache.stride(0) % 2:
        raise ValueError("the cache's rows must be contiguous bytes at even strides, and the query's last dimension "
                         "contiguous")
    if num_sms is None:
        num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
    if shared_memory is None:
        shared_memory = device_shared_memory(q.device.index or 0) if q.is_cuda else SHARED_MEMORY_BUDGET
    plan = launch or plan_low_bit_launch(batch, num_heads, layout, max_seq_len, num_sms, shared_memory)
    if plan.block_c < layout.latent:
        raise ValueError(f"latent blocks {plan.latent_blocks} cover {plan.block_c} of {layout.latent} latent columns")
    seg_latent, seg_rope = layout.segments
    turn_latent, turn_rope = _rotation(seg_latent, q.device), _rotation(seg_rope, q.device)
    if turn_latent is not None or turn_rope is not None:
        parts = [q[..., :layout.latent], q[..., layout.latent:]]
        for i, turn in enumerate((turn_latent, turn_rope)):
            if turn is not None:
                parts[i] = (parts[i].float() @ turn).to(q.dtype)
        q = torch.cat(parts, dim=-1)
    q = q.contiguous()

    partial = torch.empty(batch, num_heads, plan.num_splits, layout.latent + 1, dtype=torch.float32, device=q.device)
    _low_bit_decode_split_kernel[plan.grid(batch, num_heads)](
        q, q.stride(0), q.stride(1),
        kv_cache, kv_cache.view(torch.float16), kv_cache.view(layout.dtype), kv_cache.stride(0), kv_cache.stride(1),
        block_table, block_table.stride(0),
        seq_lens,
        partial, partial.stride(0), partial.stride(1), partial.stride(2),
        scale,
        num_heads,
        plan.num_splits,
        **low_bit_decode_constants(plan, layout, kv_cache.shape[1]),
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    out, lse = merge_splits(partial, torch.float32 if turn_latent is not None else q.dtype)
    if turn_latent is not None:
        out = (out @ turn_latent.T).to(q.dtype)
    return out[..., :values].contiguous() if values < layout.latent else out, lse

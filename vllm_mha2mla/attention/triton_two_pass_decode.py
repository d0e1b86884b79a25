"""Paged MLA decode in two passes, for latents too wide for one program's accumulators.

Why: the one-pass kernel (:mod:`triton_decode`) keeps, per program, ``heads × latent`` float32
accumulators in registers. At the paper's widest Llama-2-7B row (2,048 latent + 512 rotary values,
32 heads) that is 256 KiB — a whole multiprocessor's register file — so it runs in 16-head groups of
16-row tiles with spills and reads the cache at ~0.76 TB/s, a third of what the 576-value row reaches
(benchmarks/results/h100-paper-rows/). Splitting the output columns over programs that each recompute
the scores multiplies the score work and the L2 reads by the number of slices.

Two passes instead, each with the tile shapes the narrow rows run well at:

1. *scores*: program (head group, request, split) reads every cached row ``[latent | k_pe]`` once and
   computes the scores of its heads, a tile at a time, as a matrix product over the row in column
   chunks (so tiles of 64–128 rows fit shared memory whatever the width); it keeps only the online
   softmax's running max and sum, and writes each tile's probabilities ``exp(s − m_running)`` (in the
   dot operands' dtype, the precision the one-pass kernel multiplies them in) and the running max they
   were taken against.
2. *values*: program (latent slice × head group, request, split) reads the probabilities of its
   split, rescales each tile to the split's final max, and multiplies them by its slice of the
   latent: ``heads × slice`` accumulators (32 × 512, the native row's) and each latent column read
   once over all programs.

The cache is read once for scores and once (the latent part) for values: ~1.8× the bytes of one
pass at 2,048 + 512, traded for no spills and full tiles; the probabilities add 2 bytes per head per
cached token (1.25% of a 2,560-value bf16 row at 32 heads). The splits are merged with the one-pass
kernel's merge. Which rows this pays for is measured on a GPU
(``python -m benchmarks.kernels.decode_tiles two-pass``); until then the GPU backend keeps the one-pass
kernel unless ``MHA2MLA_GPU_DECODE=two-pass`` asks for this one (:func:`gpu_decode_kernel`).

CUDA graphs: the grid and the scratch sizes depend on the batch size, the head count, ``max_seq_len``
and the plan only; splits are aligned to the score tile and read their range from ``seq_lens`` on
the device, as in the one-pass kernel.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vllm_mha2mla.attention.triton_decode import (
    ACC_REGISTER_BUDGET, SHARED_MEMORY_BUDGET, _paged_rows, _softmax_fold, _split_range, check_decode_inputs,
    merge_splits, shared_memory_bytes, split_count)

GPU_DECODE_ENV = "MHA2MLA_GPU_DECODE"
"""Which kernel the GPU backend decodes bf16/fp8 caches with: ``one-pass`` (default) or ``two-pass``."""
GPU_DECODE_KERNELS = ("one-pass", "two-pass")

MAX_VALUE_SLICE = 512
"""Widest latent slice a values program accumulates: 32 heads × 512 float32 columns fill the
one-pass kernel's register budget, the native 576 row's shape."""


def gpu_decode_kernel(environ: Mapping[str, str] = os.environ) -> str:
    """The decode kernel ``MHA2MLA_GPU_DECODE`` asks the GPU backend for (bf16 and fp8 caches; a low-bit cache has
    its own kernel). ``one-pass`` until a GPU measurement makes a rule of where ``two-pass`` wins; setting it lets an
    engine be timed with the two-pass decode before then. Anything else is refused, naming the choices."""
    kernel = environ.get(GPU_DECODE_ENV, "one-pass")
    if kernel not in GPU_DECODE_KERNELS:
        raise ValueError(f"{GPU_DECODE_ENV}={kernel!r}: choose one of {', '.join(GPU_DECODE_KERNELS)}")
    return kernel


@dataclass(frozen=True)
class TwoPassLaunch:
    """Tiles of both passes and the split count (a pure function of the shapes)."""

    score_heads: int
    score_rows: int
    score_chunk: int
    """Row columns per step of the scores' product: what shared memory holds of a tile."""
    score_warps: int
    value_slice: int
    value_heads: int
    value_rows: int
    value_warps: int
    num_splits: int
    scores_rows_as_m: bool = False
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("score_heads", "score_rows", "score_chunk", "value_slice", "value_heads", "value_rows"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"{name} must be a power of two of at least 16, not {size}")
        if self.num_splits < 1:
            raise ValueError(f"num_splits must be positive, not {self.num_splits}")
        if self.value_rows > self.score_rows:
            raise ValueError(f"value_rows {self.value_rows} must not exceed score_rows {self.score_rows}: a values "
                             "tile rescales its probabilities by one score tile's running max")

    def num_slices(self, latent: int) -> int:
        """Values programs per (head group, request, split): the latent's slices."""
        return triton.cdiv(latent, self.value_slice)

    def score_tiles(self, max_seq_len: int) -> int:
        """Score tiles of the longest request: the running maxes kept per (request, head)."""
        return max(1, triton.cdiv(max_seq_len, self.score_rows))


def value_heads_for(value_slice: int, num_heads: int) -> int:
    """Heads a values program takes for a latent slice: as many as fill the one-pass kernel's accumulator
    budget (``ACC_REGISTER_BUDGET`` float32 values), no more than the model has (a power of two of them,
    at least the MMA's 16) nor 64."""
    return max(16, min(ACC_REGISTER_BUDGET // value_slice, triton.next_power_of_2(num_heads), 64))


def plan_two_pass(batch: int, num_heads: int, latent: int, rope: int, max_seq_len: int, num_sms: int,
                  shared_memory: int | None = None) -> TwoPassLaunch:
    """A starting point for both passes, to be replaced by what the GPU sweep measures:

    - scores: every head of up to 64 in one group (each row read by one program), 64 rows per tile as
      the products' M (Hopper's warp-group MMA; compiled for sm_90: 96 registers, no spills), the row in
      64-column chunks, 4 warps;
    - values: the native row's accumulator shape, 512 latent columns × 32 heads (narrower latents: one
      slice of their padded width, heads to fill the same budget), 32 rows per tile, 8 warps (compiled
      for sm_90: 183 registers, no spills; 64 rows spilled);
    - splits: as the one-pass plan (:func:`~triton_decode.split_count`).

    A GPU whose shared memory (``shared_memory`` bytes; None: an H100's budget) cannot hold a stage of the
    chunks is refused here, with the sizes."""
    shared_memory = SHARED_MEMORY_BUDGET if shared_memory is None else shared_memory
    score_heads = max(16, min(64, triton.next_power_of_2(num_heads)))
    score_rows, score_chunk = 64, 64
    need = shared_memory_bytes(score_heads, score_rows, score_chunk, 0) * 2  # two pipeline stages
    if need > shared_memory:
        raise ValueError(f"two-pass scores of {latent} latent + {rope} rotary values need {need} bytes of shared "
                         f"memory ({score_heads} heads x {score_rows} rows x {score_chunk} columns, two stages); "
                         f"this GPU allows {shared_memory}")
    value_slice = min(MAX_VALUE_SLICE, max(16, triton.next_power_of_2(latent)))
    value_heads = value_heads_for(value_slice, num_heads)
    num_splits = split_count(triton.cdiv(num_heads, score_heads) * batch, max_seq_len, num_sms)
    return TwoPassLaunch(score_heads=score_heads, score_rows=score_rows, score_chunk=score_chunk, score_warps=4,
                         scores_rows_as_m=True, value_slice=value_slice, value_heads=value_heads, value_rows=32,
                         value_warps=8, num_splits=num_splits)


@triton.jit
def _mla_scores_kernel(
    Q, stride_qb, stride_qh,
    KV, stride_kv_page, stride_kv_tok,
    BlockTable, stride_bt,
    SeqLens,
    Probs, stride_pb, stride_ph,
    TileMax, stride_tb, stride_th,
    Stats, stride_sb, stride_sh, stride_ss,
    KScale,
    sm_scale,
    num_heads,
    num_splits,
    WIDTH: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ROWS_AS_M: tl.constexpr, PAGE: tl.constexpr, SCALED_CACHE: tl.constexpr, FP16_OPERANDS: tl.constexpr,
):
    """Program (head group, request, split): the online softmax's running max and sum over the split's
    rows, each tile's ``exp(s − m_running)`` into ``Probs`` and ``m_running`` into ``TileMax``; the split's
    final max and sum into ``Stats``.

    A tile's scores are a small matrix product over the row's ``WIDTH`` columns in chunks of ``BLOCK_K``
    (query chunk × row chunk), so shared memory holds chunks, not whole 2,560-value rows, and a tile can
    have 64–128 rows. ``ROWS_AS_M``: the product as rows × heads (the rows are the MMA's M, which Hopper's
    warp-group MMA wants ≥ 64) instead of heads × rows."""
    head_group = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)
    heads = head_group * BLOCK_H + tl.arange(0, BLOCK_H)
    head_in = heads < num_heads
    head_ok = head_in[:, None]
    start, end = _split_range(SeqLens, b, split, num_splits, BLOCK_N)  # a token's tile: position // BLOCK_N
    b = b.to(tl.int64)  # the scratch's request offsets pass 2**31 at long contexts (256 × 32 heads × 256K)
    qk_scale = sm_scale
    if SCALED_CACHE:
        qk_scale = sm_scale * tl.load(KScale)
    q_rows = Q + b * stride_qb + heads[:, None] * stride_qh
    table_row = BlockTable + b * stride_bt
    prob_rows = Probs + b * stride_pb + heads[:, None] * stride_ph
    max_rows = TileMax + b * stride_tb + heads * stride_th
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pos_ok = pos < end
        row = _paged_rows(KV, table_row, pos, pos_ok, stride_kv_page, stride_kv_tok, PAGE)
        scores = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
        scores_t = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
        for k0 in range(0, WIDTH, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols[None, :] < WIDTH
            q = tl.load(q_rows + cols[None, :], mask=head_ok & col_ok, other=0.0)
            kv = tl.load(row + cols[None, :], mask=pos_ok[:, None] & col_ok, other=0.0)
            if FP16_OPERANDS:  # fp8 cache: float16 products, as the one-pass kernel's
                q = q.to(tl.float16)
            kv = kv.to(q.dtype)
            if ROWS_AS_M:
                scores_t += tl.dot(kv, tl.trans(q))
            else:
                scores += tl.dot(q, tl.trans(kv))
        if ROWS_AS_M:
            scores = tl.trans(scores_t)
        p, alpha, m_i, l_i = _softmax_fold(scores * qk_scale, pos_ok, m_i, l_i)
        tl.store(prob_rows + pos[None, :], p.to(Probs.dtype.element_ty), mask=head_ok & pos_ok[None, :])
        tl.store(max_rows + n0 // BLOCK_N, m_i, mask=head_in)
    stats = Stats + b * stride_sb + heads * stride_sh + split * stride_ss
    tl.store(stats, m_i, mask=head_in)
    tl.store(stats + 1, l_i, mask=head_in)


@triton.jit
def _mla_values_kernel(
    KV, stride_kv_page, stride_kv_tok,
    BlockTable, stride_bt,
    SeqLens,
    Probs, stride_pb, stride_ph,
    TileMax, stride_tb, stride_th,
    Stats, stride_sb, stride_sh, stride_ss,
    Partial, stride_xb, stride_xh, stride_xs,
    KScale,
    num_heads,
    num_splits,
    num_head_groups,
    LATENT: tl.constexpr, SLICE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    SCORE_TILE: tl.constexpr, PAGE: tl.constexpr, SCALED_CACHE: tl.constexpr,
):
    """Program (latent slice × head group, request, split): the split's probabilities, each rescaled from
    its tile's running max to the split's final one, times the slice's latent columns; the normalised
    partial output and (slice 0) its log-sum-exp into ``Partial`` for the merge."""
    column_slice = tl.program_id(0) // num_head_groups
    head_group = tl.program_id(0) % num_head_groups
    b = tl.program_id(1)
    split = tl.program_id(2)
    heads = head_group * BLOCK_H + tl.arange(0, BLOCK_H)
    head_in = heads < num_heads
    head_ok = head_in[:, None]
    cols = column_slice * SLICE + tl.arange(0, SLICE)
    col_ok = cols[None, :] < LATENT
    start, end = _split_range(SeqLens, b, split, num_splits, SCORE_TILE)
    b = b.to(tl.int64)  # the scratch's request offsets pass 2**31 at long contexts
    stats = Stats + b * stride_sb + heads * stride_sh + split * stride_ss
    m_f = tl.load(stats, mask=head_in, other=0.0)
    l_f = tl.load(stats + 1, mask=head_in, other=0.0)
    operand = Probs.dtype.element_ty  # the dot operands' dtype: float16 for an fp8 cache (as the scores')
    table_row = BlockTable + b * stride_bt
    prob_rows = Probs + b * stride_pb + heads[:, None] * stride_ph
    max_rows = TileMax + b * stride_tb + heads * stride_th
    acc = tl.zeros([BLOCK_H, SLICE], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):  # BLOCK_N divides SCORE_TILE: a tile lies in one score tile
        pos = n0 + tl.arange(0, BLOCK_N)
        pos_ok = pos < end
        p = tl.load(prob_rows + pos[None, :], mask=head_ok & pos_ok[None, :], other=0.0).to(tl.float32)
        tile_max = tl.load(max_rows + n0 // SCORE_TILE, mask=head_in, other=0.0)
        rescale = tl.where(head_in, tl.exp(tile_max - m_f), 0.0)
        p = (p * rescale[:, None]).to(operand)
        row = _paged_rows(KV, table_row, pos, pos_ok, stride_kv_page, stride_kv_tok, PAGE)
        values = tl.load(row + cols[None, :], mask=pos_ok[:, None] & col_ok, other=0.0).to(operand)
        acc += tl.dot(p, values)
    k_scale = 1.0
    if SCALED_CACHE:
        k_scale = tl.load(KScale)
    safe_l = tl.where(l_f > 0, l_f, 1.0)
    out_rows = Partial + b * stride_xb + heads[:, None] * stride_xh + split * stride_xs
    tl.store(out_rows + cols[None, :], acc * (k_scale / safe_l)[:, None], mask=head_ok & col_ok)
    if column_slice == 0:
        lse = tl.where(end > start, m_f + tl.log(safe_l), float("-inf"))
        tl.store(Partial + b * stride_xb + heads * stride_xh + split * stride_xs + LATENT, lse, mask=head_in)


def score_kernel_constants(plan: TwoPassLaunch, width: int, page: int, scaled_cache: bool, fp8_cache: bool) -> dict:
    """The scores kernel's compile-time arguments for rows of ``width`` values."""
    return dict(WIDTH=width, BLOCK_H=plan.score_heads, BLOCK_N=plan.score_rows, BLOCK_K=plan.score_chunk,
                ROWS_AS_M=plan.scores_rows_as_m, PAGE=page, SCALED_CACHE=scaled_cache, FP16_OPERANDS=fp8_cache)


def value_kernel_constants(plan: TwoPassLaunch, latent: int, page: int, scaled_cache: bool) -> dict:
    """The values kernel's compile-time arguments."""
    return dict(LATENT=latent, SLICE=plan.value_slice, BLOCK_H=plan.value_heads, BLOCK_N=plan.value_rows,
                SCORE_TILE=plan.score_rows, PAGE=page, SCALED_CACHE=scaled_cache)


def two_pass_paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                          seq_lens: torch.Tensor, scale: float, kv_lora_rank: int, max_seq_len: int,
                          plan: TwoPassLaunch, k_scale: torch.Tensor | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` ``[B, H, C+R]`` over the paged cache ``[pages, page_size, C+R]`` → (``[B, H, C]``, lse ``[B, H]``),
    as :func:`triton_decode.mla_paged_decode` computes it, in two passes planned by ``plan``.

    ``max_seq_len`` bounds every request's length (it sizes the probabilities' scratch: ``B × H ×
    max_seq_len`` values in the operands' dtype)."""
    batch, num_heads, width = q.shape
    check_decode_inputs(q, kv_cache)
    if not 0 < kv_lora_rank <= width:
        raise ValueError(f"kv_lora_rank {kv_lora_rank} must lie in 1..{width} (the row's values)")
    fp8_cache = kv_cache.element_size() == 1
    scaled = k_scale is not None
    operand = torch.float16 if fp8_cache else q.dtype
    probs = torch.empty(batch, num_heads, max(1, max_seq_len), dtype=operand, device=q.device)
    tile_max = torch.empty(batch, num_heads, plan.score_tiles(max_seq_len), dtype=torch.float32, device=q.device)
    stats = torch.empty(batch, num_heads, plan.num_splits, 2, dtype=torch.float32, device=q.device)
    partial = torch.empty(batch, num_heads, plan.num_splits, kv_lora_rank + 1, dtype=torch.float32, device=q.device)
    cache_scale = k_scale if scaled else seq_lens
    page = kv_cache.shape[1]
    _mla_scores_kernel[(triton.cdiv(num_heads, plan.score_heads), batch, plan.num_splits)](
        q, q.stride(0), q.stride(1),
        kv_cache, kv_cache.stride(0), kv_cache.stride(1),
        block_table, block_table.stride(0),
        seq_lens,
        probs, probs.stride(0), probs.stride(1),
        tile_max, tile_max.stride(0), tile_max.stride(1),
        stats, stats.stride(0), stats.stride(1), stats.stride(2),
        cache_scale,
        scale,
        num_heads,
        plan.num_splits,
        **score_kernel_constants(plan, width, page, scaled, fp8_cache),
        num_warps=plan.score_warps, num_stages=plan.num_stages,
    )
    head_groups = triton.cdiv(num_heads, plan.value_heads)
    _mla_values_kernel[(plan.num_slices(kv_lora_rank) * head_groups, batch, plan.num_splits)](
        kv_cache, kv_cache.stride(0), kv_cache.stride(1),
        block_table, block_table.stride(0),
        seq_lens,
        probs, probs.stride(0), probs.stride(1),
        tile_max, tile_max.stride(0), tile_max.stride(1),
        stats, stats.stride(0), stats.stride(1), stats.stride(2),
        partial, partial.stride(0), partial.stride(1), partial.stride(2),
        cache_scale,
        num_heads,
        plan.num_splits,
        head_groups,
        **value_kernel_constants(plan, kv_lora_rank, page, scaled),
        num_warps=plan.value_warps, num_stages=plan.num_stages,
    )
    return merge_splits(partial, q.dtype)

"""Paged MLA decode for any ``(kv_lora_rank, qk_rope_head_dim)``: this project's Triton kernel.

Decode with absorbed weights is multi-query attention: every query head scores the same
cached row ``[latent (C) | k_pe (R)]`` and reads the latent back as its value. The cost is
reading the cache, so a program takes a *group of heads* (up to 64, as many as fit its
registers) and a slice of one request's tokens, loads each tile of cached rows once
(following the block table) and uses it for all heads of the group: scores and values come
from the same load. Long sequences are split over several programs (flash-decoding); a
second kernel merges the splits with their log-sum-exp.

Head groups of one request run next to each other (program axis 0), so when the heads do
not fit one group the second group's reads of the same rows hit L2.

Why not vLLM's ``decode_attention_fwd``: its MLA path assumes the 512 + 64 split of
DeepSeek and head groups of 16; MHA2MLA latents range from ~100 to 2,500 values with rotary
slots from 8 to 512. Both widths here are arbitrary (padded to powers of two and masked).

CUDA graphs: the grid depends only on the batch size, the head count and ``num_splits``;
each program derives its token range from ``seq_lens`` on the device, so a captured graph
stays correct for any sequence lengths.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

ACC_REGISTER_BUDGET = 16384
"""Max ``BLOCK_H × BLOCK_C`` float32 accumulator elements per program (fits 8 warps without spills)."""
MIN_TOKENS_PER_SPLIT = 1024
"""Shorter splits lose more to the merge and per-split setup than they gain (measured: 8 splits of
~1K tokens beat 16 and 32 at 16–32 requests of 8K)."""
PROGRAMS_PER_SM = 8
"""Split long sequences until about this many programs per multiprocessor: with one program per
(request, head group), a few hundred long requests leave a ragged last wave. Measured on an H200
(benchmarks/results/h200-decode-splits/): at 310 × 8.7K tokens of 576 values 4 splits run 1.48×
faster than 1 (1.39 → 2.05 TB/s); 8 splits 1.11× at 212 × 8.7K of 1024 values."""
SHARED_MEMORY_BUDGET = 200 * 1024
"""Bytes of shared memory a program may use: H100/H200 allow 227 KiB per block; the margin
covers Triton's own scratch."""


def shared_memory_bytes(block_h: int, block_n: int, block_c: int, block_r: int, element_bytes: int = 2) -> int:
    """What the split kernel keeps in shared memory: one tile of ``block_n`` cached rows and the
    head group's query, both ``block_c + block_r`` wide (matches Triton's report to ~1%)."""
    return element_bytes * (block_n + block_h) * (block_c + block_r)


@dataclass(frozen=True)
class DecodeLaunch:
    """Tile sizes and split count for one decode call (pure function of the shapes)."""

    block_h: int
    block_n: int
    block_c: int
    block_r: int
    num_warps: int
    num_stages: int
    num_splits: int

    def grid(self, batch: int, num_heads: int) -> tuple[int, int, int]:
        return (triton.cdiv(num_heads, self.block_h), batch, self.num_splits)


def plan_launch(batch: int, num_heads: int, latent: int, rope: int, max_seq_len: int,
                num_sms: int) -> DecodeLaunch:
    """Tiles that keep the float32 accumulator in registers, and enough splits to fill the GPU."""
    block_c = max(16, triton.next_power_of_2(latent))
    block_r = max(16, triton.next_power_of_2(max(rope, 1)))
    fit = max(16, ACC_REGISTER_BUDGET // block_c)
    if block_c == 1024:
        # Measured on an H200 (benchmarks/results/h200-layer-widths/sweep.json): one 32-head group
        # beats two 16-head groups by 11-20% for latents of 640-896 (each row is read once).
        fit = 32
    block_h = max(16, min(64, triton.next_power_of_2(num_heads), fit))
    wide = block_c + block_r >= 1024  # measured on H100 (benchmarks/results/h100-anyshape)
    block_n = 64 if wide else 32
    while block_n > 16 and shared_memory_bytes(block_h, block_n, block_c, block_r) > SHARED_MEMORY_BUDGET:
        block_n //= 2  # very wide rows (latent ~900 + rope 512): fewer rows per tile
    num_warps = 8 if wide else 4
    programs = triton.cdiv(num_heads, block_h) * batch
    want = triton.next_power_of_2(max(1, triton.cdiv(PROGRAMS_PER_SM * num_sms, programs)))
    by_length = 1 << (max(1, max_seq_len // MIN_TOKENS_PER_SPLIT).bit_length() - 1)  # at least MIN tokens a split
    num_splits = max(1, min(want, by_length, 64))
    return DecodeLaunch(block_h, block_n, block_c, block_r, num_warps, 2, num_splits)


@triton.jit
def _mla_decode_split_kernel(
    Q, stride_qb, stride_qh,
    KV, stride_kv_page, stride_kv_tok,
    BlockTable, stride_bt,
    SeqLens,
    Partial, stride_pb, stride_ph, stride_ps,
    KScale,
    sm_scale,
    num_heads,
    num_splits,
    LATENT: tl.constexpr, ROPE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr, SCALED_CACHE: tl.constexpr,
):
    head_group = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)

    heads = head_group * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < num_heads
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    c_ok = offs_c < LATENT
    r_ok = offs_r < ROPE

    q_rows = Q + b * stride_qb + heads[:, None] * stride_qh
    q_c = tl.load(q_rows + offs_c[None, :], mask=head_ok[:, None] & c_ok[None, :], other=0.0)
    q_r = tl.load(q_rows + LATENT + offs_r[None, :], mask=head_ok[:, None] & r_ok[None, :], other=0.0)

    seq_len = tl.load(SeqLens + b)
    split_len = tl.cdiv(seq_len, num_splits)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    if SCALED_CACHE:
        k_scale = tl.load(KScale)

    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pos_ok = pos < end
        page = tl.load(BlockTable + b * stride_bt + pos // PAGE, mask=pos_ok, other=0)
        row = KV + page.to(tl.int64) * stride_kv_page + (pos % PAGE) * stride_kv_tok
        kv_c = tl.load(row[:, None] + offs_c[None, :], mask=pos_ok[:, None] & c_ok[None, :], other=0.0)
        kv_r = tl.load(row[:, None] + LATENT + offs_r[None, :], mask=pos_ok[:, None] & r_ok[None, :], other=0.0)
        if SCALED_CACHE:  # fp8 cache: dequantise on load, compute in the query's dtype
            kv_c = (kv_c.to(tl.float32) * k_scale).to(q_c.dtype)
            kv_r = (kv_r.to(tl.float32) * k_scale).to(q_r.dtype)
        scores = tl.dot(q_c, tl.trans(kv_c)) + tl.dot(q_r, tl.trans(kv_r))
        scores = tl.where(pos_ok[None, :], scores * sm_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv_c.dtype), kv_c)
        m_i = m_new

    out_rows = Partial + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps
    has_tokens = end > start
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    tl.store(out_rows + offs_c[None, :], acc / safe_l[:, None], mask=head_ok[:, None] & c_ok[None, :])
    lse = tl.where(has_tokens, m_i + tl.log(safe_l), float("-inf"))
    tl.store(Partial + b * stride_pb + heads * stride_ph + split * stride_ps + LATENT, lse, mask=head_ok)


@triton.jit
def _mla_decode_merge_kernel(
    Partial, stride_pb, stride_ph, stride_ps,
    Out, stride_ob, stride_oh,
    Lse, stride_lb,
    num_splits,
    LATENT: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < LATENT
    base = Partial + b * stride_pb + h * stride_ph
    m = tl.full([1], float("-inf"), dtype=tl.float32)
    total = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s in range(num_splits):
        lse = tl.load(base + s * stride_ps + LATENT + tl.arange(0, 1))
        part = tl.load(base + s * stride_ps + offs_c, mask=c_ok, other=0.0)
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        scale_old = tl.exp(m - m_safe)
        w = tl.exp(lse - m_safe)
        acc = acc * scale_old + w * part
        total = total * scale_old + w
        m = m_new
    tl.store(Out + b * stride_ob + h * stride_oh + offs_c, (acc / total).to(Out.dtype.element_ty), mask=c_ok)
    tl.store(Lse + b * stride_lb + h + tl.arange(0, 1), m + tl.log(total))


def mla_paged_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    latent_dim: int,
    max_seq_len: int,
    k_scale: torch.Tensor | None = None,
    num_sms: int | None = None,
    launch: DecodeLaunch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` ``[B, H, C+R]`` over the paged cache ``[pages, page_size, C+R]`` → (``[B, H, C]``, lse ``[B, H]``).

    ``k_scale``: the per-tensor scale of an fp8 cache (None for a cache in the query's dtype).
    Every sequence in the batch must hold at least one token (vLLM decode guarantees it).
    """
    batch, num_heads, width = q.shape
    rope = width - latent_dim
    if kv_cache.shape[-1] != width:
        raise ValueError(f"cache rows have {kv_cache.shape[-1]} values, queries {width}")
    if kv_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("the last dimension of the query and of the cache must be contiguous")
    if num_sms is None:
        num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
    plan = launch or plan_launch(batch, num_heads, latent_dim, rope, max_seq_len, num_sms)
    if k_scale is not None and launch is None and plan.block_n > 32:
        # fp8 tiles are dequantised into a second, bf16 copy in shared memory: 64-token
        # tiles of 1024-wide rows exceed the H100's 227 KiB (measured).
        plan = replace(plan, block_n=32)
    partial = torch.empty(batch, num_heads, plan.num_splits, latent_dim + 1, dtype=torch.float32, device=q.device)
    out = torch.empty(batch, num_heads, latent_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, num_heads, dtype=torch.float32, device=q.device)
    scaled = k_scale is not None
    _mla_decode_split_kernel[plan.grid(batch, num_heads)](
        q, q.stride(0), q.stride(1),
        kv_cache, kv_cache.stride(0), kv_cache.stride(1),
        block_table, block_table.stride(0),
        seq_lens,
        partial, partial.stride(0), partial.stride(1), partial.stride(2),
        k_scale if scaled else seq_lens,
        scale,
        num_heads,
        plan.num_splits,
        LATENT=latent_dim, ROPE=rope,
        BLOCK_C=plan.block_c, BLOCK_R=plan.block_r, BLOCK_H=plan.block_h, BLOCK_N=plan.block_n,
        PAGE=kv_cache.shape[1], SCALED_CACHE=scaled,
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    _mla_decode_merge_kernel[(batch, num_heads)](
        partial, partial.stride(0), partial.stride(1), partial.stride(2),
        out, out.stride(0), out.stride(1),
        lse, lse.stride(0),
        plan.num_splits,
        LATENT=latent_dim, BLOCK_C=plan.block_c,
        num_warps=4 if plan.block_c <= 1024 else 8,
    )
    return out, lse

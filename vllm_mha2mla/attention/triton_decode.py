"""Paged MLA decode for any ``(kv_lora_rank, qk_rope_head_dim)``: this project's Triton kernel.

Decode with absorbed weights is multi-query attention: every query head scores the same
cached row ``[latent (C) | k_pe (R)]`` and reads the latent back as its value. The cost is
reading the cache, so a program takes a *group of heads* (up to 64, as many as fit its
registers) and a run of cached rows, loads each tile of them once (following the block table)
and uses it for all heads of the group: scores and values come from the same load. Two ways
to hand out the rows:

- *splits* (small batches): each request's tokens cut into ``num_splits`` slices, a program
  each (flash-decoding); a second kernel merges the slices with their log-sum-exp.
- *balanced* (batches that fill the GPU, :func:`balanced_launch`): the batch's tokens laid end to
  end and cut into equal chunks, one program each, all in one wave (FlashMLA's scheduling);
  requests inside a chunk are finished in place, only pieces of those that cross a chunk
  boundary are merged. Uneven lengths and a ragged last wave cost the splits ~20% at the
  engines' batches (benchmarks/results/h100-balanced-decode/).

Head groups of one request run next to each other (program axis 0), so when the heads do
not fit one group the second group's reads of the same rows hit L2.

Why not vLLM's ``decode_attention_fwd``: its MLA path assumes the 512 + 64 split of
DeepSeek and head groups of 16; MHA2MLA latents range from ~100 to 2,500 values with rotary
slots from 8 to 512. Both widths here are arbitrary: Triton tiles are powers of two, so the
latent is cut into up to three power-of-two blocks (640 = 512 + 128, 896 = 512 + 256 + 128), each
with its own accumulator, and only the last block is padded and masked. One block padded to the
next power of two (640 → 1024) would spend registers and shared memory on columns that hold
nothing; the padding is what kept wide per-layer latents at half the bandwidth of the rest.

CUDA graphs: the grid depends only on the batch size, the head count and the plan (``num_splits``
or ``num_programs``); each program derives its token range from ``seq_lens`` on the device, so a
captured graph stays correct for any sequence lengths (padding rows of length 0 included: their
output is 0 and their log-sum-exp -inf).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

ACC_REGISTER_BUDGET = 16384
"""Max ``BLOCK_H × BLOCK_C`` float32 accumulator elements per program (fits 8 warps without spills)."""
MIN_TOKENS_PER_SPLIT = 1024
"""Shorter splits lose more to the merge and per-split setup than they gain (measured: 8 splits of
~1K tokens beat 16 and 32 at 16–32 requests of 8K)."""
INT32_MAX: tl.constexpr = tl.constexpr(2**31 - 1)
MIN_TOKENS_PER_PROGRAM = 256
"""The balanced kernel's smallest chunk: below it a program's setup and the merge outweigh its rows."""
PROGRAMS_PER_SM = 8
"""Split long sequences until about this many programs per multiprocessor: with one program per
(request, head group), a few hundred long requests leave a ragged last wave. Measured on an H200
(benchmarks/results/h200-decode-splits/): at 310 × 8.7K tokens of 576 values 4 splits run 1.48×
faster than 1 (1.39 → 2.05 TB/s); 8 splits 1.11× at 212 × 8.7K of 1024 values."""
SHARED_MEMORY_MARGIN = 27 * 1024
"""Shared memory left to Triton's own scratch (layout conversions, the reductions)."""
SHARED_MEMORY_BUDGET = 227 * 1024 - SHARED_MEMORY_MARGIN
"""Bytes of shared memory a program may use on an H100/H200 (227 KiB per block): the tiles
were measured there. Other GPUs get their own limit less the margin (:func:`device_shared_memory`):
an A100 allows 163 KiB, Ada and consumer cards ~99 KiB."""


@functools.cache
def device_shared_memory(device_index: int) -> int:
    """The decode kernel's shared-memory budget on a GPU: its opt-in per-block limit (as torch
    reports it, else Triton's driver) less the margin; the H100's budget if neither says."""
    limit = getattr(torch.cuda.get_device_properties(device_index), "shared_memory_per_block_optin", None)
    if not limit:
        try:
            limit = triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]
        except (AttributeError, KeyError, RuntimeError):
            return SHARED_MEMORY_BUDGET
    return int(limit) - SHARED_MEMORY_MARGIN


BALANCED_MIN_REQUESTS_PER_SM = 0.7
"""Below this many (request, head group) pairs per SM the fixed splits already fill the GPU and the
balanced kernel's extra launch costs more than its even wave gains. Measured on an H100 over batches of
16-310 requests of 8.7K tokens (benchmarks/results/h100-balanced-decode/crossover.json): balanced from 96
requests on: 1.06-1.29x at 576 and 384 + 128 values, 1.11-1.16x at 512 + 512; at 64 requests 1.12x,
1.02x and 0.96x; at 16-32 requests 0.61-0.94x."""
SHARED_MEMORY_BLOCK_TO_SM = 1024
"""A multiprocessor's shared memory less a block's opt-in limit (228 - 227 KiB on an H100 / H200,
164 - 163 on an A100, 100 - 99 on Ada): with the budget's margin, how many balanced programs fit one SM."""
BALANCED_SCRATCH = 4 * 1024
"""Shared memory Triton adds to the balanced kernel's tiles (114,688 compiled for 32 heads x 64 rows of
512 + 64 values, whose tiles take 110,592)."""

MAX_LATENT_BLOCKS = 3
"""Latent blocks per row: enough for every multiple of 128 below 1024 without padding."""


def latent_blocks(latent: int, max_blocks: int = MAX_LATENT_BLOCKS) -> tuple[int, ...]:
    """Power-of-two tile widths (≥ 16) covering ``latent``: the largest power of two that fits,
    then the rest the same way; the last allowed block takes whatever is left, padded.

    ``latent_blocks(640) == (512, 128)``; ``latent_blocks(120) == (64, 32, 32)`` (24 of the last 32
    used); ``max_blocks=1`` gives the single padded tile (``(1024,)`` for 640)."""
    if latent < 1 or max_blocks < 1:
        raise ValueError(f"latent {latent} and max_blocks {max_blocks} must be positive")
    blocks: list[int] = []
    left = latent
    while left > 0:
        if len(blocks) == max_blocks - 1 or left <= 16:
            blocks.append(max(16, triton.next_power_of_2(left)))
            break
        block = 1 << (left.bit_length() - 1)
        blocks.append(block)
        left -= block
    return tuple(blocks)


def shared_memory_bytes(block_h: int, block_n: int, block_c: int, block_r: int, element_bytes: int = 2) -> int:
    """What the split kernel keeps in shared memory: one tile of ``block_n`` cached rows and the
    head group's query, both ``block_c + block_r`` wide (within 4 KiB of what Triton compiles on an
    H100 for a bf16 cache). An fp8 cache (float16 operands) needs no more: on an H100 this bounds
    all 72 compiled kernels from 192 + 64 to 2048 + 512 values, 16–32 heads × 16–64 rows, 1 and 2
    stages (benchmarks/results/h100-fp8-decode/fp8_tiles.json)."""
    return element_bytes * (block_n + block_h) * (block_c + block_r)


@dataclass(frozen=True)
class DecodeLaunch:
    """Tile sizes and split count for one decode call (pure function of the shapes)."""

    block_h: int
    block_n: int
    latent_blocks: tuple[int, ...]
    block_r: int
    num_warps: int
    num_stages: int
    num_splits: int
    num_programs: int = 0
    """Programs per head group that share the batch's tokens evenly (:func:`_mla_decode_balanced_kernel`);
    0: ``num_splits`` programs per request, each a slice of its tokens."""

    def __post_init__(self) -> None:
        if not 1 <= len(self.latent_blocks) <= MAX_LATENT_BLOCKS:
            raise ValueError(f"1 to {MAX_LATENT_BLOCKS} latent blocks, not {self.latent_blocks}")
        if self.num_programs < 0:
            raise ValueError(f"num_programs must be 0 (splits per request) or positive, not {self.num_programs}")

    @property
    def block_c(self) -> int:
        """Latent columns a program holds (the blocks' sum; ≥ the latent)."""
        return sum(self.latent_blocks)

    def grid(self, batch: int, num_heads: int) -> tuple[int, int, int]:
        """(head groups, requests or balanced programs, splits): a function of the batch size alone."""
        if self.num_programs:
            return (triton.cdiv(num_heads, self.block_h), self.num_programs, 1)
        return (triton.cdiv(num_heads, self.block_h), batch, self.num_splits)


def plan_latent_blocks(latent: int) -> tuple[int, ...]:
    """Power-of-two blocks for latents past 512 (640 → 512 + 128, 896 → 512 + 256 + 128) and for
    those that would leave a quarter or more of a 512 tile empty (384 → 256 + 128); one padded tile
    otherwise (448 → 512; narrower latents, whose programs are short anyway, as before).

    Measured on an H100 (benchmarks/results/h100-latent-blocks/): blocks run 1.27–1.75× faster than
    a padded 1024 tile at latents 640 and 896, and 1.66× faster than a padded 512 tile at latent
    384 (Llama-3-8B −75%, 8K context); at 448 three blocks ran 1.09× slower than one padded tile.

    Blocks wider than 512 are halved while the row has fewer than three (1024 → 512 + 512,
    2048 → 1024 + 512 + 512): narrower accumulators ran 1.20× faster at the paper's 1024 + 512 row
    and 1.14× at 2048 + 512, both at their 8K/1K decode batches (benchmarks/results/h100-paper-rows/)."""
    padded = max(16, triton.next_power_of_2(latent))
    if padded < 512 or (padded == 512 and 4 * latent > 3 * padded):
        return (padded,)
    blocks = list(latent_blocks(latent))  # widest first
    while blocks[0] > 512 and len(blocks) < MAX_LATENT_BLOCKS:
        blocks[:1] = [blocks[0] // 2, blocks[0] // 2]
        blocks.sort(reverse=True)
    return tuple(blocks)


def row_tiles(block_c: int, block_r: int, max_seq_len: int, fp8_cache: bool = False) -> tuple[int, int, int]:
    """(most heads per program, cached rows per tile, warps) for a row of ``block_c`` latent and
    ``block_r`` rotary columns: the fastest of 12 combinations per shape on an H100
    (benchmarks/results/h100-latent-blocks/blocks.json), as a rule over the row's width.

    An fp8 cache converts each tile in registers, which wants more rows per tile and, past 256
    latent columns, 8 warps: the fastest of 24 per shape on an H100 for latents up to 512
    (benchmarks/results/h100-fp8-decode/fp8.json); wider fp8 rows keep the bf16 rule.

    Latents past 512 in rows of at most 1024 values (Llama-3-8B cut50: 896 + 128) take 32-head
    groups: 1.33x faster than 16 at 97 x 8.7K and 512 x 1.3K (64 rows, 8 warps), 1.20x at 640 + 128
    (32 rows, 4 warps) (benchmarks/results/h100-wide-latent/wide_blocks.json)."""
    total = block_c + block_r
    if fp8_cache and block_c <= 512:
        return (64, 64, 8 if block_c >= 384 else 4)
    if block_c > 512 and total <= 1024:  # latents past 512 with little rotary (GQA models cut by half)
        return (32, 64, 8) if block_c >= 768 else (32, 32, 4)
    if block_c > 512:  # accumulators past 512 columns: 32-row tiles; 16 heads while the row is < 1280
        return (16, 32, 4) if total < 1280 else (32, 32, 8)
    if total >= 896:  # rotary-heavy rows of 896–1024 values (the paper's 1024-value layout)
        return (64, 64, 8)
    if block_c < 512 and max_seq_len >= 4096:  # narrow latents at long context: longer tiles
        return (64, 64, 4)
    return (64, 32, 4)


def plan_launch(batch: int, num_heads: int, latent: int, rope: int, max_seq_len: int,
                num_sms: int, shared_memory: int = SHARED_MEMORY_BUDGET, fp8_cache: bool = False,
                balanced: bool = True) -> DecodeLaunch:
    """Tiles that keep the float32 accumulator in registers and fit ``shared_memory`` bytes, and
    enough splits to fill the GPU. Rows too wide for the smallest tiles are refused here, with
    the sizes, rather than by Triton at launch."""
    blocks = plan_latent_blocks(latent)
    block_c = sum(blocks)
    block_r = max(16, triton.next_power_of_2(max(rope, 1)))
    most_heads, block_n, num_warps = row_tiles(block_c, block_r, max_seq_len, fp8_cache)
    if blocks == (512,) and block_c + block_r < 896:
        # Two 256-column accumulators beat one of 512 for the native row: 1.09x at 576 values, both at
        # 310 x 8.7K and 1024 x 1.3K (H100, benchmarks/results/h100-latent-blocks/native_blocks.json; fp8:
        # the fastest measured); not for the paper's 1024-value rows (512 + 512: 0.96x).
        blocks = (256, 256)
    if block_c <= 512:  # wider rows have their head group measured (row_tiles)
        most_heads = min(most_heads, ACC_REGISTER_BUDGET // block_c)
    fit = min(most_heads, triton.next_power_of_2(num_heads))
    block_h = max(16, 1 << (fit.bit_length() - 1))
    def needs() -> int:
        return shared_memory_bytes(block_h, block_n, block_c, block_r)

    while block_n > 16 and needs() > shared_memory:
        block_n //= 2  # very wide rows (latent ~2000 + rope 512), smaller GPUs: fewer rows per tile
    while block_h > 16 and needs() > shared_memory:
        block_h //= 2
    if needs() > shared_memory:
        raise ValueError(f"decode rows of {latent} latent + {rope} rotary values "
                         f"need {needs()} bytes of shared memory in the smallest tiles (16 heads x 16 rows); this GPU "
                         f"allows {shared_memory}")
    num_splits = split_count(triton.cdiv(num_heads, block_h) * batch, max_seq_len, num_sms)
    plan = DecodeLaunch(block_h, block_n, blocks, block_r, num_warps, 2, num_splits)
    if fp8_cache or not balanced:  # fp8 tiles were measured with fixed splits only
        return plan
    return balanced_launch(plan, batch, num_heads, num_sms, shared_memory)


def split_count(programs: int, max_seq_len: int, num_sms: int) -> int:
    """Splits per request for ``programs`` (request, head group) pairs: a power of two (≤ 64) that brings the grid
    to about ``PROGRAMS_PER_SM`` programs per multiprocessor, but no split shorter than ``MIN_TOKENS_PER_SPLIT``
    tokens of the longest request."""
    want = triton.next_power_of_2(max(1, triton.cdiv(PROGRAMS_PER_SM * num_sms, programs)))
    by_length = 1 << (max(1, max_seq_len // MIN_TOKENS_PER_SPLIT).bit_length() - 1)
    return max(1, min(want, by_length, 64))


def balanced_launch(plan: DecodeLaunch, batch: int, num_heads: int, num_sms: int,
                    shared_memory: int = SHARED_MEMORY_BUDGET,
                    min_requests_per_sm: float = BALANCED_MIN_REQUESTS_PER_SM) -> DecodeLaunch:
    """The balanced kernel in one full wave, where the batch has ``min_requests_per_sm`` (request, head
    group) pairs per SM or more: 64-row tiles where they fit, 4 warps where the accumulators fit them
    (32 heads x 512 latent columns: 1.04x over 8 warps at 512 + 512), and as many programs per head
    group as the SMs hold at once (two per SM where the tile leaves room in shared memory and
    registers for two, else one); ``plan`` as it is for smaller batches.

    Measured on an H100 (benchmarks/results/h100-balanced-decode/): 1.24x the fixed splits at 310 x 8.7K
    tokens of 576 values (1.08 ms against FlashMLA's 1.07 in the same run), 1.14x at 212 x 8.7K of
    1024, 1.12x at 348 x 8.7K of 384 + 128 and at 1024 x 1.3K of 576; 0.92x at 16-32 requests, where
    the fixed splits already fill one wave and the balanced kernel's extra launches cost more."""
    block_n = 64 if shared_memory_bytes(plan.block_h, 64, plan.block_c, plan.block_r) <= shared_memory \
        else plan.block_n
    num_warps = 4 if plan.block_h * plan.block_c <= ACC_REGISTER_BUDGET else plan.num_warps
    tile_bytes = shared_memory_bytes(plan.block_h, block_n, plan.block_c, plan.block_r) + BALANCED_SCRATCH
    sm_bytes = shared_memory + SHARED_MEMORY_MARGIN + SHARED_MEMORY_BLOCK_TO_SM  # this GPU's, from its budget
    per_sm = max(1, min(2 if num_warps == 4 else 1, sm_bytes // tile_bytes))
    groups = triton.cdiv(num_heads, plan.block_h)
    slots = per_sm * num_sms
    if groups * batch < min_requests_per_sm * num_sms:
        return plan
    return replace(plan, block_n=block_n, num_warps=num_warps, num_programs=max(1, slots // groups))


@triton.jit
def _paged_rows(KV, table_row, pos, pos_ok, stride_kv_page, stride_kv_tok, PAGE: tl.constexpr):
    """Pointers ``[len(pos), 1]`` to the cached rows at positions ``pos`` of the request whose block table row is
    ``table_row``: the page it names for each ``PAGE`` tokens, then the slot in it (rows not in ``pos_ok`` point
    into page 0, masked by the caller)."""
    page = tl.load(table_row + pos // PAGE, mask=pos_ok, other=0)
    return (KV + page.to(tl.int64) * stride_kv_page + (pos % PAGE) * stride_kv_tok)[:, None]


@triton.jit
def _load_rows(base, offs, ok, like):
    """One block of cached columns for a tile of rows, in the dot operands' dtype (``like``'s).
    An fp8 cache converts exactly (every e4m3 and e5m2 value is a float16 value); its scale
    multiplies the scores and the output instead of every cached value."""
    tile = tl.load(base + offs[None, :], mask=ok, other=0.0)
    return tile.to(like.dtype)


@triton.jit
def _row_columns(LATENT: tl.constexpr, ROPE: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    """Column offsets of the latent blocks [0, C0), [C0, C0 + C1), [C0 + C1, C0 + C1 + C2) and of the
    rotary slice, and which of them hold values (the last block and the rotary tile are padded)."""
    offs_0 = tl.arange(0, C0)
    offs_1 = C0 + tl.arange(0, C1)
    offs_2 = C0 + C1 + tl.arange(0, C2)
    offs_r = LATENT + tl.arange(0, BLOCK_R)
    return (offs_0, offs_1, offs_2, offs_r, offs_0[None, :] < LATENT, offs_1[None, :] < LATENT,
            offs_2[None, :] < LATENT, offs_r[None, :] < LATENT + ROPE)


@triton.jit
def _query_blocks(Q, stride_qb, stride_qh, b, heads, head_ok, offs_0, offs_1, offs_2, offs_r, ok_0, ok_1, ok_2, ok_r,
                  NUM_BLOCKS: tl.constexpr, FP16_OPERANDS: tl.constexpr):
    """Request ``b``'s queries of a head group, one slice per latent block and the rotary slice (blocks
    past NUM_BLOCKS are left as their 16-wide placeholders' zeros: never used)."""
    q_rows = Q + b * stride_qb + heads[:, None] * stride_qh
    q_0 = tl.load(q_rows + offs_0[None, :], mask=head_ok & ok_0, other=0.0)
    q_r = tl.load(q_rows + offs_r[None, :], mask=head_ok & ok_r, other=0.0)
    q_1 = tl.zeros([heads.shape[0], offs_1.shape[0]], dtype=q_0.dtype)
    q_2 = tl.zeros([heads.shape[0], offs_2.shape[0]], dtype=q_0.dtype)
    if NUM_BLOCKS > 1:
        q_1 = tl.load(q_rows + offs_1[None, :], mask=head_ok & ok_1, other=0.0)
    if NUM_BLOCKS > 2:
        q_2 = tl.load(q_rows + offs_2[None, :], mask=head_ok & ok_2, other=0.0)
    if FP16_OPERANDS:  # fp8 cache: float16 products (the fastest on an H100; see row_tiles)
        q_0 = q_0.to(tl.float16)
        q_r = q_r.to(tl.float16)
        q_1 = q_1.to(tl.float16)
        q_2 = q_2.to(tl.float16)
    return q_0, q_1, q_2, q_r


@triton.jit
def _softmax_fold(scores, pos_ok, m_i, l_i):
    """One tile's scaled scores ``[heads, rows]`` folded into the online softmax: the tile's unnormalised
    probabilities (rows past ``pos_ok`` 0), the factor the accumulators are rescaled by, the new running max and
    sum."""
    scores = tl.where(pos_ok[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(scores - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _attend_rows(q_0, q_1, q_2, q_r, KV, stride_kv_page, stride_kv_tok, table_row, lo, hi, qk_scale,
                 offs_0, offs_1, offs_2, offs_r, ok_0, ok_1, ok_2, ok_r,
                 NUM_BLOCKS: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr):
    """Online softmax of a head group over one request's cached rows ``[lo, hi)`` (its block table row
    at ``table_row``): the unnormalised accumulators per latent block, the running max and the sum."""
    m_i = tl.full([q_0.shape[0]], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([q_0.shape[0]], dtype=tl.float32)
    acc_0 = tl.zeros([q_0.shape[0], q_0.shape[1]], dtype=tl.float32)
    acc_1 = tl.zeros([q_1.shape[0], q_1.shape[1]], dtype=tl.float32)
    acc_2 = tl.zeros([q_2.shape[0], q_2.shape[1]], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pos_ok = pos < hi
        row = _paged_rows(KV, table_row, pos, pos_ok, stride_kv_page, stride_kv_tok, PAGE)
        kv_0 = _load_rows(row, offs_0, pos_ok[:, None] & ok_0, q_0)
        kv_r = _load_rows(row, offs_r, pos_ok[:, None] & ok_r, q_r)
        scores = tl.dot(q_0, tl.trans(kv_0)) + tl.dot(q_r, tl.trans(kv_r))
        if NUM_BLOCKS > 1:
            kv_1 = _load_rows(row, offs_1, pos_ok[:, None] & ok_1, q_1)
            scores += tl.dot(q_1, tl.trans(kv_1))
        if NUM_BLOCKS > 2:
            kv_2 = _load_rows(row, offs_2, pos_ok[:, None] & ok_2, q_2)
            scores += tl.dot(q_2, tl.trans(kv_2))
        p, alpha, m_i, l_i = _softmax_fold(scores * qk_scale, pos_ok, m_i, l_i)
        p = p.to(kv_0.dtype)
        acc_0 = acc_0 * alpha[:, None] + tl.dot(p, kv_0)
        if NUM_BLOCKS > 1:
            acc_1 = acc_1 * alpha[:, None] + tl.dot(p, kv_1)
        if NUM_BLOCKS > 2:
            acc_2 = acc_2 * alpha[:, None] + tl.dot(p, kv_2)
    return acc_0, acc_1, acc_2, m_i, l_i


@triton.jit
def _store_blocks(rows, acc_0, acc_1, acc_2, scale, row_ok, offs_0, offs_1, offs_2, ok_0, ok_1, ok_2,
                  NUM_BLOCKS: tl.constexpr):
    """The latent blocks' accumulators times ``scale`` (per head), in ``rows``' dtype."""
    tl.store(rows + offs_0[None, :], acc_0 * scale, mask=row_ok & ok_0)
    if NUM_BLOCKS > 1:
        tl.store(rows + offs_1[None, :], acc_1 * scale, mask=row_ok & ok_1)
    if NUM_BLOCKS > 2:
        tl.store(rows + offs_2[None, :], acc_2 * scale, mask=row_ok & ok_2)


@triton.jit
def _split_range(SeqLens, b, split, num_splits, ALIGN: tl.constexpr = 1):
    """Request ``b``'s tokens ``[start, end)`` that split ``split`` of ``num_splits`` reads (empty past the end),
    each split starting on a multiple of ``ALIGN`` (the two-pass decode's score tiles)."""
    seq_len = tl.load(SeqLens + b)
    split_len = tl.cdiv(seq_len, num_splits)
    if ALIGN > 1:
        split_len = tl.cdiv(split_len, ALIGN) * ALIGN
    start = split * split_len
    return start, tl.minimum(start + split_len, seq_len)


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
    NUM_BLOCKS: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr, SCALED_CACHE: tl.constexpr, FP16_OPERANDS: tl.constexpr,
):
    """Latent blocks: columns [0, C0), [C0, C0 + C1), [C0 + C1, C0 + C1 + C2), the first NUM_BLOCKS
    of them used (the others are 16-wide placeholders, never loaded or stored), masked at LATENT;
    each has its own query slice and accumulator. Program (head group, request, split): one
    ``num_splits``-th of the request's tokens."""
    head_group = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)

    heads = head_group * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads[:, None] < num_heads
    offs_0, offs_1, offs_2, offs_r, ok_0, ok_1, ok_2, ok_r = _row_columns(LATENT, ROPE, C0, C1, C2, BLOCK_R)
    q_0, q_1, q_2, q_r = _query_blocks(Q, stride_qb, stride_qh, b, heads, head_ok, offs_0, offs_1, offs_2, offs_r,
                                       ok_0, ok_1, ok_2, ok_r, NUM_BLOCKS, FP16_OPERANDS)

    start, end = _split_range(SeqLens, b, split, num_splits)
    k_scale = 1.0
    if SCALED_CACHE:
        k_scale = tl.load(KScale)
    acc_0, acc_1, acc_2, m_i, l_i = _attend_rows(
        q_0, q_1, q_2, q_r, KV, stride_kv_page, stride_kv_tok, BlockTable + b * stride_bt, start, end,
        sm_scale * k_scale, offs_0, offs_1, offs_2, offs_r, ok_0, ok_1, ok_2, ok_r, NUM_BLOCKS, BLOCK_N, PAGE)

    out_rows = Partial + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps
    has_tokens = end > start
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    _store_blocks(out_rows, acc_0, acc_1, acc_2, (k_scale / safe_l)[:, None], head_ok, offs_0, offs_1, offs_2,
                  ok_0, ok_1, ok_2, NUM_BLOCKS)
    lse = tl.where(has_tokens, m_i + tl.log(safe_l), float("-inf"))
    tl.store(Partial + b * stride_pb + heads * stride_ph + split * stride_ps + LATENT, lse, mask=heads < num_heads)


@triton.jit
def _balanced_chunk(CuLens, batch, num_programs, min_chunk):
    """Tokens per program of the balanced kernel: the batch's tokens shared evenly by ``num_programs``
    (at least ``min_chunk``), from the device's lengths so that a captured CUDA graph stays right."""
    total = tl.load(CuLens + batch - 1)
    return tl.maximum(tl.cdiv(total, num_programs), min_chunk), total


@triton.jit
def _mla_decode_balanced_kernel(
    Q, stride_qb, stride_qh,
    KV, stride_kv_page, stride_kv_tok,
    BlockTable, stride_bt,
    SeqLens, CuLens, batch,
    Out, stride_ob, stride_oh,
    Lse, stride_lb,
    Partial, stride_pp, stride_ps, stride_ph,
    PartLse, stride_lp, stride_ls,
    KScale,
    sm_scale,
    num_heads,
    num_programs,
    min_chunk,
    LATENT: tl.constexpr, ROPE: tl.constexpr,
    NUM_BLOCKS: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr, SCALED_CACHE: tl.constexpr, FP16_OPERANDS: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Program (head group, p) of ``num_programs``: the p-th equal chunk of the batch's tokens laid end
    to end (FlashMLA's scheduling), so every program reads the same number of rows whatever the
    lengths, and the grid is one or a few full waves. A request that lies wholly inside the chunk is
    finished here (output and lse); a piece of a longer one goes to the program's slot 0 (the
    chunk's first request) or 1 (its last) for the merge."""
    head_group = tl.program_id(0)
    p = tl.program_id(1)
    chunk, total = _balanced_chunk(CuLens, batch, num_programs, min_chunk)
    start = p * chunk
    end = tl.minimum(start + chunk, total)
    offs_b = tl.arange(0, BLOCK_B)
    cu = tl.load(CuLens + offs_b, mask=offs_b < batch, other=INT32_MAX)  # lanes past the batch count nowhere
    first = tl.sum((cu <= start).to(tl.int32))  # the request holding token `start`
    last = tl.sum((cu < end).to(tl.int32))  # the request holding token `end - 1` (none if start >= end)

    heads = head_group * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads[:, None] < num_heads
    offs_0, offs_1, offs_2, offs_r, ok_0, ok_1, ok_2, ok_r = _row_columns(LATENT, ROPE, C0, C1, C2, BLOCK_R)
    k_scale = 1.0
    if SCALED_CACHE:
        k_scale = tl.load(KScale)
    for b in range(first, last + 1):
        req_end = tl.load(CuLens + b)
        req_len = tl.load(SeqLens + b)
        req_start = req_end - req_len
        lo = tl.maximum(start, req_start) - req_start
        hi = tl.minimum(end, req_end) - req_start
        q_0, q_1, q_2, q_r = _query_blocks(Q, stride_qb, stride_qh, b, heads, head_ok, offs_0, offs_1, offs_2,
                                           offs_r, ok_0, ok_1, ok_2, ok_r, NUM_BLOCKS, FP16_OPERANDS)
        acc_0, acc_1, acc_2, m_i, l_i = _attend_rows(
            q_0, q_1, q_2, q_r, KV, stride_kv_page, stride_kv_tok, BlockTable + b * stride_bt, lo, hi,
            sm_scale * k_scale, offs_0, offs_1, offs_2, offs_r, ok_0, ok_1, ok_2, ok_r, NUM_BLOCKS, BLOCK_N, PAGE)
        safe_l = tl.where(l_i > 0, l_i, 1.0)
        lse = tl.where(hi > lo, m_i + tl.log(safe_l), float("-inf"))
        scale = (k_scale / safe_l)[:, None]
        # How many heads to write as the request's output (all, if the chunk holds the whole request) and as a
        # piece (all, otherwise), as head counts: masks then compare heads with them, where a scalar flag
        # broadcast into a mask is what Triton's interpreter refuses.
        final_heads = tl.where((lo == 0) & (hi == req_len), num_heads, 0)
        piece_heads = num_heads - final_heads
        _store_blocks(Out + b * stride_ob + heads[:, None] * stride_oh, acc_0, acc_1, acc_2, scale,
                      heads[:, None] < final_heads, offs_0, offs_1, offs_2, ok_0, ok_1, ok_2, NUM_BLOCKS)
        tl.store(Lse + b * stride_lb + heads, lse, mask=heads < final_heads)
        slot = tl.where(b == first, 0, 1)
        part = Partial + p * stride_pp + slot * stride_ps + heads[:, None] * stride_ph
        _store_blocks(part, acc_0, acc_1, acc_2, scale, heads[:, None] < piece_heads, offs_0, offs_1, offs_2,
                      ok_0, ok_1, ok_2, NUM_BLOCKS)
        tl.store(PartLse + p * stride_lp + slot * stride_ls + heads, lse, mask=heads < piece_heads)


@triton.jit
def _merge_step(m, norm, acc, lse, part):
    """One partial output (normalised over its rows, with their log-sum-exp ``lse``) folded into the
    running (max lse, weight sum, weighted output)."""
    m_new = tl.maximum(m, lse)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    scale_old = tl.exp(m - m_safe)
    w = tl.exp(lse - m_safe)
    return m_new, norm * scale_old + w, acc * scale_old + w * part


@triton.jit
def _store_merged(out_row, lse_ptr, m, norm, acc, offs_c, LATENT: tl.constexpr):
    """A merged output row and its log-sum-exp; a row with no tokens (``norm`` 0) gets 0 and -inf."""
    has_tokens = norm > 0
    safe_norm = tl.where(has_tokens, norm, 1.0)
    tl.store(out_row + offs_c, (acc / safe_norm).to(out_row.dtype.element_ty), mask=offs_c < LATENT)
    tl.store(lse_ptr + tl.arange(0, 1), tl.where(has_tokens, m + tl.log(safe_norm), float("-inf")))


@triton.jit
def _mla_decode_balanced_merge_kernel(
    Partial, stride_pp, stride_ps, stride_ph,
    PartLse, stride_lp, stride_ls,
    SeqLens, CuLens, batch,
    Out, stride_ob, stride_oh,
    Lse, stride_lb,
    num_programs,
    min_chunk,
    LATENT: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (request, head): the pieces of a request that crossed chunk boundaries, merged by
    their log-sum-exp; requests that one program finished are left as they are, and rows of length
    0 (CUDA-graph padding, which no program or only one may have visited) get 0 and -inf."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    chunk, total = _balanced_chunk(CuLens, batch, num_programs, min_chunk)
    req_end = tl.load(CuLens + b)
    req_len = tl.load(SeqLens + b)
    req_start = req_end - req_len
    p_first = req_start // chunk
    p_last = (req_end - 1) // chunk
    if (p_last > p_first) | (req_len == 0):
        offs_c = tl.arange(0, BLOCK_C)
        m = tl.full([1], float("-inf"), dtype=tl.float32)
        norm = tl.zeros([1], dtype=tl.float32)
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for p in range(p_first, tl.where(req_len > 0, p_last + 1, p_first)):
            slot = tl.where((p == p_first) & (req_start != p * chunk), 1, 0)  # slot 0: the chunk's first request
            lse = tl.load(PartLse + p * stride_lp + slot * stride_ls + h + tl.arange(0, 1))
            part = tl.load(Partial + p * stride_pp + slot * stride_ps + h * stride_ph + offs_c,
                           mask=offs_c < LATENT, other=0.0)
            m, norm, acc = _merge_step(m, norm, acc, lse, part)
        _store_merged(Out + b * stride_ob + h * stride_oh, Lse + b * stride_lb + h, m, norm, acc, offs_c, LATENT)


@triton.jit
def _mla_decode_merge_kernel(
    Partial, stride_pb, stride_ph, stride_ps,
    Out, stride_ob, stride_oh,
    Lse, stride_lb,
    num_splits,
    LATENT: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (request, head): the request's splits merged by their log-sum-exp."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    base = Partial + b * stride_pb + h * stride_ph
    m = tl.full([1], float("-inf"), dtype=tl.float32)
    total = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s in range(num_splits):
        lse = tl.load(base + s * stride_ps + LATENT + tl.arange(0, 1))
        part = tl.load(base + s * stride_ps + offs_c, mask=offs_c < LATENT, other=0.0)
        m, total, acc = _merge_step(m, total, acc, lse, part)
    _store_merged(Out + b * stride_ob + h * stride_oh, Lse + b * stride_lb + h, m, total, acc, offs_c, LATENT)


def split_kernel_constants(plan: DecodeLaunch, latent: int, rope: int, page: int, scaled_cache: bool,
                           fp8_cache: bool) -> dict:
    """The split kernel's compile-time arguments for a launch: what ``mla_paged_decode`` passes, and
    what a compile without a GPU needs to reproduce the same kernel (``benchmarks/kernels/compile_sm90.py``)."""
    blocks = plan.latent_blocks + (16,) * (MAX_LATENT_BLOCKS - len(plan.latent_blocks))  # placeholders
    return dict(LATENT=latent, ROPE=rope, NUM_BLOCKS=len(plan.latent_blocks), C0=blocks[0], C1=blocks[1],
                C2=blocks[2], BLOCK_R=plan.block_r, BLOCK_H=plan.block_h, BLOCK_N=plan.block_n, PAGE=page,
                SCALED_CACHE=scaled_cache, FP16_OPERANDS=fp8_cache)


def check_decode_inputs(q: torch.Tensor, kv_cache: torch.Tensor) -> None:
    """Refuses a cache whose rows are not the queries' width, or tensors whose last dimension is not contiguous
    (the kernels index both by column), before any launch."""
    if kv_cache.shape[-1] != q.shape[-1]:
        raise ValueError(f"cache rows have {kv_cache.shape[-1]} values, queries {q.shape[-1]}")
    if kv_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("the last dimension of the query and of the cache must be contiguous")


def mla_paged_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    kv_lora_rank: int,
    max_seq_len: int,
    k_scale: torch.Tensor | None = None,
    num_sms: int | None = None,
    launch: DecodeLaunch | None = None,
    shared_memory: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` ``[B, H, C+R]`` over the paged cache ``[pages, page_size, C+R]`` → (``[B, H, C]``, lse ``[B, H]``).

    ``k_scale``: the per-tensor scale of a scaled cache (None for a cache in the query's dtype). An
    fp8 cache (one byte a value) is multiplied in float16: 1.16x faster than bf16 products at the
    same tiles on an H100 (median over 96 tile settings) and more precise; queries must lie within
    float16's range (±65,504), as they do wherever a model also runs in float16.
    ``num_sms``, ``shared_memory``: the GPU's multiprocessors and shared-memory budget (default:
    read from ``q``'s device). Rows of length 0 (vLLM's CUDA-graph padding) get output 0 and
    log-sum-exp -inf.
    """
    batch, num_heads, width = q.shape
    rope = width - kv_lora_rank
    check_decode_inputs(q, kv_cache)
    if num_sms is None:
        num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
    if shared_memory is None:
        shared_memory = device_shared_memory(q.device.index or 0) if q.is_cuda else SHARED_MEMORY_BUDGET
    fp8_cache = kv_cache.element_size() == 1  # one signal for the tiles and the float16 products
    plan = launch or plan_launch(batch, num_heads, kv_lora_rank, rope, max_seq_len, num_sms, shared_memory,
                                 fp8_cache=fp8_cache)
    if plan.block_c < kv_lora_rank:
        raise ValueError(f"latent blocks {plan.latent_blocks} cover {plan.block_c} of {kv_lora_rank} latent columns")
    scaled = k_scale is not None
    constants = split_kernel_constants(plan, kv_lora_rank, rope, kv_cache.shape[1], scaled, fp8_cache)
    if plan.num_programs:
        out = torch.empty(batch, num_heads, kv_lora_rank, dtype=q.dtype, device=q.device)
        lse = torch.empty(batch, num_heads, dtype=torch.float32, device=q.device)
        _balanced_decode(q, kv_cache, block_table, seq_lens, scale, k_scale, plan, out, lse, constants)
        return out, lse
    partial = torch.empty(batch, num_heads, plan.num_splits, kv_lora_rank + 1, dtype=torch.float32, device=q.device)
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
        **constants,
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    return merge_splits(partial, q.dtype)


def merge_splits(partial: torch.Tensor, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The splits' normalised partial outputs ``[B, H, splits, C + 1]`` (column C: each split's log-sum-exp,
    -inf for an empty one) merged by :func:`_mla_decode_merge_kernel` into (``[B, H, C]`` in ``out_dtype``,
    lse ``[B, H]``): the last step of every split decode here (bf16/fp8, low-bit, two-pass)."""
    batch, num_heads, num_splits, width = partial.shape
    latent = width - 1
    out = torch.empty(batch, num_heads, latent, dtype=out_dtype, device=partial.device)
    lse = torch.empty(batch, num_heads, dtype=torch.float32, device=partial.device)
    _mla_decode_merge_kernel[(batch, num_heads)](
        partial, partial.stride(0), partial.stride(1), partial.stride(2),
        out, out.stride(0), out.stride(1),
        lse, lse.stride(0),
        num_splits,
        LATENT=latent, BLOCK_C=triton.next_power_of_2(latent),
        num_warps=_merge_warps(latent),
    )
    return out, lse


def batch_block(batch: int) -> int:
    """The balanced kernel's tile over the batch's lengths (a power of two ≥ 16): one compile per
    power of two of the batch, not per captured batch size."""
    return max(16, triton.next_power_of_2(batch))


def _merge_warps(kv_lora_rank: int) -> int:
    """Warps of a merge program (one output row of ``kv_lora_rank`` float32 values)."""
    return 4 if kv_lora_rank <= 1024 else 8


def _balanced_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                     scale: float, k_scale: torch.Tensor | None, plan: DecodeLaunch, out: torch.Tensor,
                     lse: torch.Tensor, constants: dict) -> None:
    """:func:`_mla_decode_balanced_kernel` then its merge, into ``out`` and ``lse``. Each program has
    two float32 slots for pieces of requests (its chunk's first and last); the lengths' running sum
    (one small launch) tells every program where its chunk starts."""
    batch, num_heads, _ = q.shape
    kv_lora_rank = out.shape[-1]
    cu_lens = torch.cumsum(seq_lens, 0, dtype=torch.int32)
    partial = torch.empty(plan.num_programs, 2, num_heads, kv_lora_rank, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(plan.num_programs, 2, num_heads, dtype=torch.float32, device=q.device)
    _mla_decode_balanced_kernel[plan.grid(batch, num_heads)](
        q, q.stride(0), q.stride(1),
        kv_cache, kv_cache.stride(0), kv_cache.stride(1),
        block_table, block_table.stride(0),
        seq_lens, cu_lens, batch,
        out, out.stride(0), out.stride(1),
        lse, lse.stride(0),
        partial, partial.stride(0), partial.stride(1), partial.stride(2),
        part_lse, part_lse.stride(0), part_lse.stride(1),
        k_scale if k_scale is not None else seq_lens,
        scale,
        num_heads,
        plan.num_programs,
        MIN_TOKENS_PER_PROGRAM,
        **constants, BLOCK_B=batch_block(batch),
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    _mla_decode_balanced_merge_kernel[(batch, num_heads)](
        partial, partial.stride(0), partial.stride(1), partial.stride(2),
        part_lse, part_lse.stride(0), part_lse.stride(1),
        seq_lens, cu_lens, batch,
        out, out.stride(0), out.stride(1),
        lse, lse.stride(0),
        plan.num_programs,
        MIN_TOKENS_PER_PROGRAM,
        LATENT=kv_lora_rank, BLOCK_C=triton.next_power_of_2(kv_lora_rank),
        num_warps=_merge_warps(kv_lora_rank),
    )

"""The Triton paged decode kernel against the PyTorch reference (Triton's CPU interpreter).

Runs without a GPU: ``TRITON_INTERPRET=1`` executes the kernels in NumPy, which checks the
indexing, masking, split merging and fp8-scale paths exactly; speed is measured on the GPU by
``benchmarks.kernels.anyshape_kernels`` and ``benchmarks.kernels.decode_kernel_sweep``.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # kernels defined now become interpreted kernels

import functools  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from vllm_mha2mla.attention.paged_attention import gather_paged_rows, paged_latent_decode  # noqa: E402
from vllm_mha2mla.attention.triton_decode import latent_blocks, mla_paged_decode, plan_launch  # noqa: E402
from vllm_mha2mla.attention.triton_low_bit_decode import low_bit_paged_decode, plan_low_bit_launch  # noqa: E402
from vllm_mha2mla.attention.quantized_cache import paged_decode, write_rows  # noqa: E402
from conversion.mla_format.cache_quant import CacheQuant  # noqa: E402
from conversion.mla_format.cache_rows import RowLayout, decode_rows  # noqa: E402

del os.environ["TRITON_INTERPRET"]  # not for the engines other tests start


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    """Triton checks the setting again at launch."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _paged_problem(latent, rope, heads, block, lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens, dtype=torch.int32)
    batch, width = len(lens), latent + rope
    per_req = (int(lens.max()) + block - 1) // block
    num_blocks = batch * per_req + 3
    cache = torch.randn(num_blocks, block, width, generator=g)
    table = torch.randperm(num_blocks, generator=g)[: batch * per_req].view(batch, per_req).to(torch.int32)
    q = torch.randn(batch, heads, width, generator=g)
    return q, cache, table, lens


@pytest.mark.slow
@pytest.mark.parametrize(
    "latent,rope,heads,block,splits",
    [(96, 24, 6, 16, 1), (448, 64, 20, 16, 4), (512, 512, 3, 16, 3), (7, 3, 3, 4, 2), (120, 8, 40, 32, 8)],
)
def test_kernel_equals_reference_decode(latent, rope, heads, block, splits):
    q, cache, table, lens = _paged_problem(latent, rope, heads, block, [1, 5, 33, 17, 64])
    plan = replace(plan_launch(len(lens), heads, latent, rope, 64, num_sms=8, balanced=False), num_splits=splits)
    out, lse = mla_paged_decode(q, cache, table, lens, 0.3, latent, 64, launch=plan)
    want = paged_latent_decode(q.double(), cache.double(), table, lens, 0.3, latent)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    rows = gather_paged_rows(cache.double(), table, lens)
    scores = torch.einsum("bhd,bld->bhl", q.double(), rows) * 0.3
    valid = torch.arange(rows.shape[1])[None, :] < lens[:, None]
    want_lse = scores.masked_fill(~valid[:, None, :], float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "latent,rope,heads,block,lens,programs,min_chunk",
    [
        (96, 24, 6, 16, [1, 5, 33, 17, 64], 7, 1),  # requests cut at arbitrary points, several per program
        (448, 64, 20, 16, [30, 30, 30, 30], 4, 1),  # chunk boundaries exactly at request starts; two head groups
        (512, 512, 3, 16, [64, 1, 2, 100], 3, 1),  # two latent blocks
        (120, 8, 40, 32, [200], 9, 1),  # one request over every program
        (7, 3, 3, 4, [3, 9, 1, 1, 12], 50, 1),  # more programs than tokens: the idle ones write nothing
        (64, 16, 4, 16, [40, 3, 70], 8, 32),  # the smallest chunk leaves programs idle
    ],
)
def test_balanced_kernel_equals_reference_decode(latent, rope, heads, block, lens, programs, min_chunk, monkeypatch):
    """Tokens shared evenly by ``programs`` programs whatever the request lengths: whole requests
    finished in place, pieces merged from their programs' slots, output and lse as the reference."""
    from vllm_mha2mla.attention import triton_decode

    monkeypatch.setattr(triton_decode, "MIN_TOKENS_PER_PROGRAM", min_chunk)
    q, cache, table, lens_t = _paged_problem(latent, rope, heads, block, lens)
    plan = replace(plan_launch(len(lens), heads, latent, rope, 64, num_sms=8), num_programs=programs)
    out, lse = mla_paged_decode(q, cache, table, lens_t, 0.3, latent, 64, launch=plan)
    want = paged_latent_decode(q.double(), cache.double(), table, lens_t, 0.3, latent)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    scores = torch.einsum("bhd,bld->bhl", q.double(), gather_paged_rows(cache.double(), table, lens_t)) * 0.3
    valid = torch.arange(scores.shape[-1])[None, :] < lens_t[:, None]
    torch.testing.assert_close(lse.double(), scores.masked_fill(~valid[:, None, :], float("-inf")).logsumexp(-1),
                               rtol=1e-5, atol=1e-5)


def _without_padding(q, cache, table, lens, scale, latent):
    """The reference decode of the rows that hold tokens, and which rows those are."""
    real = lens > 0
    return real, paged_latent_decode(q[real].double(), cache.double(), table[real], lens[real], scale, latent)


@pytest.mark.parametrize(
    "lens,programs,min_chunk",
    [
        ([0, 5, 0, 0, 7, 0], 3, 1),  # empty rows first, between and last
        ([4, 0, 4, 0, 4, 0, 0], 3, 4),  # empty rows exactly on chunk boundaries
        ([10, 0, 0], 5, 1),  # vLLM's CUDA-graph padding: empty rows after the batch
        ([0, 0, 0], 4, 1),  # nothing to read at all
    ],
)
def test_balanced_kernel_gives_empty_rows_zero_and_minus_infinity(lens, programs, min_chunk, monkeypatch):
    """Rows of length 0 (CUDA-graph padding) are never read from the cache (their block-table entries
    point nowhere here) and come out as 0 with log-sum-exp -inf, whichever program their position
    falls to; the other rows as the reference. The buffers are filled first, so a row left unwritten
    shows."""
    from vllm_mha2mla.attention import triton_decode

    monkeypatch.setattr(triton_decode, "MIN_TOKENS_PER_PROGRAM", min_chunk)
    empty_like_before = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *shape, **kw: empty_like_before(*shape, **kw).fill_(1234.0))
    q, cache, table, lens_t = _paged_problem(40, 8, 5, 4, [max(n, 1) for n in lens])
    lens_t = torch.tensor(lens, dtype=torch.int32)
    table[lens_t == 0] = 10**6  # out of range: reading it would fail
    plan = replace(plan_launch(len(lens), 5, 40, 8, 64, num_sms=8), num_programs=programs)
    out, lse = mla_paged_decode(q, cache, table, lens_t, 0.3, 40, 64, launch=plan)
    empty = lens_t == 0
    assert (out[empty] == 0).all() and (lse[empty] == float("-inf")).all()
    if not empty.all():
        real, want = _without_padding(q, cache, table, lens_t, 0.3, 40)
        torch.testing.assert_close(out[real].double(), want, rtol=1e-5, atol=1e-5)


def test_split_kernel_gives_empty_rows_zero_and_minus_infinity():
    q, cache, table, lens = _paged_problem(40, 8, 5, 4, [3, 1, 6])
    lens[1] = 0
    plan = replace(plan_launch(3, 5, 40, 8, 64, num_sms=8, balanced=False), num_splits=2)
    out, lse = mla_paged_decode(q, cache, table, lens, 0.3, 40, 64, launch=plan)
    assert (out[1] == 0).all() and (lse[1] == float("-inf")).all()
    real, want = _without_padding(q, cache, table, lens, 0.3, 40)
    torch.testing.assert_close(out[real].double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("batch,longest,padding", [(40, 300, 5), (300, 40, 44), (17, 2000, 1)])
def test_planned_balanced_launch_at_larger_batches(batch, longest, padding):
    """The plan as ``plan_launch`` gives it (balanced, the default smallest chunk), batches past one
    16-wide tile of lengths (its lanes past the batch masked), CUDA-graph padding at the end."""
    g = torch.Generator().manual_seed(batch)
    lens = torch.randint(1, longest, (batch,), generator=g).tolist()
    q, cache, table, lens_t = _paged_problem(32, 16, 2, 16, lens)
    lens_t[-padding:] = 0
    plan = plan_launch(batch, 2, 32, 16, longest, num_sms=8)
    assert plan.num_programs > 0
    out, lse = mla_paged_decode(q, cache, table, lens_t, 0.3, 32, longest, launch=plan)
    real, want = _without_padding(q, cache, table, lens_t, 0.3, 32)
    torch.testing.assert_close(out[real].double(), want, rtol=1e-5, atol=1e-5)
    assert (out[~real] == 0).all() and (lse[~real] == float("-inf")).all()


def test_balanced_kernel_dequantises_a_scaled_cache(monkeypatch):
    from vllm_mha2mla.attention import triton_decode

    monkeypatch.setattr(triton_decode, "MIN_TOKENS_PER_PROGRAM", 1)
    q, cache, table, lens = _paged_problem(112, 32, 5, 16, [9, 40, 3])
    plan = replace(plan_launch(3, 5, 112, 32, 40, num_sms=8), latent_blocks=latent_blocks(112), num_programs=4)
    out, _ = mla_paged_decode(q, cache / 4.0, table, lens, 0.2, 112, 40, k_scale=torch.tensor([4.0]), launch=plan)
    want = paged_latent_decode(q.double(), cache.double(), table, lens, 0.2, 112)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_balanced_plan_rejects_a_negative_program_count():
    with pytest.raises(ValueError, match="num_programs must be 0"):
        replace(plan_launch(2, 4, 64, 16, 64, num_sms=8), num_programs=-1)


def test_latent_blocks_cover_the_latent_in_powers_of_two():
    assert latent_blocks(640) == (512, 128)  # no padding: 640 columns, not 1024
    assert latent_blocks(896) == (512, 256, 128)
    assert latent_blocks(512) == (512,)
    assert latent_blocks(120) == (64, 32, 32)  # three blocks at most: the last one padded (24 of 32 used)
    assert latent_blocks(1000) == (512, 256, 256)
    assert latent_blocks(7) == (16,)  # Triton's smallest dot tile
    assert latent_blocks(640, max_blocks=1) == (1024,)  # the old single padded tile
    for latent in range(1, 2100, 7):
        blocks = latent_blocks(latent)
        assert sum(blocks) >= latent and sum(blocks[:-1]) < latent and len(blocks) <= 3
        assert all(b >= 16 and b & (b - 1) == 0 for b in blocks)
    with pytest.raises(ValueError, match="must be positive"):
        latent_blocks(0)


@pytest.mark.parametrize("latent,rope,blocks", [(640, 64, (512, 128)), (640, 64, (1024,)), (208, 48, (128, 64, 16)),
                                                (208, 48, (128, 128)), (96, 32, (64, 32))])
def test_every_block_split_of_the_latent_gives_the_reference(latent, rope, blocks):
    q, cache, table, lens = _paged_problem(latent, rope, 5, 16, [1, 40, 23])
    plan = replace(plan_launch(3, 5, latent, rope, 40, num_sms=8, balanced=False), latent_blocks=blocks, num_splits=2)
    out, _ = mla_paged_decode(q, cache, table, lens, 0.1, latent, 40, launch=plan)
    want = paged_latent_decode(q.double(), cache.double(), table, lens, 0.1, latent)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_blocks_that_do_not_cover_the_latent_are_refused():
    q, cache, table, lens = _paged_problem(640, 64, 2, 16, [4])
    plan = replace(plan_launch(1, 2, 640, 64, 4, num_sms=8, balanced=False), latent_blocks=(512, 64))
    with pytest.raises(ValueError, match=r"latent blocks \(512, 64\) cover 576 of 640"):
        mla_paged_decode(q, cache, table, lens, 0.5, 640, 4, launch=plan)


def test_more_splits_than_tokens_leaves_empty_splits_out():
    q, cache, table, lens = _paged_problem(64, 16, 4, 16, [1, 2, 3])
    plan = replace(plan_launch(3, 4, 64, 16, 3, num_sms=8, balanced=False), num_splits=8)
    out, _ = mla_paged_decode(q, cache, table, lens, 0.5, 64, 3, launch=plan)
    want = paged_latent_decode(q.double(), cache.double(), table, lens, 0.5, 64)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("latent", [64, 112])  # one latent block; three (64 + 32 + 16)
def test_scaled_cache_is_dequantised_with_k_scale(latent):
    q, cache, table, lens = _paged_problem(latent, 32, 5, 16, [9, 40])
    k_scale = torch.tensor([4.0])
    plan = replace(plan_launch(2, 5, latent, 32, 40, num_sms=8, balanced=False), latent_blocks=latent_blocks(latent))
    assert len(plan.latent_blocks) == (1 if latent == 64 else 3)
    out, _ = mla_paged_decode(q, cache / 4.0, table, lens, 0.2, latent, 40, k_scale=k_scale, launch=plan)
    want = paged_latent_decode(q.double(), cache.double(), table, lens, 0.2, latent)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_fp8_cache_converts_to_float16_and_scales_scores_and_output():
    """An e4m3 cache converts to float16 as is, and so do the queries; k_scale multiplies the
    scores and the output (exactly checked with a float32 cache by the test above). float16
    rounds the query and the probabilities, and the interpreter sums float16 products in float16,
    hence the bound (leaving k_scale out of the output or the scores misses it by orders of magnitude)."""
    q, cache, table, lens = _paged_problem(112, 32, 5, 16, [9, 40])
    k_scale = torch.tensor([0.02])
    rows = (cache / 0.02).to(torch.float8_e4m3fn)
    plan = replace(plan_launch(2, 5, 112, 32, 40, num_sms=8, fp8_cache=True), latent_blocks=latent_blocks(112))
    out, lse = mla_paged_decode(q, rows, table, lens, 0.2, 112, 40, k_scale=k_scale, launch=plan)
    dequantised = rows.double() * 0.02
    want = paged_latent_decode(q.double(), dequantised, table, lens, 0.2, 112)
    tolerance = 2e-2
    torch.testing.assert_close(out.double(), want, rtol=tolerance, atol=tolerance)
    scores = torch.einsum("bhd,bld->bhl", q.double(), gather_paged_rows(dequantised, table, lens)) * 0.2
    valid = torch.arange(scores.shape[-1])[None, :] < lens[:, None]
    want_lse = scores.masked_fill(~valid[:, None, :], float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse.double(), want_lse, rtol=tolerance, atol=tolerance)


def test_launch_plan_fits_registers_and_fills_the_gpu():
    """The tiles and split counts per request (the plan before the balanced kernel takes big batches)."""
    split_plan = functools.partial(plan_launch, balanced=False)
    wide = split_plan(batch=1, num_heads=32, latent=896, rope=512, max_seq_len=8192, num_sms=132)
    assert wide.latent_blocks == (512, 256, 128) and wide.num_splits > 1  # 896 columns held, not 1024
    assert (wide.block_h, wide.block_n, wide.num_warps) == (32, 32, 8)  # one head group (measured fastest)
    assert split_plan(64, 32, 640, 512, 8192, 132).latent_blocks == (512, 128)
    assert split_plan(64, 32, 640, 512, 8192, 132).block_h == 16  # rotary-heavy: two groups of 16 (measured)
    cut50 = split_plan(97, 32, 896, 128, 8704, 132)  # Llama-3-8B cut50 at its 8K/1K decode batch
    assert (cut50.block_h, cut50.block_n, cut50.num_warps) == (32, 64, 8)  # one group: 1.33x over two of 16
    narrow_rope = split_plan(128, 32, 640, 128, 8704, 132)
    assert (narrow_rope.block_h, narrow_rope.block_n, narrow_rope.num_warps) == (32, 32, 4)  # 1.20x over 16 heads
    assert split_plan(64, 32, 448, 512, 8192, 132).latent_blocks == (512,)  # one tile 1/8 padded beat 3 blocks
    assert split_plan(64, 32, 384, 128, 8192, 132).latent_blocks == (256, 128)  # 1/4 padded: blocks (1.66x)
    assert split_plan(64, 64, 128, 64, 8192, 132).block_h == 64  # small accumulators: 64 heads per program
    paper_d32 = split_plan(64, 32, 1024, 512, 8704, 132)  # Llama-2-7B r16-d32 at its 8K/1K decode batch
    assert paper_d32.latent_blocks == (512, 512) and (paper_d32.block_h, paper_d32.block_n) == (32, 32)  # 1.20x
    assert split_plan(40, 32, 2048, 512, 8704, 132).latent_blocks == (1024, 512, 512)  # r16-d64: 1.14x
    assert split_plan(40, 32, 1536, 512, 8704, 132).latent_blocks == (512, 512, 512)
    narrow = split_plan(batch=512, num_heads=32, latent=512, rope=64, max_seq_len=8192, num_sms=132)
    assert narrow.block_h == 32  # all heads share one read of each row
    assert narrow.latent_blocks == (256, 256)  # two accumulators of 256 (measured 1.09x over one of 512)
    assert split_plan(64, 32, 512, 512, 4096, 132).latent_blocks == (512,)  # not in 64-row tiles
    assert narrow.num_splits == 4  # 512 requests: ~8 programs per SM (measured: no ragged last wave)
    short = split_plan(batch=1, num_heads=16, latent=512, rope=64, max_seq_len=100, num_sms=132)
    assert short.num_splits == 1  # no split shorter than MIN_TOKENS_PER_SPLIT


def test_balanced_kernel_takes_batches_that_fill_the_gpu():
    """From 0.7 (request, head group) pairs per SM on (the measured crossover) the balanced kernel runs
    one wave: two programs per SM where two fit (4 warps, tiles under half the SM's shared memory), one
    where they do not; fp8 caches and small batches keep the fixed splits."""
    from vllm_mha2mla.attention.triton_decode import balanced_launch

    native = plan_launch(310, 32, 512, 64, 8704, 132)  # Llama-2-7B 576 values at its 8K/1K decode batch
    assert (native.num_programs, native.block_n, native.num_warps) == (264, 64, 4)
    paper = plan_launch(212, 32, 512, 512, 8704, 132)  # 1024 values: a 64-row tile takes 196 KiB
    assert (paper.num_programs, paper.block_n, paper.num_warps) == (132, 64, 4)
    assert plan_launch(93, 32, 512, 64, 8704, 132).num_programs == 264  # 93 >= 0.7 x 132
    assert plan_launch(92, 32, 512, 64, 8704, 132).num_programs == 0  # fixed splits (measured faster at 16-32)
    cut50 = plan_launch(97, 32, 896, 128, 8704, 132)  # 32 x 896 accumulators: the plan's 8 warps, one per SM
    assert (cut50.num_programs, cut50.num_warps) == (132, 8)
    two_groups = plan_launch(200, 64, 512, 64, 8704, 132)  # 64 heads in two groups of 32 share the slots
    assert two_groups.block_h == 32 and two_groups.num_programs == 132
    assert plan_launch(310, 32, 512, 64, 8704, 132, fp8_cache=True).num_programs == 0
    split = plan_launch(310, 32, 512, 64, 8704, 132, balanced=False)
    assert balanced_launch(split, 310, 32, 132) == native
    assert balanced_launch(split, 8, 32, 132, min_requests_per_sm=0.0).num_programs == 264


def test_tiles_shrink_to_a_smaller_gpus_shared_memory_and_too_wide_rows_are_refused():
    from vllm_mha2mla.attention.triton_decode import SHARED_MEMORY_MARGIN, shared_memory_bytes

    h100 = plan_launch(64, 32, 512, 512, 4096, 132)
    for kib in (163, 99):  # A100, Ada / consumer cards: per-block opt-in limits
        budget = kib * 1024 - SHARED_MEMORY_MARGIN
        plan = plan_launch(64, 32, 512, 512, 4096, 108, shared_memory=budget)
        assert shared_memory_bytes(plan.block_h, plan.block_n, plan.block_c, plan.block_r) <= budget
        assert plan.latent_blocks == h100.latent_blocks and (plan.block_n, plan.block_h) < (h100.block_n, h100.block_h)
    # fp8 caches (float16 operands) fit the bf16 bound: Triton compiled 131,072-163,840 bytes for 32 heads x 64
    # rows of 512 + 512 values and 147,456-155,648 for 16 x 16 of 2048 + 512 (H100), which the plan now takes
    fp8 = plan_launch(64, 32, 512, 512, 4096, 132, fp8_cache=True)
    assert (fp8.block_h, fp8.block_n, fp8.num_warps) == (32, 64, 8)  # the fastest measured fp8 tiles
    assert plan_launch(8, 32, 2048, 512, 4096, 132, fp8_cache=True).block_n == 16
    with pytest.raises(ValueError, match=r"2048 latent \+ 512 rotary values need 163840 bytes .* allows 73728"):
        plan_launch(8, 32, 2048, 512, 4096, 108, shared_memory=99 * 1024 - SHARED_MEMORY_MARGIN)


def test_rejects_mismatched_cache_width():
    q, cache, table, lens = _paged_problem(64, 16, 2, 16, [4])
    with pytest.raises(ValueError, match="cache rows have 80 values, queries 81"):
        mla_paged_decode(torch.cat([q, q[..., :1]], -1), cache, table, lens, 0.5, 64, 4)


def test_very_wide_rows_fit_shared_memory():
    """A 896-latent + 512-rope row (a per-layer allocation's widest layer) once asked Triton for
    242 KiB of shared memory on an H200 (limit 227 KiB); the plan now shrinks the row tile."""
    from vllm_mha2mla.attention.triton_decode import SHARED_MEMORY_BUDGET, shared_memory_bytes

    assert shared_memory_bytes(16, 64, 1024, 512) == 245760  # Triton asked for 247808 bytes
    for latent, rope in [(896, 512), (2048, 512), (1536, 1024), (512, 512), (96, 96)]:
        plan = plan_launch(batch=64, num_heads=32, latent=latent, rope=rope, max_seq_len=4096, num_sms=132)
        assert shared_memory_bytes(plan.block_h, plan.block_n, plan.block_c, plan.block_r) <= SHARED_MEMORY_BUDGET \
            or plan.block_n == 16
    assert plan_launch(64, 32, 512, 512, 4096, 132).block_n == 64  # the measured 1024-value config keeps its tile


@pytest.mark.slow
@pytest.mark.parametrize("latent,rope,fp8,batch", [(512, 64, False, 64), (512, 64, True, 64), (512, 512, False, 64),
                                                  (2048, 512, False, 64), (512, 64, False, 310), (512, 512, False, 212)])
def test_plans_compile_for_an_h100_within_its_shared_memory(latent, rope, fp8, batch):
    """The interpreter above runs the kernel as Python, which accepts code Triton's compiler refuses
    (an early return inside a constexpr branch did, in a launch option since removed); this compiles
    the planned launch for sm_90, without a GPU, in a process of its own (this module's kernels are
    interpreted), and its shared memory must fit an H100's 227 KiB per block. Batches of 212 and 310
    (and the two head groups of 2048 + 512 at 64) plan the balanced kernel: its loop over requests
    compiles too."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [str(latent), str(rope), "--batch", str(batch), *(["--fp8"] if fp8 else [])]
    done = subprocess.run([sys.executable, "-m", "benchmarks.kernels.compile_sm90", *args],
                          capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["is_plan"]
    assert row["num_programs"] == plan_launch(batch, 32, latent, rope, 8704, 132, fp8_cache=fp8).num_programs, row
    assert row["num_programs"] > 0 or batch == 64, row  # 212 and 310 requests: the balanced kernel
    assert 0 < row["shared_bytes"] <= 227 * 1024, row
    assert row["mma_versions"], row  # the products compiled to tensor-core instructions


# The low-bit cache (issue 33): the kernel reads RowLayout bytes, the reference decodes them in PyTorch.

def _low_bit_problem(fmt, latent, rope, heads, block, lens, seed=0):
    """Random rows written through the plugin's write path (every slot of a shuffled block table), queries in
    float32: (q, uint8 cache, block table, lengths, layout)."""
    g = torch.Generator().manual_seed(seed)
    layout = RowLayout(fmt, latent, rope)
    lens = torch.tensor(lens, dtype=torch.int32)
    per_req = (int(lens.max()) + block - 1) // block
    num_blocks = len(lens) * per_req + 3
    cache = torch.zeros(num_blocks, block, layout.row_bytes, dtype=torch.uint8)
    scales = torch.linspace(2.0, 0.1, latent)  # an SVD latent's columns fall in scale
    kv_c = torch.randn(num_blocks * block, latent, generator=g) * scales
    k_pe = torch.randn(num_blocks * block, rope, generator=g)
    write_rows(kv_c, k_pe, cache, torch.arange(num_blocks * block), layout)
    table = torch.randperm(num_blocks, generator=g)[: len(lens) * per_req].view(len(lens), per_req).to(torch.int32)
    return torch.randn(len(lens), heads, latent + rope, generator=g), cache, table, lens, layout


def _low_bit_reference(q, cache, table, lens, scale, layout, values=None):
    """Output (quantized_cache.paged_decode) and log-sum-exp over the decoded rows, in float64."""
    out = paged_decode(q.double(), cache, table, lens, scale, layout, values)
    rows = torch.cat(decode_rows(gather_paged_rows(cache, table, lens), layout, torch.float64), dim=-1)
    scores = torch.einsum("bhd,bld->bhl", q.double(), rows) * scale
    valid = torch.arange(rows.shape[1])[None, :] < lens[:, None]
    return out, scores.masked_fill(~valid[:, None, :], float("-inf")).logsumexp(-1)


@pytest.mark.parametrize(
    "fmt,latent,rope,heads,block,splits,blocks",
    [
        (CacheQuant(4, 8, 64), 128, 128, 9, 16, 2, None),  # the engine's format on the tests' checkpoint shape
        (CacheQuant(4, None, 32), 96, 24, 6, 16, 1, None),  # rotary keys kept in bfloat16
        (CacheQuant(8, 4, 64), 640, 64, 3, 16, 3, (512, 128)),  # int8 latent in two blocks, int4 rotary keys
        (CacheQuant(4, 4, 64, hadamard=True, rope_hadamard=True), 112, 32, 5, 16, 2, (64, 32, 16)),  # rotated
        (CacheQuant(4, 8, 16), 7, 3, 3, 4, 2, None),  # odd widths: a padded code byte, short groups
    ],
)
def test_low_bit_kernel_equals_the_reference_decode(fmt, latent, rope, heads, block, splits, blocks):
    """Codes, nibbles, group scales and minima, the raw or rotated segments and the split merge: output and lse
    equal the PyTorch decode of the same bytes (float32 products, hence 1e-4)."""
    q, cache, table, lens, layout = _low_bit_problem(fmt, latent, rope, heads, block, [1, 5, 33, 17, 64])
    plan = replace(plan_low_bit_launch(len(lens), heads, layout, 64, num_sms=8), num_splits=splits)
    if blocks is not None:
        plan = replace(plan, latent_blocks=blocks)
    out, lse = low_bit_paged_decode(q, cache, table, lens, 0.3, layout, 64, launch=plan)
    want, want_lse = _low_bit_reference(q, cache, table, lens, 0.3, layout)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-4, atol=1e-4)


def test_low_bit_kernel_with_fewer_values_than_the_latent_and_empty_rows():
    """Values are the latent's first ``kv_lora_rank`` columns; a row of length 0 (CUDA-graph padding, its block
    table pointing nowhere) gives 0 and -inf; the plan's own launch (no overrides)."""
    q, cache, table, lens, layout = _low_bit_problem(CacheQuant(4, 8, 64), 128, 64, 4, 16, [7, 1, 30])
    lens[1] = 0
    table[1] = 10**6
    out, lse = low_bit_paged_decode(q, cache, table, lens, 0.2, layout, 30, kv_lora_rank=100)
    assert out.shape == (3, 4, 100) and (out[1] == 0).all() and (lse[1] == float("-inf")).all()
    real = lens > 0
    want, want_lse = _low_bit_reference(q[real], cache, table[real], lens[real], 0.2, layout, 100)
    torch.testing.assert_close(out[real].double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse[real].double(), want_lse, rtol=1e-4, atol=1e-4)


def test_low_bit_kernel_refuses_what_it_cannot_read():
    q, cache, table, lens, layout = _low_bit_problem(CacheQuant(4, 8, 64), 64, 16, 2, 16, [4])
    with pytest.raises(ValueError, match=r"uint8 \[pages, page_size, 56\], not torch.float32"):
        low_bit_paged_decode(q, cache.float(), table, lens, 0.5, layout, 4)
    with pytest.raises(ValueError, match="queries of 81 columns do not match rows of 64 \\+ 16"):
        low_bit_paged_decode(torch.cat([q, q[..., :1]], -1), cache, table, lens, 0.5, layout, 4)
    with pytest.raises(ValueError, match="first 65 columns of the row, which has a latent segment of 64"):
        low_bit_paged_decode(q, cache, table, lens, 0.5, layout, 4, kv_lora_rank=65)


@pytest.mark.slow
@pytest.mark.parametrize("latent,rope,fmt", [(512, 64, "4,8,64"), (512, 512, "4,8,64"), (2048, 512, "4,0,64")])
def test_low_bit_plans_compile_for_an_h100_within_its_shared_memory(latent, rope, fmt):
    """The low-bit kernel compiles for sm_90 (the interpreter accepts code the compiler refuses) with tensor-core
    products, within an H100's shared memory, for the native row with int8 rotary keys, the paper's 1,024-value row
    (whose 64-row tiles asked for 299,008 bytes: the plan takes 32) and its widest row with bf16 rotary keys."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.kernels.compile_sm90", str(latent), str(rope),
                           "--low-bit", fmt], capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(done.stdout.strip().splitlines()[-1])
    bits, rope_bits, group = (int(x) for x in fmt.split(","))
    assert row["row_bytes"] == RowLayout(CacheQuant(bits, rope_bits or None, group), latent, rope).row_bytes
    assert 0 < row["shared_bytes"] <= 227 * 1024 and row["mma_versions"], row

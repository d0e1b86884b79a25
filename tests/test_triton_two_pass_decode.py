"""The two-pass Triton decode (scores, then values by latent slice) against the PyTorch reference,
in Triton's CPU interpreter; its plan; and its compile for an H100 (registers, spills, shared memory).
Speed is measured on a GPU by ``benchmarks.kernels.decode_tiles two-pass``."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # kernels defined now become interpreted kernels

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from vllm_mha2mla.attention.paged_attention import gather_paged_rows, paged_latent_decode  # noqa: E402
from vllm_mha2mla.attention.triton_two_pass_decode import (TwoPassLaunch, plan_two_pass,  # noqa: E402
                                                           two_pass_paged_decode)

del os.environ["TRITON_INTERPRET"]  # not for the engines other tests start


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    """Triton checks the setting again at launch."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _paged_problem(latent: int, rope: int, heads: int, page: int, lens: list[int], seed: int = 0):
    """Random queries and a paged cache whose pages are shuffled, as vLLM hands them out."""
    g = torch.Generator().manual_seed(seed)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    per_request = (max(max(lens), 1) + page - 1) // page
    num_pages = len(lens) * per_request + 3
    cache = torch.randn(num_pages, page, latent + rope, generator=g)
    table = torch.randperm(num_pages, generator=g)[: len(lens) * per_request].view(len(lens), per_request)
    q = torch.randn(len(lens), heads, latent + rope, generator=g)
    return q, cache, table.to(torch.int32), lens_t


def _reference_lse(q, cache, table, lens, scale):
    rows = gather_paged_rows(cache.double(), table, lens)
    scores = torch.einsum("bhd,bld->bhl", q.double(), rows) * scale
    valid = torch.arange(rows.shape[1])[None, :] < lens[:, None]
    return scores.masked_fill(~valid[:, None, :], float("-inf")).logsumexp(-1)


def _launch(latent: int, rope: int, heads: int, max_len: int, **tiles) -> TwoPassLaunch:
    return replace(plan_two_pass(4, heads, latent, rope, max_len, num_sms=8), **tiles)


@pytest.mark.parametrize(
    "latent,rope,heads,page,lens,tiles",
    [
        # three latent slices, the last half empty; the row in 32-column chunks (the last one partly past it);
        # two values tiles per score tile
        (80, 16, 6, 16, [1, 5, 33, 17, 64], dict(value_slice=32, score_rows=32, score_chunk=32, value_rows=16,
                                                 num_splits=3)),
        # two head groups in both passes; one request over more splits than it has score tiles; rows as M
        (120, 8, 40, 8, [100, 3], dict(score_heads=32, value_heads=16, value_slice=64, score_rows=16,
                                       score_chunk=64, value_rows=16, num_splits=8, scores_rows_as_m=True)),
        # a wide latent: value tiles shorter than the score tile, the row in one chunk wider than it
        (640, 64, 4, 16, [70, 40], dict(value_slice=256, score_rows=32, score_chunk=1024, value_rows=16,
                                        num_splits=2)),
        # widths that are no power of two anywhere, a page of 4 tokens
        (7, 3, 3, 4, [3, 9, 1, 12], dict(value_slice=16, score_rows=16, score_chunk=16, value_rows=16,
                                         num_splits=2, scores_rows_as_m=True)),
    ],
)
def test_two_pass_equals_reference_decode(latent, rope, heads, page, lens, tiles):
    """Every split and latent slice: the output and the log-sum-exp of the float64 reference."""
    q, cache, table, lens_t = _paged_problem(latent, rope, heads, page, lens)
    max_len = max(lens) + 5  # the scratch is sized by the bound, not the lengths
    plan = _launch(latent, rope, heads, max_len, **tiles)
    out, lse = two_pass_paged_decode(q, cache, table, lens_t, 0.3, latent, max_len, plan)
    want = paged_latent_decode(q.double(), cache.double(), table, lens_t, 0.3, latent)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), _reference_lse(q, cache, table, lens_t, 0.3), rtol=1e-5, atol=1e-5)


def test_two_pass_gives_empty_rows_zero_and_minus_infinity():
    """vLLM pads CUDA-graph batches with rows of length 0: output 0, log-sum-exp -inf, the others exact."""
    q, cache, table, lens = _paged_problem(40, 8, 3, 16, [0, 20, 0])
    plan = _launch(40, 8, 3, 32, value_slice=16, score_rows=16, score_chunk=16, value_rows=16, num_splits=2)
    out, lse = two_pass_paged_decode(q, cache, table, lens, 0.5, 40, 32, plan)
    assert torch.equal(out[[0, 2]], torch.zeros_like(out[[0, 2]]))
    assert torch.isneginf(lse[[0, 2]]).all()
    want = paged_latent_decode(q[1:2].double(), cache.double(), table[1:2], lens[1:2], 0.5, 40)
    torch.testing.assert_close(out[1:2].double(), want, rtol=1e-5, atol=1e-5)


def test_two_pass_scales_an_fp8_cache():
    """An e4m3 cache: float16 products and probabilities, its scale on the scores and the output; equal to
    the reference over the dequantised cache within float16's rounding of the probabilities."""
    latent, rope, heads = 48, 16, 4
    q, cache, table, lens = _paged_problem(latent, rope, heads, 16, [30, 7])
    k_scale = torch.tensor([0.05])
    fp8 = (cache / k_scale).to(torch.float8_e4m3fn)
    plan = _launch(latent, rope, heads, 32, value_slice=16, score_rows=16, score_chunk=32, value_rows=16,
                   num_splits=2)
    out, lse = two_pass_paged_decode(q, fp8, table, lens, 0.2, latent, 32, plan, k_scale=k_scale)
    dequantised = fp8.double() * 0.05
    want = paged_latent_decode(q.double(), dequantised, table, lens, 0.2, latent)
    torch.testing.assert_close(out.double(), want, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(lse.double(), _reference_lse(q, dequantised, table, lens, 0.2), rtol=1e-3, atol=1e-3)


def test_two_pass_plan_fits_registers_and_shared_memory():
    """At the paper's widest row the values program holds the native row's 32 × 512 accumulators and one program
    scores all 32 heads of a row; narrower latents take one slice; sizes that are no power of two and GPUs
    whose shared memory cannot hold the scores' chunks are refused."""
    from vllm_mha2mla.attention.triton_decode import ACC_REGISTER_BUDGET

    plan = plan_two_pass(40, 32, 2048, 512, 8704, num_sms=132)
    assert (plan.value_slice, plan.value_heads, plan.num_slices(2048)) == (512, 32, 4)
    assert plan.value_heads * plan.value_slice <= ACC_REGISTER_BUDGET
    assert plan.score_heads == 32 and plan.score_tiles(8704) * plan.score_rows >= 8704
    assert plan.num_splits >= 2  # 40 requests x 1 head group leave an H100's 132 SMs idle without splits
    assert plan_two_pass(4, 8, 96, 32, 512, num_sms=8).num_slices(96) == 1
    with pytest.raises(ValueError, match="shared memory"):
        plan_two_pass(4, 32, 2048, 512, 8704, num_sms=8, shared_memory=16 * 1024)
    with pytest.raises(ValueError, match="value_slice must be a power of two"):
        replace(plan, value_slice=96)
    with pytest.raises(ValueError, match="value_rows 128 must not exceed score_rows 64"):
        replace(plan, value_rows=128)


@pytest.mark.slow
def test_two_pass_compiles_for_an_h100():
    """Both kernels compile for sm_90 (the interpreter accepts code the compiler refuses) at the paper's widest
    row, within an H100's shared memory, with tensor-core products, and the values kernel does not spill (its
    accumulators are the native row's)."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.kernels.compile_sm90", "2048", "512", "--batch", "40",
                           "--two-pass"], capture_output=True, text=True, env=env, cwd=root, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert [row["kernel"] for row in rows] == ["scores", "values"], rows
    for row in rows:
        assert 0 < row["shared_bytes"] <= 227 * 1024 and row["mma_versions"], row
    assert rows[1]["spill_store_bytes"] == 0, rows[1]

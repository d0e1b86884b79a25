"""Paged latent decode against dense attention (pure PyTorch, no engine)."""

import pytest
import torch

from vllm_mha2mla.attention.paged_attention import gather_paged_rows, paged_latent_decode


@pytest.mark.parametrize("latent,rope,block", [(96, 24, 16), (448, 64, 16), (1024, 128, 8), (7, 3, 4)])
def test_paged_decode_equals_dense_attention(latent, rope, block):
    g = torch.Generator().manual_seed(latent + rope)
    lens = torch.tensor([1, 5, 33, 17, 64])
    batch, heads, width = len(lens), 6, latent + rope
    blocks_per_req = (int(lens.max()) + block - 1) // block
    num_blocks = batch * blocks_per_req + 3
    cache = torch.randn(num_blocks, block, width, generator=g, dtype=torch.float64)
    table = torch.randperm(num_blocks, generator=g)[: batch * blocks_per_req].view(batch, blocks_per_req)
    q = torch.randn(batch, heads, width, generator=g, dtype=torch.float64)
    out = paged_latent_decode(q, cache, table, lens, 0.3, latent, chunk_tokens=16)
    for b in range(batch):
        rows = torch.cat([cache[table[b, i]] for i in range(blocks_per_req)])[: lens[b]]
        want = torch.softmax(q[b] @ rows.T * 0.3, -1) @ rows[:, :latent]
        torch.testing.assert_close(out[b], want, rtol=1e-6, atol=1e-6)


def test_gather_follows_the_block_table():
    cache = torch.arange(4 * 2 * 1, dtype=torch.float32).view(4, 2, 1)  # row value = global slot
    rows = gather_paged_rows(cache, torch.tensor([[3, 1], [0, 2]]), torch.tensor([3, 4]))
    assert rows[0, :3, 0].tolist() == [6, 7, 2] and rows[1, :, 0].tolist() == [0, 1, 4, 5]


@pytest.mark.parametrize("width", [120, 1024])
def test_cache_gather_follows_block_table_and_starts(width):
    from vllm_mha2mla.attention.cache_gather import gather_cache_rows

    g = torch.Generator().manual_seed(width)
    block, blocks = 4, 12
    cache = torch.randn(blocks, block, width, generator=g)
    table = torch.randperm(blocks, generator=g)[:9].view(3, 3).to(torch.int32)
    starts = torch.tensor([0, 4, 2], dtype=torch.int32)  # context chunk begins mid-request
    lens = [5, 3, 6]
    cu = torch.tensor([0, 5, 8, 14], dtype=torch.int32)
    token_to_seq = torch.tensor(sum(([b] * n for b, n in enumerate(lens)), []) + [0, 0], dtype=torch.int32)
    dst = torch.zeros(16, width)
    gather_cache_rows(cache, dst, table, cu, token_to_seq, 14, "auto", torch.tensor([1.0]), starts)
    for t in range(14):
        b = int(token_to_seq[t])
        pos = t - int(cu[b]) + int(starts[b])
        assert torch.equal(dst[t], cache[table[b, pos // block], pos % block])
    assert dst[14:].abs().sum() == 0  # rows past num_tokens untouched
    scaled = torch.zeros(16, width)
    gather_cache_rows(cache, scaled, table, cu, token_to_seq, 14, "fp8", torch.tensor([0.5]), starts)
    torch.testing.assert_close(scaled[:14], dst[:14] * 0.5)


# --- the compiled CPU decode kernel (vllm_mha2mla/attention/csrc/latent_decode_cpu.cpp) --------------------------------------

def _kernel_variants():
    from vllm_mha2mla.attention.cpu_decode_kernel import build_flags

    return [pytest.param(bf16, id="avx512bf16" if bf16 else "avx512",
                         marks=pytest.mark.skipif(build_flags(bf16) is None, reason="this CPU cannot run the variant"))
            for bf16 in (True, False)]


def _paged_case(g, lens, heads, latent, rope, block, q_scale, dtype=torch.bfloat16, mha2mla_rope=0):
    """Random cache, shuffled block table (a few spare blocks), queries; ``mha2mla_rope`` > 0 zeroes
    each head's query on the rope columns of all but one group of that many columns (the shape of an
    MHA2MLA query: a head sees only its own kv-head's rotated keys)."""
    width = latent + rope
    lens = torch.tensor(lens)
    per_req = (int(lens.max()) + block - 1) // block
    num_blocks = len(lens) * per_req + 5
    cache = torch.randn(num_blocks, block, width, generator=g).to(dtype)
    table = torch.randperm(num_blocks, generator=g)[: len(lens) * per_req].view(len(lens), per_req).to(torch.int32)
    q = (torch.randn(len(lens), heads, width, generator=g) * q_scale).to(dtype)
    if mha2mla_rope:
        groups = rope // mha2mla_rope
        for h in range(heads):
            for k in range(groups):
                if k != h % groups:
                    q[:, h, latent + k * mha2mla_rope: latent + (k + 1) * mha2mla_rope] = 0
    return q, cache, table, lens.to(torch.int32)


KERNEL_CASES = [  # (lens, heads, latent, rope, block, q_scale, mha2mla rope group)
    ([1, 17, 300, 2048, 33, 16, 5, 1000], 9, 96, 96, 16, 0.1, 32),  # the demo's SmolLM2 shape, MHA2MLA queries
    ([5, 40, 1], 9, 96, 96, 16, 3.0, 0),  # peaked softmax, dense queries
    ([7, 3, 130], 5, 7, 3, 4, 1.0, 0),  # widths no vector divides
    ([5000, 64], 16, 448, 64, 16, 0.3, 0),  # vLLM's native 576 row; a long request split over tasks
    ([100, 1, 31, 32], 4, 1024, 128, 8, 0.2, 64),  # the paper's Llama-2-7B 1024-value exact layout
    ([50, 77], 3, 120, 8, 128, 1.0, 0),  # 128-token blocks (vLLM's CPU default outside MLA)
    ([9, 12], 2, 40, 0, 16, 1.0, 0),  # no rope columns
]


@pytest.mark.parametrize("bf16", _kernel_variants())
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"C{c[2]}R{c[3]}bs{c[4]}")
def test_decode_kernel_equals_reference(bf16, case):
    """The kernel (bf16 inputs, float32 scores/softmax/sums, bf16 output; with AVX512-BF16 the softmax
    weights are rounded to bf16 before p·V) against the PyTorch reference in float64 on the same bf16
    inputs. Tolerance: one bf16 rounding of the output (2^-9 relative) plus one of every weight
    (at most 2^-9 · max|V|), doubled: rtol = 2^-8, atol = 2^-8 · max|V|."""
    from vllm_mha2mla.attention.cpu_decode_kernel import load_variant

    kernel = load_variant(bf16).latent_decode
    lens, heads, latent, rope, block, q_scale, group = case
    g = torch.Generator().manual_seed(latent + rope + block)
    q, cache, table, lens = _paged_case(g, lens, heads, latent, rope, block, q_scale, mha2mla_rope=group)
    scale = 0.125
    want = paged_latent_decode(q.double(), cache.double(), table, lens, scale, latent)
    got = kernel(q, None, cache, table, lens, scale, latent)
    assert got.dtype == torch.bfloat16 and got.shape == (len(lens), heads, latent)
    vmax = float(cache[..., :latent].abs().max())
    torch.testing.assert_close(got.double(), want, rtol=2**-8, atol=2**-8 * vmax)
    # the query split as vLLM hands it over (transposed latent part + rope part): the same bits
    q_latent = q[..., :latent].transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(kernel(q_latent, q[..., latent:], cache, table, lens, scale, latent), got)


@pytest.mark.parametrize("bf16", _kernel_variants())
def test_decode_kernel_is_as_close_to_exact_as_the_bf16_reference(bf16):
    """Accuracy against the float32 reference run on the same bf16 inputs (what the plugin used before
    the kernel): the kernel's worst error is at most that reference's plus one bf16 output rounding."""
    from vllm_mha2mla.attention.cpu_decode_kernel import load_variant

    kernel = load_variant(bf16).latent_decode
    g = torch.Generator().manual_seed(7)
    q, cache, table, lens = _paged_case(g, [2048, 700, 64, 3], 9, 96, 96, 16, 1.0, mha2mla_rope=32)
    exact = paged_latent_decode(q.double(), cache.double(), table, lens, 0.125, 96)
    ref32 = paged_latent_decode(q, cache, table, lens, 0.125, 96)  # float32 math, bf16 output
    got = kernel(q, None, cache, table, lens, 0.125, 96)
    err_kernel = float((got.double() - exact).abs().max())
    err_ref = float((ref32.double() - exact).abs().max())
    ulp = float(exact.abs().max()) * 2**-8
    assert err_kernel <= err_ref + ulp, (err_kernel, err_ref)


def test_decode_kernel_refuses_what_it_cannot_serve():
    from vllm_mha2mla.attention.cpu_decode_kernel import load_variant

    ops = load_variant()
    if ops is None:
        pytest.skip("no AVX-512")
    kernel = ops.latent_decode
    g = torch.Generator().manual_seed(0)
    q, cache, table, lens = _paged_case(g, [5, 3], 2, 16, 8, 4, 1.0)
    with pytest.raises(RuntimeError, match="bf16"):
        kernel(q.float(), None, cache.float(), table, lens, 0.1, 16)
    with pytest.raises(RuntimeError, match="width"):
        kernel(q[..., :20], None, cache, table, lens, 0.1, 16)
    with pytest.raises(RuntimeError, match="beyond the block table"):
        kernel(q, None, cache, table, lens + 100, 0.1, 16)
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernel(q, None, cache, table + cache.shape[0], lens, 0.1, 16)


def test_decode_kernel_switch_and_fallback(monkeypatch, caplog):
    """MHA2MLA_CPU_DECODE=torch keeps the PyTorch decode; a failed build warns and falls back (auto)
    or raises (kernel); a bad value is refused."""
    from vllm_mha2mla.attention import cpu_decode_kernel as ck

    def fresh(mode):
        ck.cpu_kernels.cache_clear()
        monkeypatch.setenv(ck.ENV, mode)
        return ck.cpu_kernels()

    try:
        assert fresh("torch") is None
        with pytest.raises(ValueError, match="auto, kernel or torch"):
            fresh("fast")

        def broken(bf16=None):
            raise RuntimeError("no compiler here")

        monkeypatch.setattr(ck, "load_variant", broken)
        with caplog.at_level("WARNING"):
            assert fresh("auto") is None
        assert "using the PyTorch decode" in caplog.text and "no compiler here" in caplog.text
        with pytest.raises(RuntimeError, match="no compiler"):
            fresh("kernel")
    finally:
        ck.cpu_kernels.cache_clear()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cache_write_kernel_equals_indexed_writes(dtype):
    """write_latent_rows = vLLM's CPU MLA cache write (two indexed writes of the valid slots)."""
    from vllm_mha2mla.attention.cpu_decode_kernel import load_variant

    ops = load_variant()
    if ops is None:
        pytest.skip("no AVX-512")
    g = torch.Generator().manual_seed(1)
    blocks, block, latent, rope = 6, 16, 96, 96
    cache = torch.randn(blocks, block, latent + rope, generator=g).to(dtype)
    want = cache.clone()
    kv_c = torch.randn(7, latent, generator=g).to(dtype)
    k_pe = torch.randn(7, 1, rope, generator=g).to(dtype)
    slots = torch.tensor([5, 17, -1, 95, 40, -1, 0])
    ops.write_latent_rows(kv_c, k_pe, cache, slots)
    flat, valid = want.view(-1, latent + rope), slots >= 0
    flat[slots[valid], :latent] = kv_c[valid]
    flat[slots[valid], latent:] = k_pe[valid, 0]
    assert torch.equal(cache, want)
    with pytest.raises(RuntimeError, match="beyond the cache"):
        ops.write_latent_rows(kv_c[:1], k_pe[:1], cache, torch.tensor([blocks * block]))

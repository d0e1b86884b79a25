"""The low-bit latent cache's byte rows and paged operations (issue 33): a row written to the paged cache reads back
as exactly what the reference model attends over (``fake_quantize_row``), the decode over the paged bytes equals
dense attention over those values, padding slots are never written, the prefill-context gather follows vLLM's
indexing, and a cache page counts the true bytes."""

from __future__ import annotations

import math

import pytest
import torch

from conversion.errors import ConversionError
from conversion.mla_format.cache_quant import CacheQuant, fake_quantize_row
from conversion.mla_format.cache_rows import RowLayout, decode_rows, encode_rows
from vllm_mha2mla.attention import quantized_cache as qc
from vllm_mha2mla.attention.cache_gather import gather_cache_rows

FORMATS = [CacheQuant(4, None, 64), CacheQuant(4, 8, 64), CacheQuant(4, 4, 32), CacheQuant(8, None, 64),
           CacheQuant(4, 8, 64, hadamard=True, rope_hadamard=True)]


def _segments(tokens: int, latent: int, rope: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows shaped like an SVD latent: column scales falling from the first direction, one outlier column."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(tokens, latent, generator=g) * torch.linspace(3.0, 0.2, latent)
    c[:, latent // 3] *= 6
    return c.to(torch.bfloat16), torch.randn(tokens, rope, generator=g).to(torch.bfloat16)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("latent, rope", [(96, 32), (250, 14), (17, 0)])
def test_a_row_reads_back_as_the_reference_models_values(fmt, latent, rope):
    c, r = _segments(40, latent, rope)
    layout = RowLayout(fmt, latent, rope)
    rows = encode_rows(c, r, layout)
    assert rows.dtype == torch.uint8 and rows.shape == (40, layout.row_bytes)
    got_c, got_r = decode_rows(rows, layout, torch.bfloat16)
    want_c, want_r = fake_quantize_row(c, r, fmt)
    torch.testing.assert_close(got_c, want_c, rtol=0, atol=0) if not fmt.hadamard else \
        torch.testing.assert_close(got_c, want_c, rtol=1e-2, atol=1e-2)  # the rotation's float order differs
    torch.testing.assert_close(got_r, want_r, rtol=0, atol=0) if not fmt.rope_hadamard else \
        torch.testing.assert_close(got_r, want_r, rtol=1e-2, atol=1e-2)


def test_row_bytes_are_the_formats_bytes_with_even_padding():
    for fmt in FORMATS:
        for latent, rope in [(96, 32), (250, 14), (17, 0), (512, 64)]:
            layout = RowLayout(fmt, latent, rope)
            odd = sum(math.ceil(n * b / 8) % 2 for n, b in ((latent, fmt.latent_bits), (rope, fmt.rope_bits))
                      if b is not None and n)
            assert layout.row_bytes == fmt.row_bytes(latent, rope) + odd
            assert all(s.offset % 2 == 0 for s in layout.segments) and layout.row_bytes % 2 == 0
    # DeepSeek's 576-value row (512 latent + 64 rotary), 1,152 bytes in bfloat16: int4 latent in groups of 64 +
    # int8 rotary keys = 256 + 8 x 4 + 64 + 4 = 356 bytes (3.24x fewer); rotary keys in int4 too, 324 (3.56x)
    assert RowLayout(CacheQuant(4, 8, 64), 512, 64).row_bytes == 356
    assert RowLayout(CacheQuant(4, 4, 64), 512, 64).row_bytes == 324


def test_bad_layouts_and_rows_are_refused():
    with pytest.raises(ConversionError, match="2-byte float"):
        RowLayout(CacheQuant(), 64, 16, torch.float32)
    with pytest.raises(ConversionError, match="latent ≥ 1"):
        RowLayout(CacheQuant(), 0, 16)
    layout = RowLayout(CacheQuant(4, 8, 64), 96, 32)
    with pytest.raises(ConversionError, match="do not fit a layout of 96 \\+ 32"):
        encode_rows(torch.zeros(2, 95), torch.zeros(2, 32), layout)
    with pytest.raises(ConversionError, match=f"not this layout's {layout.row_bytes} bytes"):
        decode_rows(torch.zeros(2, layout.row_bytes + 2, dtype=torch.uint8), layout)
    with pytest.raises(ValueError, match="uint8"):
        qc.write_rows(torch.zeros(1, 96), torch.zeros(1, 32), torch.zeros(4, 16, 128, dtype=torch.bfloat16),
                      torch.tensor([0]), layout)


def _paged(layout: RowLayout, lens: list[int], block_size: int = 16, seed: int = 1):
    """Requests' rows written through slot mappings into shuffled blocks, with a padding token (-1) mixed in."""
    g = torch.Generator().manual_seed(seed)
    blocks_per = [math.ceil(n / block_size) for n in lens]
    perm = torch.randperm(sum(blocks_per) + 3, generator=g)
    table = torch.zeros(len(lens), max(blocks_per), dtype=torch.int32)
    cache = torch.full((len(perm), block_size, layout.row_bytes), 0xAB, dtype=torch.uint8)
    segments, at = [], 0
    for b, n in enumerate(lens):
        table[b, :blocks_per[b]] = perm[at:at + blocks_per[b]].int()
        at += blocks_per[b]
        c, r = _segments(n, layout.latent, layout.rope, seed + b)
        slots = torch.tensor([int(table[b, t // block_size]) * block_size + t % block_size for t in range(n)])
        # one padding token among the real ones, as vLLM pads a batch
        qc.write_rows(torch.cat([c[:1], c]), torch.cat([r[:1], r]).unsqueeze(1), cache,
                      torch.cat([torch.tensor([-1]), slots]), layout)
        segments.append((c, r))
    return cache, table, segments


@pytest.mark.parametrize("fmt", [CacheQuant(4, None, 64), CacheQuant(4, 8, 32, hadamard=True)], ids=str)
def test_paged_decode_equals_dense_attention_over_the_quantised_rows(fmt):
    layout = RowLayout(fmt, 96, 32)
    lens = [5, 37, 16]
    cache, table, segments = _paged(layout, lens)
    heads, scale = 4, 0.11
    q = torch.randn(len(lens), heads, 96 + 32, generator=torch.Generator().manual_seed(9))
    out = qc.paged_decode(q, cache, table, torch.tensor(lens, dtype=torch.int32), scale, layout)
    for b, (c, r) in enumerate(segments):
        kc, kr = fake_quantize_row(c.float(), r.float(), fmt)
        keys = torch.cat([kc, kr], dim=-1)
        probs = torch.softmax(q[b] @ keys.T * scale, dim=-1)
        torch.testing.assert_close(out[b], probs @ kc, rtol=2e-4, atol=2e-4)
    untouched = cache.view(-1, layout.row_bytes)
    written = {int(table[b, t // 16]) * 16 + t % 16 for b, n in enumerate(lens) for t in range(n)}
    assert all(bool((untouched[s] == 0xAB).all()) for s in range(untouched.shape[0]) if s not in written)


def test_prefill_context_gather_follows_vllms_indexing():
    """The same token → (request, position) mapping as the bfloat16 gather (vLLM's op), then decoded."""
    layout = RowLayout(CacheQuant(4, 8, 64), 96, 32)
    lens = [20, 9]
    cache, table, segments = _paged(layout, lens)
    starts = torch.tensor([4, 0])  # the first request's context starts 4 tokens in (a chunk already served)
    counts = [lens[0] - 4, lens[1]]
    cu = torch.tensor([0, counts[0], sum(counts)])
    token_to_seq = torch.cat([torch.full((n,), b) for b, n in enumerate(counts)])
    got = qc.gather_context(cache, table, cu, token_to_seq, sum(counts), layout, torch.float32, starts)
    want = torch.cat([torch.cat(fake_quantize_row(c.float(), r.float(), layout.fmt), dim=-1)[int(starts[b]):]
                      for b, (c, r) in enumerate(segments)])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # and the byte rows it decodes are the ones the plain gather copies
    plain = torch.empty(sum(counts), layout.row_bytes, dtype=torch.uint8)
    gather_cache_rows(cache, plain, table, cu, token_to_seq, sum(counts), "auto", torch.ones(()), starts)
    torch.testing.assert_close(got, qc.row_reader(layout)(plain))


def test_vllms_cpu_context_gather_decodes_a_low_bit_cache():
    """The plugin's CPU backend hands vLLM's context path a LowBitCache; vLLM's CPU gather (patched, same keyword
    call as mla_attention's) then fills the workspace with the decoded rows, and still copies a plain cache."""
    from vllm import _custom_ops as ops

    from vllm_mha2mla.patches import read_low_bit_context_on_cpu

    read_low_bit_context_on_cpu()
    read_low_bit_context_on_cpu()  # idempotent
    layout = RowLayout(CacheQuant(4, 8, 64), 96, 32)
    lens = [20, 9]
    cache, table, _ = _paged(layout, lens)
    starts, counts = torch.tensor([4, 0]), [16, 9]
    cu = torch.tensor([0, 16, 25])
    workspace = torch.zeros(32, 128)
    ops.gather_mla_context_cache_cpu(src_cache=qc.LowBitCache(cache, layout), dst=workspace[:25], block_table=table,
                                     starts=starts, cu_seq_lens=cu)
    token_to_seq = torch.cat([torch.full((n,), b) for b, n in enumerate(counts)])
    want = qc.gather_context(cache, table, cu, token_to_seq, 25, layout, torch.float32, starts)
    torch.testing.assert_close(workspace[:25], want, rtol=0, atol=0)
    assert bool((workspace[25:] == 0).all())
    plain = torch.zeros(25, layout.row_bytes, dtype=torch.uint8)
    ops.gather_mla_context_cache_cpu(src_cache=cache, dst=plain, block_table=table, starts=starts, cu_seq_lens=cu)
    torch.testing.assert_close(qc.row_reader(layout)(plain), want)


def test_a_prefill_reads_its_own_tokens_as_the_cache_returns_them():
    """as_cached splits vLLM's [kv_c | k_pe] row at the SVD latent (a native row's kv_c also holds rotary keys):
    the reference model's set_cache_quant values, in the row's order and dtype."""
    fmt = CacheQuant(4, 8, 64)
    c, r = _segments(7, 100, 40)
    row = torch.cat([c, r], dim=-1).float()
    layout = RowLayout(fmt, 100, 40)
    kv_c, k_pe = row[:, :120], row[:, 120:].unsqueeze(1)  # kv_lora_rank 120: 20 rotary columns overflow into it
    got_c, got_pe = qc.as_cached(kv_c, k_pe, layout)
    want = torch.cat(fake_quantize_row(row[:, :100], row[:, 100:], fmt), dim=-1)
    assert got_c.dtype == torch.float32 and got_pe.shape == k_pe.shape
    torch.testing.assert_close(torch.cat([got_c, got_pe[:, 0]], dim=-1), want, rtol=0, atol=0)

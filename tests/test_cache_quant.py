"""The low-bit cache row format (`conversion/mla_format/cache_quant.py`): error bounds, packing, bytes, refusals.

The bounds are what the format promises the kernels and the quality study: a value read back is within half a
step (its group's scale / 2) of what was written, plus float16 rounding of the group's scale and minimum."""

from __future__ import annotations

import math

import pytest
import torch

from conversion.errors import ConversionError
from conversion.mla_format.cache_quant import (
    META_BYTES_PER_GROUP, CacheQuant, dequantize_groups, fake_quantize, fake_quantize_row, hadamard, pack_int4,
    quantize_groups, unpack_int4)


def _rows(seed: int = 0, tokens: int = 64, width: int = 200) -> torch.Tensor:
    """Rows shaped like an SVD latent: column scales falling 100-fold, a few outlier columns."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -1, width)
    x = torch.randn(tokens, width, generator=g) * scales
    x[:, 7] *= 20
    return x


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [16, 64, 96])  # 96 leaves a short last group at width 200
def test_read_back_is_within_half_a_step(bits, group):
    x = _rows()
    codes, scale, minimum = quantize_groups(x, bits, group)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    assert scale.shape == minimum.shape == (x.shape[0], math.ceil(x.shape[1] / group))
    back = dequantize_groups(codes, scale, minimum, group)
    step = scale.float().repeat_interleave(group, -1)[:, : x.shape[1]]
    fp16_slack = 1e-3 * x.abs().amax(-1, keepdim=True)  # the scale and minimum are float16
    assert ((back - x).abs() <= step / 2 + fp16_slack).all()
    # The short last group's range is its own values' range, not widened by padding.
    last = x[:, (math.ceil(x.shape[1] / group) - 1) * group:]
    want = (last.amax(-1) - last.amin(-1)) / (2**bits - 1)
    torch.testing.assert_close(scale[:, -1].float(), want, rtol=2e-3, atol=1e-6)


def test_eight_bits_are_closer_than_four_and_groups_closer_than_one_scale_a_row():
    x = _rows(1)
    err = {k: (fake_quantize(x, b, g) - x).pow(2).mean().item()
           for k, (b, g) in {"4/64": (4, 64), "8/64": (8, 64), "4/row": (4, x.shape[1])}.items()}
    assert err["8/64"] < err["4/64"] / 100
    assert err["4/64"] < err["4/row"] / 2


def test_a_constant_group_reads_back_exactly():
    x = torch.full((3, 64), 0.375)
    codes, scale, minimum = quantize_groups(x, 4, 32)
    assert (scale == 0).all() and (codes == 0).all()
    assert torch.equal(dequantize_groups(codes, scale, minimum, 32), x)


@pytest.mark.parametrize("width", [1, 2, 63, 64])
def test_int4_packing_round_trips(width):
    codes = torch.randint(0, 16, (5, width), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, math.ceil(width / 2)) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, width), codes)
    assert torch.equal(packed[:, 0] & 0x0F, codes[:, 0])  # even column in the low nibble


@pytest.mark.parametrize("n", [64, 96, 200])
def test_hadamard_is_orthonormal(n):
    h = hadamard(n, torch.float64)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)


def test_hadamard_rotation_spreads_an_outlier_column_and_quantises_it_better():
    x = _rows(2, width=128)
    x[:, 3] *= 50  # one column far larger than its group
    plain = CacheQuant(latent_bits=4, rope_bits=None, group=32)
    rotated = CacheQuant(latent_bits=4, rope_bits=None, group=32, hadamard=True)
    rope = torch.randn(x.shape[0], 8)
    err_plain = (fake_quantize_row(x, rope, plain)[0] - x).pow(2).mean()
    latent_rotated, rope_read = fake_quantize_row(x, rope, rotated)
    assert (latent_rotated - x).pow(2).mean() < err_plain
    assert torch.equal(rope_read, rope)  # rope_bits None: the rotary columns untouched


def test_row_bytes_count_codes_and_group_metadata():
    fmt = CacheQuant(latent_bits=4, rope_bits=4, group=64)
    assert fmt.row_bytes(2048, 512) == 2048 // 2 + 32 * META_BYTES_PER_GROUP + 512 // 2 + 8 * META_BYTES_PER_GROUP
    bf16 = (2048 + 512) * 2
    assert bf16 / fmt.row_bytes(2048, 512) > 3.5  # issue 33's capacity target at the paper's d_kv 64 row
    keep_rope = CacheQuant(latent_bits=4, rope_bits=None, group=64)
    assert keep_rope.row_bytes(96, 96) == 48 + 2 * META_BYTES_PER_GROUP + 96 * 2
    assert fmt.row_bytes(0, 0) == 0


@pytest.mark.parametrize("kwargs,match", [
    ({"latent_bits": 3}, "latent_bits=3"), ({"rope_bits": 2}, "rope_bits=2"), ({"group": 1}, "group=1")])
def test_bad_formats_are_refused(kwargs, match):
    with pytest.raises(ConversionError, match=match):
        CacheQuant(**kwargs)


def _converted(tiny_model_factory, tmp_path, rope_dim: int = 8, d_kv: int = 40, dtype=torch.float32):
    from conversion import ConvertOptions, convert, load_reference
    from tests.helpers import TinySpec

    src = tiny_model_factory(TinySpec())
    convert(src, tmp_path / "mla", ConvertOptions(rope_dim=rope_dim, strategy="low", d_kv=d_kv, dtype="float32"),
            show_progress=False)
    return load_reference(tmp_path / "mla", dtype=dtype)


def test_the_reference_reads_a_low_bit_cache_per_row_so_cached_decoding_equals_full_recompute(
        tiny_model_factory, tmp_path):
    """Quantisation is per token, so a row read from the cache is the row recomputed: incremental decoding with a
    low-bit cache equals the full forward with it (the property the paged cache relies on). In float64: in float32
    the full and the incremental forward round a latent value differently often enough that one lands on the other
    side of a 4-bit rounding boundary (2.7e-4 apart on one machine's BLAS, equal on another's)."""
    from transformers.cache_utils import DynamicCache

    from conversion.reference_model import set_cache_quant

    model = _converted(tiny_model_factory, tmp_path, dtype=torch.float64)
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        exact = model(ids).logits
        set_cache_quant(model, CacheQuant(latent_bits=4, rope_bits=4, group=16))
        full = model(ids).logits
        cache = DynamicCache()
        steps = [model(ids[:, :12], past_key_values=cache, use_cache=True).logits]
        for t in range(12, 20):
            steps.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert (full - exact).abs().max() > 1e-3  # the 4-bit rows do change the logits
    lay = model.model.layers[0].self_attn.layout
    cached = cache.layers[0].keys[0, 0]  # [tokens, kv_lora_rank]: the stored latent part
    latent = cached[:, : lay.latent_width]
    for row in latent:  # each stored row takes at most 16 levels per 16-column group
        for group in row.split(16):
            assert group.unique().numel() <= 16
    with torch.no_grad():  # None restores the model's dtype
        torch.testing.assert_close(set_cache_quant(model, None)(ids).logits, exact, atol=0, rtol=0)


def test_eight_bit_rows_keep_the_reference_logits_close(tiny_model_factory, tmp_path):
    from conversion.reference_model import set_cache_quant

    model = _converted(tiny_model_factory, tmp_path)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        exact = model(ids).logits.log_softmax(-1)
        err = {}
        for bits in (8, 4):
            set_cache_quant(model, CacheQuant(latent_bits=bits, rope_bits=bits, group=16))
            err[bits] = (model(ids).logits.log_softmax(-1) - exact).abs().max().item()
    assert err[8] < err[4] / 8  # 16x finer steps: the error shrinks with them

"""Exactness of the MHA2MLA → vLLM MLA layout mapping (float64, random weights).

Three computations of one attention layer must agree:
- direct MHA2MLA attention from the compact factors (rotary dot + nope dot through W_up_k);
- the mapped, up-projected form (vLLM's prefill path, and the reference model's);
- the mapped, absorbed form (vLLM's decode path: MQA over [latent | k_pe]).
"""

import math

import pytest
import torch

from conversion.errors import ConversionError
from conversion.mla_format.layout import MLALayout, max_d_kv_for_cache, native_prefill_dims, plan_exact_layout, plan_native_layout
from conversion.mla_format.inputs import distinct_zero_index, mla_inputs
from conversion.rope import apply_partial_rope

CASES = [
    # (h, g, d, rope_dim, d_kv, cache size or None for exact sizes)
    (8, 4, 64, 16, 24, 576),
    (32, 32, 128, 8, 10, 576),  # Llama-2-7B at 576: 24 kv-heads' rope keys in the latent
    (9, 3, 64, 32, 40, 576),
    (9, 3, 64, 8, 32, 320),
    (4, 2, 128, 128, 128, 576),  # nothing removed, rope wider than the slot
    (9, 3, 64, 8, 32, None),  # exact sizes (plugin backend)
    (32, 32, 128, 16, 16, None),  # the paper's 1024-value Llama-2-7B config
]


def _layout(h, g, d, rd, dkv, size):
    return plan_native_layout(h, g, d, rd, dkv, size) if size else plan_exact_layout(h, g, d, rd, dkv)


def _causal_softmax(scores):
    t = scores.shape[-1]
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_mapped_prefill_and_decode_equal_direct_attention(case):
    h, g, d, rd, dkv, size = case
    lay = _layout(*case)
    gen = torch.Generator().manual_seed(sum(case[:5]))
    t, hidden = 7, 48
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x = rnd(t, hidden)
    w_q, w_down, w_kr = rnd(h * d, hidden), rnd(lay.latent_width, hidden), rnd(lay.rope_total, hidden)
    w_up_k, w_up_v = rnd(g * (d - rd), lay.latent_width), rnd(g * d, lay.latent_width)
    inv_freq = torch.rand(g, rd // 2, generator=gen, dtype=torch.float64).float()
    pos = torch.arange(t) * 3 + 5
    scale = 1 / math.sqrt(d)

    # Direct MHA2MLA attention.
    q = (x @ w_q.T).view(t, h, d)
    grp = torch.arange(h) // (h // g)
    q_rope = apply_partial_rope(q[..., :rd], pos, inv_freq[grp])
    c = x @ w_down.T
    k_rope = apply_partial_rope((x @ w_kr.T).view(t, g, rd), pos, inv_freq)
    k_nope = (c @ w_up_k.T).view(t, g, d - rd)
    v = (c @ w_up_v.T).view(t, g, d)
    scores = torch.einsum("thr,shr->hts", q_rope, k_rope[:, grp]) + torch.einsum("thn,shn->hts", q[..., rd:], k_nope[:, grp])
    direct = torch.einsum("hts,shd->thd", _causal_softmax(scores * scale), v[:, grp])

    # Mapped into vLLM's layout.
    q_mla, kv = mla_inputs(x @ w_q.T, torch.cat([c, x @ w_kr.T], -1), pos, inv_freq[grp], inv_freq,
                           lay.q_gather_index, lay.kv_gather_index, d, rd, lay.latent_width)
    assert q_mla.shape == (t, h, lay.qk_nope_head_dim + lay.qk_rope_head_dim)
    # The reference model's indices (a zero of its own per padding position) give the same tensors.
    q_idx, q_zeros = distinct_zero_index(lay.q_gather_index, lay.compact_q_dim)
    kv_idx, kv_zeros = distinct_zero_index(lay.kv_gather_index, lay.compact_kv_dim)
    q_same, kv_same = mla_inputs(x @ w_q.T, torch.cat([c, x @ w_kr.T], -1), pos, inv_freq[grp], inv_freq,
                                 q_idx, kv_idx, d, rd, lay.latent_width, q_zeros, kv_zeros)
    assert torch.equal(q_same, q_mla) and torch.equal(kv_same, kv)
    assert len(set(q_idx.tolist())) == q_idx.numel()  # no two outputs share an input
    assert kv.shape == (t, lay.kv_lora_rank + lay.qk_rope_head_dim)
    kv_b = lay.build_kv_b_proj(w_up_k, w_up_v).view(h, lay.qk_nope_head_dim + lay.v_head_dim, lay.kv_lora_rank)
    w_uk, w_uv = kv_b.split([lay.qk_nope_head_dim, lay.v_head_dim], dim=1)
    latent, k_pe = kv.split([lay.kv_lora_rank, lay.qk_rope_head_dim], dim=-1)
    q_nope, q_pe = q_mla.split([lay.qk_nope_head_dim, lay.qk_rope_head_dim], dim=-1)

    # Up-projected (prefill) form.
    k_up = torch.einsum("hnl,sl->shn", w_uk, latent)
    v_up = torch.einsum("hvl,sl->shv", w_uv, latent)
    s_pre = torch.einsum("thn,shn->hts", q_nope, k_up) + torch.einsum("thr,sr->hts", q_pe, k_pe)
    prefill = torch.einsum("hts,shv->thv", _causal_softmax(s_pre * scale), v_up)

    # Absorbed (decode) form: MQA over the cached row.
    q_lat = torch.einsum("thn,hnl->thl", q_nope, w_uk)
    s_dec = torch.einsum("thl,sl->hts", q_lat, latent) + torch.einsum("thr,sr->hts", q_pe, k_pe)
    o_lat = torch.einsum("hts,sl->thl", _causal_softmax(s_dec * scale), latent)
    decode = torch.einsum("thl,hvl->thv", o_lat, w_uv)

    for mapped in (prefill, decode):
        assert torch.all(mapped[..., d:] == 0)  # padded value dims stay zero
        err = (mapped[..., :d] - direct).norm() / direct.norm()
        assert err < 1e-12, err


def test_native_layouts_match_vllm_shapes():
    lay = plan_native_layout(32, 32, 128, 8, 10, 576)
    assert (lay.kv_lora_rank, lay.qk_rope_head_dim, lay.qk_nope_head_dim, lay.v_head_dim) == (512, 64, 128, 128)
    assert lay.is_native and lay.cache_values == 576 and lay.essential_values == 576
    assert plan_native_layout(9, 3, 64, 8, 32, 320).kv_lora_rank == 256
    assert native_prefill_dims(64) == (64, 128) and native_prefill_dims(96) == (128, 128)
    assert not plan_exact_layout(32, 32, 128, 16, 16).is_native


def test_budget_arithmetic():
    assert max_d_kv_for_cache(32, 8, 576) == 10  # the doc's Llama-2-7B example
    assert max_d_kv_for_cache(3, 8, 576) == 170  # rope keys fit the slot, the latent gets 512
    assert max_d_kv_for_cache(8, 64, 320) < 1


def test_overfull_layouts_are_refused():
    with pytest.raises(ConversionError, match="kv_lora_rank"):
        plan_native_layout(32, 32, 128, 8, 11, 576)
    with pytest.raises(ConversionError, match="prefill"):
        native_prefill_dims(256)


def test_layout_round_trips_through_dict():
    lay = plan_native_layout(9, 3, 64, 8, 32, 576)
    assert MLALayout.from_dict(lay.to_dict()) == lay


def test_tensor_parallel_shards_of_the_query_index_tile_the_full_index():
    lay = plan_native_layout(8, 4, 64, 16, 24, 576)
    full = torch.cat([torch.randn(8 * 64), torch.zeros(1)])
    want = full[lay.q_gather_index].view(8, -1)
    for tp in (2, 4, 8):
        n = 8 // tp
        for rank in range(tp):
            shard = torch.cat([full[rank * n * 64:(rank + 1) * n * 64], torch.zeros(1)])
            got = shard[lay.q_gather_index_for_heads(rank * n, (rank + 1) * n)].view(n, -1)
            assert torch.equal(got, want[rank * n:(rank + 1) * n])


@pytest.mark.slow
def test_constants_are_built_on_cpu_under_another_default_device(tiny_model_factory, tmp_path):
    """vLLM builds models under a device context; the plugin's constants must not follow it."""
    import json

    from conversion import ConvertOptions, convert
    from conversion.mla_format.spec import MHA2MLASpec
    from tests.helpers import TinySpec

    convert(tiny_model_factory(TinySpec()), tmp_path / "m", ConvertOptions(rope_dim=8, strategy="high", d_kv=16),
            show_progress=False)
    spec = MHA2MLASpec.from_config(json.loads((tmp_path / "m" / "config.json").read_text()))
    with torch.device("meta"):
        tensors = [spec.layer_inv_freq(1), spec.layout.q_gather_index_for_heads(0, 2), spec.layout.kv_gather_index]
    assert all(t.device.type == "cpu" for t in tensors)
    assert tensors[0].shape == (2, 4)

"""The plugin's prefill for any MLA head shape: per-head rope-column compaction and the
prefill backend's attention, against attention over vLLM's full ``qk_nope + qk_rope`` dims."""

from types import SimpleNamespace

import pytest
import torch

from conversion.mla_format.layout import plan_exact_layout, plan_native_layout
from conversion.mla_format.inputs import mla_inputs
from vllm_mha2mla.attention.head_compaction import compact_heads, compact_keys, head_compaction, padded_heads
from vllm_mha2mla.attention.prefill import MHA2MLAPrefillBackend, varlen_attention_reference

LAYOUTS = {
    "exact_gqa": lambda: plan_exact_layout(8, 4, 64, 16, 24),
    "exact_llama2_1024": lambda: plan_exact_layout(32, 32, 128, 16, 16),
    "native_overflow": lambda: plan_native_layout(32, 32, 128, 8, 10, 576),  # rope keys past the slot
    "native_llama2_576": lambda: plan_native_layout(32, 32, 128, 2, 16, 576),  # nope 126 of 128 used
    "native_gqa_576": lambda: plan_native_layout(16, 4, 64, 16, 32, 576),  # v and nope padded to 128
    "exact_mha_small": lambda: plan_exact_layout(9, 3, 64, 32, 32),
}


def _mla_qk(layout, tokens: int, seed: int = 0, parts: bool = False):
    """Queries and keys exactly as vLLM's prefill sees them (q from mla_inputs, k = [k_nope | k_pe],
    k_nope as ``kv_b_proj`` makes it: zero past the nope columns a head can use); with ``parts``
    also k_nope ``[T, H, qk_nope]`` and k_pe ``[T, 1, qk_rope]``."""
    g = torch.Generator().manual_seed(seed)
    h, d, r = layout.num_heads, layout.head_dim, layout.rope_dim
    q_compact = torch.randn(tokens, h * d, generator=g, dtype=torch.float64)
    kv_compact = torch.randn(tokens, layout.latent_width + layout.rope_total, generator=g, dtype=torch.float64)
    inv_q = torch.rand(h, r // 2, generator=g, dtype=torch.float64)
    inv_k = inv_q[:: layout.group_size]
    pos = torch.arange(tokens)
    q, kv = mla_inputs(q_compact, kv_compact, pos, inv_q, inv_k, layout.q_gather_index, layout.kv_gather_index,
                       d, r, layout.latent_width)
    k_nope = torch.randn(tokens, h, layout.qk_nope_head_dim, generator=g, dtype=torch.float64)
    k_nope[..., layout.nope_columns_used:] = 0
    k_pe = kv[:, None, layout.kv_lora_rank:]
    k = torch.cat([k_nope, k_pe.expand(-1, h, -1)], dim=-1)
    return (q, k, k_nope, k_pe) if parts else (q, k)


def _compaction(layout, pad_to: int = 1, start: int = 0, heads: int | None = None):
    heads = layout.num_heads if heads is None else heads
    return head_compaction(layout, start, heads, layout.v_head_dim, pad_to)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_compacted_heads_give_the_same_scores(name):
    layout = LAYOUTS[name]()
    q, k = _mla_qk(layout, tokens=12)
    heads = _compaction(layout)
    assert heads.rope_columns.shape[1] <= layout.rope_dim and heads.width <= layout.head_dim + layout.rope_overflow
    assert not q[..., layout.nope_columns_used : layout.qk_nope_head_dim].any()  # what makes dropping them exact
    qc, kc = compact_heads(q, heads), compact_heads(k, heads)
    assert qc.shape == (12, layout.num_heads, heads.padded_dim)
    full = torch.einsum("qhd,khd->hqk", q, k)
    compact = torch.einsum("qhd,khd->hqk", qc, kc)
    torch.testing.assert_close(compact, full, rtol=1e-12, atol=1e-12)


def _shards_and_layers(name):
    """(layout, first head, heads) cases of one named layout: the whole layer, the second half of
    its heads (a tensor-parallel rank) and, for exact layouts, a layer with its own rotary dims."""
    layout = LAYOUTS[name]()
    cases = [(layout, 0, layout.num_heads), (layout, layout.num_heads // 2, layout.num_heads - layout.num_heads // 2)]
    if layout.kv_lora_rank == layout.latent_width and not layout.rope_overflow:
        cases.append((layout.with_rope(layout.rope_dim // 2 // 2 * 2 or 2), 0, layout.num_heads))
    return cases


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("pad_to", [1, 8, 64])
def test_keys_built_compact_equal_compacted_full_keys(name, pad_to):
    """The GPU implementation writes prefill keys compact from k_nope (a strided view, as vLLM's
    split of ``kv_b_proj``'s output is) and k_pe; they must equal the compaction of vLLM's key."""
    for layout, start, count in _shards_and_layers(name):
        _, k, k_nope, k_pe = (x if x.shape[1] == 1 else x[:, start : start + count].contiguous()
                              for x in _mla_qk(layout, tokens=7, parts=True))
        values = torch.randn(7, count, layout.v_head_dim, dtype=torch.float64)
        strided_nope = torch.cat([k_nope, values], dim=-1)[..., : layout.qk_nope_head_dim]
        heads = _compaction(layout, pad_to, start, count)
        assert heads.padded_dim % pad_to == 0 and heads.padded_dim >= max(heads.width, layout.v_head_dim)
        built = compact_keys(strided_nope, k_pe, heads)
        assert built.shape == (7, count, heads.padded_dim)
        assert torch.equal(built, compact_heads(k, heads))
        assert not built[..., heads.width :].any()
        for empty in (compact_keys(strided_nope[:0], k_pe[:0], heads), compact_heads(k[:0], heads)):
            assert empty.shape == (0, count, heads.padded_dim)  # a rank's empty context chunk


def test_llama2_heads_compact_to_128_dims():
    """Llama-2-7B: 126 nope + 2 own rotary columns at the native 576 layout (vLLM's heads: 192),
    112 + 16 at the paper's 1024 values (624): FlashAttention's 128-wide kernel, no padding."""
    for layout, vllm_width in ((LAYOUTS["native_llama2_576"](), 192), (LAYOUTS["exact_llama2_1024"](), 624)):
        heads = _compaction(layout, pad_to=8)
        assert (heads.qk_width, heads.width, heads.padded_dim) == (vllm_width, 128, 128)


def test_compaction_without_mha2mla_layout_only_pads():
    heads = padded_heads(4, 48, 64, 128, pad_to=8)
    x = torch.randn(3, 4, 112)
    assert heads.rope_columns is None and heads.padded_dim == 128 and not heads.narrows_keys
    assert torch.equal(compact_heads(x, heads)[..., :112], x) and not compact_heads(x, heads)[..., 112:].any()
    with pytest.raises(ValueError, match="not MHA2MLA"):
        compact_keys(x[..., :48], x[:, :1, 48:], heads)


def test_rope_columns_follow_tensor_parallel_shards():
    layout = plan_exact_layout(8, 4, 64, 16, 24)
    whole = layout.rope_slot_columns(0, 8)
    assert torch.equal(torch.cat([layout.rope_slot_columns(0, 4), layout.rope_slot_columns(4, 8)]), whole)
    assert whole[3].tolist() == list(range(16, 32))  # head 3 is in kv-head 1
    q, k = _mla_qk(layout, tokens=5)
    for start in (0, 4):  # a rank's compact heads = those heads of the whole compaction
        shard = _compaction(layout, start=start, heads=4)
        want = compact_heads(k, _compaction(layout))[:, start : start + 4]
        assert torch.equal(compact_heads(k[:, start : start + 4].contiguous(), shard), want)


def _backend(layout, hf_config=None):
    config = SimpleNamespace(model_config=SimpleNamespace(hf_config=hf_config))
    backend = MHA2MLAPrefillBackend(num_heads=layout.num_heads, scale=0.125, kv_lora_rank=layout.kv_lora_rank,
                                    qk_nope_head_dim=layout.qk_nope_head_dim,
                                    qk_rope_head_dim=layout.qk_rope_head_dim, v_head_dim=layout.v_head_dim,
                                    vllm_config=config)
    backend.flash_attn = None  # CPU: the PyTorch path
    return backend


def _hf_config(layout):
    return SimpleNamespace(mha2mla={"format_version": 1, "layout": layout.to_dict(), "rope_pairs": [],
                                    "rope_theta": 10000.0})


@pytest.mark.parametrize("name", ["exact_llama2_1024", "exact_mha_small"])
def test_prefill_backend_equals_full_dim_attention(name):
    layout = LAYOUTS[name]()
    lens = [5, 1, 9]
    q, k = _mla_qk(layout, tokens=sum(lens))
    v = torch.randn(sum(lens), layout.num_heads, layout.v_head_dim, dtype=torch.float64)
    cu = torch.tensor([0, 5, 6, 15])
    backend = _backend(layout, _hf_config(layout))
    width = layout.qk_nope_head_dim + layout.qk_rope_head_dim
    assert backend.head_geometry(width).rope_columns is not None and backend.padded_dim == layout.head_dim
    backend.prepare_metadata(SimpleNamespace(query_start_loc=cu, max_query_len=9, chunked_context=None))
    out, lse = backend.run_prefill_new_tokens(q, k, v, return_softmax_lse=True)
    want, want_lse = varlen_attention_reference(q, k, v, cu, cu, 0.125, causal=True)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)  # float32 sums, different order
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["native_llama2_576", "native_overflow", "exact_llama2_1024"])
def test_prefill_backend_takes_keys_built_compact(name):
    """Keys the GPU implementation built compact give what vLLM's full keys give, for new tokens
    and context chunks; a key of neither width is refused."""
    layout = LAYOUTS[name]()
    q, k, k_nope, k_pe = _mla_qk(layout, tokens=9, parts=True)
    v = torch.randn(9, layout.num_heads, layout.v_head_dim, dtype=torch.float64)
    backend = _backend(layout, _hf_config(layout))
    compact = compact_keys(k_nope, k_pe, backend.head_geometry(q.shape[-1]))
    assert compact.shape[-1] == backend.padded_dim < k.shape[-1]
    cu, cu_k = torch.tensor([0, 4, 9]), torch.tensor([0, 6, 9])
    chunk = SimpleNamespace(cu_seq_lens=[cu_k], max_seq_lens=[6])
    backend.prepare_metadata(SimpleNamespace(query_start_loc=cu, max_query_len=5, chunked_context=chunk))
    for run in (lambda key: backend.run_prefill_new_tokens(q, key, v, return_softmax_lse=True),
                lambda key: backend.run_prefill_context_chunk(0, q, key, v)):
        (out, lse), (want, want_lse) = run(compact), run(k)
        assert torch.equal(out, want) and torch.equal(lse, want_lse)
    want, _ = varlen_attention_reference(q, k, v, cu, cu, 0.125, causal=True)
    torch.testing.assert_close(backend.run_prefill_new_tokens(q, compact, v, False), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="keys 100 wide"):
        backend.run_prefill_new_tokens(q, k[..., :100], v, False)


def test_query_is_compacted_once_per_layer_and_only_while_chunks_follow(monkeypatch):
    """vLLM passes one query to a layer's new-token call and to each context chunk: it is gathered
    once and dropped after the last chunk; a query changed in place, or another query, is
    gathered afresh (a stale compact query would attend with the wrong values)."""
    import vllm_mha2mla.attention.prefill as prefill

    layout = LAYOUTS["exact_llama2_1024"]()
    q, k, k_nope, k_pe = _mla_qk(layout, tokens=9, parts=True)
    v = torch.randn(9, layout.num_heads, layout.v_head_dim, dtype=torch.float64)
    backend = _backend(layout, _hf_config(layout))
    compact_k = compact_keys(k_nope, k_pe, backend.head_geometry(q.shape[-1]))
    gathered = []
    monkeypatch.setattr(prefill, "compact_heads", lambda x, heads: gathered.append(x) or compact_heads(x, heads))
    cu, cu_k = torch.tensor([0, 4, 9]), torch.tensor([0, 6, 9])
    chunk = SimpleNamespace(cu_seq_lens=[cu_k, cu_k], max_seq_lens=[6, 6])
    backend.prepare_metadata(SimpleNamespace(query_start_loc=cu, max_query_len=5, chunked_context=chunk))
    new_tokens = backend.run_prefill_new_tokens(q, compact_k, v, return_softmax_lse=False)
    chunks = [backend.run_prefill_context_chunk(i, q, compact_k, v)[0] for i in range(2)]
    assert len(gathered) == 1 and backend._query_memo is None
    torch.testing.assert_close(new_tokens, varlen_attention_reference(q, k, v, cu, cu, 0.125, causal=True)[0],
                               rtol=1e-5, atol=1e-5)
    for out in chunks:
        torch.testing.assert_close(out, varlen_attention_reference(q, k, v, cu, cu_k, 0.125, causal=False)[0],
                                   rtol=1e-5, atol=1e-5)
    backend.run_prefill_new_tokens(q, compact_k, v, return_softmax_lse=False)
    q.mul_(2.0)  # same object, new version
    out, _ = backend.run_prefill_context_chunk(1, q, compact_k, v)
    torch.testing.assert_close(out, varlen_attention_reference(q, k, v, cu, cu_k, 0.125, causal=False)[0],
                               rtol=1e-5, atol=1e-5)
    assert len(gathered) == 3 and backend._query_memo is None
    with torch.inference_mode():  # as vLLM runs the model: tensors without a version counter
        q_inference = q.clone()
        backend.run_prefill_new_tokens(q_inference, compact_k, v, return_softmax_lse=False)
        out, _ = backend.run_prefill_context_chunk(0, q_inference, compact_k, v)
    assert len(gathered) == 4 and backend._query_memo is not None
    torch.testing.assert_close(out, varlen_attention_reference(q, k, v, cu, cu_k, 0.125, causal=False)[0],
                               rtol=1e-5, atol=1e-5)
    backend.prepare_metadata(SimpleNamespace(query_start_loc=cu, max_query_len=5, chunked_context=None))
    backend.run_prefill_new_tokens(q, compact_k, v, return_softmax_lse=False)
    assert len(gathered) == 5 and backend._query_memo is None  # no chunk follows: nothing kept


def test_gpu_implementation_builds_keys_compact_only_where_narrower():
    """``MHA2MLATritonImpl`` hands vLLM's prefill its keys compact where that is narrower than
    vLLM's key (the backend takes either: a key as wide as its query is the full one), and finds
    its layer's layout from both head dims — one kv-head's layers are all ``d`` wide whatever
    their rotary dims, so the width alone would not tell them apart."""
    from vllm_mha2mla.attention.gpu_backend import MHA2MLATritonImpl
    from vllm_mha2mla.attention.prefill import layer_layout_for_dims

    config = SimpleNamespace(model_config=SimpleNamespace(hf_config=None))
    for name, narrower in (("native_llama2_576", True), ("exact_llama2_1024", True), ("native_gqa_576", False)):
        layout = LAYOUTS[name]()
        impl = SimpleNamespace(num_heads=layout.num_heads, qk_nope_head_dim=layout.qk_nope_head_dim,
                               qk_rope_head_dim=layout.qk_rope_head_dim, v_head_dim=layout.v_head_dim)
        config.model_config.hf_config = _hf_config(layout)
        heads = MHA2MLATritonImpl._compact_prefill_keys(impl, config)
        assert (heads is not None) == narrower
        if heads is not None:
            q, k, k_nope, k_pe = _mla_qk(layout, tokens=5, parts=True)
            built = MHA2MLATritonImpl._concat_k_nope_k_pe(SimpleNamespace(_prefill_heads=heads), k_nope, k_pe)
            assert torch.equal(built, compact_heads(k, heads)) and built.shape[-1] < k.shape[-1]
    mqa = plan_exact_layout(4, 1, 60, 4, 40)  # d = 60: not a multiple of 8, so keys are built compact
    layer = mqa.with_rope(8)
    assert layer_layout_for_dims(mqa, layer.qk_nope_head_dim, layer.qk_rope_head_dim) == layer
    impl = SimpleNamespace(num_heads=4, qk_nope_head_dim=layer.qk_nope_head_dim, qk_rope_head_dim=layer.qk_rope_head_dim,
                           v_head_dim=layer.v_head_dim)
    config.model_config.hf_config = _hf_config(mqa)
    heads = MHA2MLATritonImpl._compact_prefill_keys(impl, config)
    _, k, k_nope, k_pe = _mla_qk(layer, tokens=5, parts=True)
    assert heads.nope_kept == 52 and torch.equal(compact_keys(k_nope, k_pe, heads), compact_heads(k, heads))
    with pytest.raises(ValueError, match="fit no rotary width"):
        layer_layout_for_dims(mqa, 50, 6)


def test_one_backend_serves_layers_of_different_rotary_dims():
    """vLLM hands one prefill backend every layer of a group; a checkpoint whose layers keep
    different rotary dims is told apart by query width, each layer compacted by its own columns."""
    from vllm_mha2mla.attention.prefill import layer_layout_for_width

    widest = plan_exact_layout(8, 4, 64, 16, 24)  # what config.json's layout describes
    backend = _backend(widest, _hf_config(widest))
    cu = torch.tensor([0, 5, 12])
    backend.prepare_metadata(SimpleNamespace(query_start_loc=cu, max_query_len=7, chunked_context=None))
    for layout in (widest, widest.with_rope(8), widest.with_rope(2), widest):
        width = layout.qk_nope_head_dim + layout.qk_rope_head_dim
        assert layer_layout_for_width(widest, width) == layout
        q, k = _mla_qk(layout, tokens=12, seed=width)
        v = torch.randn(12, layout.num_heads, layout.v_head_dim, dtype=torch.float64)
        out = backend.run_prefill_new_tokens(q, k, v, return_softmax_lse=False)
        torch.testing.assert_close(out, varlen_attention_reference(q, k, v, cu, cu, 0.125, causal=True)[0],
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fits no rotary width"):
        layer_layout_for_width(widest, 64 + 3 * 8 + 1)


def test_context_chunk_is_unmasked_and_returns_lse():
    layout = LAYOUTS["exact_gqa"]()
    q, _ = _mla_qk(layout, tokens=4, seed=1)
    _, k = _mla_qk(layout, tokens=10, seed=2)
    v = torch.randn(10, layout.num_heads, layout.v_head_dim, dtype=torch.float64)
    cu_q, cu_k = torch.tensor([0, 3, 4]), torch.tensor([0, 7, 10])
    backend = _backend(layout, _hf_config(layout))
    chunk = SimpleNamespace(cu_seq_lens=[cu_k], max_seq_lens=[7])
    backend.prepare_metadata(SimpleNamespace(query_start_loc=cu_q, max_query_len=3, chunked_context=chunk))
    out, lse = backend.run_prefill_context_chunk(0, q, k, v)
    for seq, (qs, qe, ks, ke) in enumerate([(0, 3, 0, 7), (3, 4, 7, 10)]):
        scores = torch.einsum("qhd,khd->hqk", q[qs:qe], k[ks:ke]) * 0.125
        torch.testing.assert_close(lse[:, qs:qe].double(), scores.logsumexp(-1), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out[qs:qe], torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[ks:ke]), rtol=1e-5, atol=1e-5)


def test_without_an_mha2mla_config_heads_are_padded_not_compacted():
    layout = LAYOUTS["exact_gqa"]()
    backend = _backend(layout)
    assert backend.head_geometry(layout.qk_nope_head_dim + layout.qk_rope_head_dim).rope_columns is None
    assert backend.padded_dim == 48 + 64  # qk_nope 48 + qk_rope 64, already a multiple of 8


def test_padded_value_heads_come_back_contiguous():
    """vLLM merges context-chunk and new-token outputs and requires equal strides."""
    layout = LAYOUTS["native_overflow"]()  # qk 128 + 8 rope columns = 136 > v 128: padded
    lens = [4, 3]
    q, k = _mla_qk(layout, tokens=7)
    v = torch.randn(7, layout.num_heads, layout.v_head_dim, dtype=torch.float64)
    backend = _backend(layout, _hf_config(layout))
    assert backend.padded_dim > layout.v_head_dim
    cu = torch.tensor([0, 4, 7])
    chunk = SimpleNamespace(cu_seq_lens=[cu], max_seq_lens=[4])
    backend.prepare_metadata(SimpleNamespace(query_start_loc=cu, max_query_len=4, chunked_context=chunk))
    new, _ = backend.run_prefill_new_tokens(q, k, v, return_softmax_lse=True)
    ctx, _ = backend.run_prefill_context_chunk(0, q, k, v)
    assert new.is_contiguous() and ctx.is_contiguous() and new.stride() == ctx.stride()
    assert new.shape[-1] == layout.v_head_dim and sum(lens) == new.shape[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_prefill_backend_equals_vllms_dense_cpu_prefill(dtype):
    """The plugin's CPU prefill (fused flash attention on compacted heads) against vLLM's own
    CPU SDPA prefill on the full ``qk_nope + qk_rope`` dims: new tokens (causal, with LSE) and a
    context chunk (unmasked)."""
    from vllm_mha2mla.attention.prefill import CPUSDPAMLAPrefillBackend, MHA2MLACPUPrefillBackend

    layout = LAYOUTS["exact_mha_small"]()
    kwargs = dict(num_heads=layout.num_heads, scale=0.125, kv_lora_rank=layout.kv_lora_rank,
                  qk_nope_head_dim=layout.qk_nope_head_dim, qk_rope_head_dim=layout.qk_rope_head_dim,
                  v_head_dim=layout.v_head_dim)
    config = SimpleNamespace(model_config=SimpleNamespace(hf_config=_hf_config(layout)))
    ours, vllms = MHA2MLACPUPrefillBackend(vllm_config=config, **kwargs), CPUSDPAMLAPrefillBackend(vllm_config=config,
                                                                                                   **kwargs)
    assert ours.padded_dim == layout.head_dim  # 32 nope + 32 own rope columns; v (64) fits
    q, k = (x.to(dtype) for x in _mla_qk(layout, tokens=15))
    v = torch.randn(15, layout.num_heads, layout.v_head_dim).to(dtype)
    cu = torch.tensor([0, 5, 6, 15])
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for causal, cu_k in ((True, cu), (False, torch.tensor([0, 2, 9, 15]))):
        want, want_lse = vllms._ragged_sdpa(q, k, v, cu, cu_k, causal, True)
        got, got_lse = ours._ragged_sdpa(q, k, v, cu, cu_k, causal, True)
        assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got.float(), want.float(), **tol)
        torch.testing.assert_close(got_lse.float(), want_lse.float(), **tol)
    new_only = ours._ragged_sdpa(q, k, v, cu, cu, True, False)
    assert torch.equal(new_only, ours._ragged_sdpa(q, k, v, cu, cu, True, True)[0])
    assert new_only.shape == (15, layout.num_heads, layout.v_head_dim)

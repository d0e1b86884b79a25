"""Partial-RoPE pair selection and rotation."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers import LlamaConfig

from conversion.errors import ConversionError
from conversion.rope import (
    apply_partial_rope,
    check_rope_dim,
    retrieval_head_mask,
    retrieval_forced_pairs,
    rope_dim_permutation,
    rope_inv_freq,
    select_pairs_by_score,
    select_pairs_fixed,
    select_pairs_retrieval,
)


def test_fixed_strategies_keep_documented_pairs():
    assert select_pairs_fixed("high", 4, 32) == [0, 1, 2, 3]
    assert select_pairs_fixed("low", 4, 32) == [28, 29, 30, 31]
    assert select_pairs_fixed("uniform", 4, 32) == [0, 8, 16, 24]
    assert select_pairs_fixed("uniform", 4, 32, offset=3) == [3, 11, 19, 27]
    assert select_pairs_fixed("uniform", 32, 32) == list(range(32))


def test_fixed_strategies_reject_bad_input():
    with pytest.raises(ConversionError, match="unknown strategy"):
        select_pairs_fixed("middle", 2, 32)
    with pytest.raises(ConversionError, match="offset"):
        select_pairs_fixed("uniform", 4, 32, offset=8)
    with pytest.raises(ConversionError):
        select_pairs_fixed("high", 33, 32)


def test_two_norm_picks_highest_scores_per_layer_and_head():
    scores = torch.zeros(2, 3, 8)
    scores[0, 0, [5, 2]] = torch.tensor([3.0, 2.0])
    scores[0, 1, [7, 0]] = torch.tensor([1.0, 5.0])
    scores[0, 2] = torch.arange(8.0)  # best: 7, 6
    scores[1] = -torch.arange(8.0)  # best: 0, 1
    pairs = select_pairs_by_score(scores, 2)
    assert pairs.tolist() == [[[2, 5], [0, 7], [6, 7]], [[0, 1], [0, 1], [0, 1]]]


def test_retrieval_heads_are_the_top_share_of_all_kv_heads():
    """Ranked over the whole model (retrieval lives in a few layers), ties towards the lower (layer, head)."""
    scores = torch.tensor([[0.1, 0.9, 0.2], [0.5, 0.05, 0.5], [0.0, 0.7, 0.3], [0.2, 0.1, 0.0]])
    assert retrieval_head_mask(scores, 0.25).nonzero().tolist() == [[0, 1], [1, 0], [2, 1]]  # round(0.25 · 12) = 3
    assert retrieval_head_mask(scores, 0.01).nonzero().tolist() == [[0, 1]]  # at least one
    assert retrieval_head_mask(scores, 0.33).nonzero().tolist() == [[0, 1], [1, 0], [1, 2], [2, 1]]  # tie at 0.5: both
    assert retrieval_head_mask(scores, 1.0).all()
    tied = torch.zeros(2, 3)
    assert retrieval_head_mask(tied, 0.34).nonzero().tolist() == [[0, 0], [0, 1]]  # deterministic on ties


def test_retrieval_heads_keep_low_pairs_plus_the_best_scored_others_get_two_norm():
    g, n, r = 3, 16, 6
    scores = torch.rand(g, n, generator=torch.Generator().manual_seed(0))
    scores[:, 10:] *= 0.01  # the low frequencies score poorly: 2-norm would drop them
    mask = torch.tensor([False, True, False])
    pairs = select_pairs_retrieval(scores, mask, r, share=0.5)
    two_norm = select_pairs_by_score(scores, r)
    assert pairs.shape == (g, r) and pairs.dtype == torch.int64
    assert pairs[0].tolist() == two_norm[0].tolist() and pairs[2].tolist() == two_norm[2].tolist()  # exactly 2-norm
    assert not set(two_norm[1].tolist()) & {13, 14, 15}
    low = retrieval_forced_pairs(r, 0.5)
    assert low == 3
    rest = torch.sort(scores[1, :n - low], descending=True, stable=True).indices[:r - low]
    assert pairs[1].tolist() == sorted([13, 14, 15] + rest.tolist())  # the 3 lowest + the best-scored rest
    assert torch.equal(pairs, select_pairs_retrieval(scores, mask, r, share=0.5))  # deterministic
    # the whole budget low = the 'low' strategy for that head; 2-norm already holding a low pair changes nothing
    assert select_pairs_retrieval(scores, mask, r, 1.0)[1].tolist() == select_pairs_fixed("low", r, n)
    high = select_pairs_retrieval(scores, mask, r, 0.5, band="high")  # the fastest pairs instead, the rest by score
    rest = torch.sort(scores[1, low:], descending=True, stable=True).indices[:r - low] + low
    assert high[1].tolist() == sorted([0, 1, 2] + rest.tolist()) and high[0].tolist() == two_norm[0].tolist()
    loud_low = scores.clone()
    loud_low[1, 15] = 10.0
    got = select_pairs_retrieval(loud_low, mask, r, 0.5)[1].tolist()
    assert {13, 14, 15} <= set(got) and len(set(got)) == r


def test_retrieval_pairs_are_shared_by_a_gqa_group(tiny_model_factory, tmp_path):
    """One pair list per kv-head: every query head of the group is permuted with it (the plan's output shape)."""
    from conversion.calibration import CalibrationStats
    from conversion.plan import ConvertOptions, plan_conversion, select_rope_pairs
    from conversion.calibration import RetrievalScores
    from conversion.source import read_source_spec
    from tests.helpers import TinySpec

    spec = read_source_spec(tiny_model_factory(TinySpec(num_heads=6, num_kv_heads=2, hidden_size=384)))
    plan = plan_conversion(spec, ConvertOptions(rope_dim=8, d_kv=16, strategy="retrieval", retrieval_heads=0.25,
                                                retrieval_pairs=0.5, layout="exact"))
    pair_scores = torch.arange(2 * 2 * 32, dtype=torch.float64).view(2, 2, 32).flip(-1)  # high frequencies loudest
    head = torch.tensor([[0.1, 0.2], [0.9, 0.3]])  # layer 1, kv-head 0 retrieves
    stats = CalibrationStats(pair_scores, torch.zeros(2, 384, 384), 1,
                             RetrievalScores(head, head.repeat_interleave(3, -1), 1, 100, -1.0, 1))
    pairs = select_rope_pairs(plan, stats)
    assert pairs == [[[0, 1, 2, 3], [0, 1, 2, 3]], [[0, 1, 30, 31], [0, 1, 2, 3]]]


def test_bad_retrieval_options_are_refused():
    scores = torch.rand(2, 16)
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ConversionError, match=r"--retrieval-heads .* must be a share in \(0, 1\]"):
            retrieval_head_mask(scores, bad)
        with pytest.raises(ConversionError, match=r"--retrieval-pairs .* must be a share in \(0, 1\]"):
            select_pairs_retrieval(scores, torch.tensor([True, False]), 4, bad)
    with pytest.raises(ConversionError, match="unknown --retrieval-band 'middle'"):
        select_pairs_retrieval(scores, torch.tensor([True, False]), 4, 0.5, band="middle")
    with pytest.raises(ConversionError, match="cannot keep 17 of 16"):
        select_pairs_retrieval(scores, torch.tensor([True, False]), 17, 0.5)
    with pytest.raises(ConversionError, match="does not match"):
        select_pairs_retrieval(scores, torch.tensor([True, False, True]), 4, 0.5)


def test_rope_dim_validation():
    assert check_rope_dim(8, 64) == 4
    for bad in (7, 0, 66):
        with pytest.raises(ConversionError, match="rope-dim"):
            check_rope_dim(bad, 64)


def test_permutation_puts_pairs_first_in_rotate_half_layout():
    perm = rope_dim_permutation([1, 3], 8)
    assert perm == [1, 3, 5, 7, 0, 2, 4, 6]
    assert sorted(perm) == list(range(8))


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 2.0},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_partial_rotation_equals_full_rotation_on_kept_dims(scaling):
    """Rotating the gathered pairs with their own frequencies = Llama's RoPE on those dims."""
    d, theta = 32, 10000.0
    params = {"rope_type": "default", "rope_theta": theta} if scaling is None else {**scaling, "rope_theta": theta}
    cfg = LlamaConfig(hidden_size=4 * d, num_attention_heads=4, head_dim=d, rope_parameters=params,
                      max_position_embeddings=256)
    rotary = LlamaRotaryEmbedding(cfg)
    torch.testing.assert_close(rope_inv_freq(d, theta, scaling), rotary.inv_freq)
    x = torch.randn(1, 3, 10, d)  # [B, heads, T, d]
    pos = torch.arange(10)[None] * 7
    cos, sin = rotary(x, pos)
    full, _ = apply_rotary_pos_emb(x, x, cos, sin)
    pairs = [2, 5, 11]
    perm = rope_dim_permutation(pairs, d)
    block = x[..., perm[: 2 * len(pairs)]].transpose(1, 2)  # [B, T, heads, 2r]
    inv = rope_inv_freq(d, theta, scaling)[pairs].expand(3, -1)
    mine = apply_partial_rope(block, pos, inv).transpose(1, 2)
    torch.testing.assert_close(mine, full[..., perm[: 2 * len(pairs)]], rtol=1e-5, atol=1e-5)


def test_unsupported_rope_type_is_refused():
    with pytest.raises(ConversionError, match="yarn"):
        rope_inv_freq(64, 10000.0, {"rope_type": "yarn", "factor": 4.0})

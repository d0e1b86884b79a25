"""Partial-RoPE pair selection and rotation."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers import LlamaConfig

from conversion.errors import ConversionError
from conversion.rope import (
    apply_partial_rope,
    check_rope_dim,
    rope_dim_permutation,
    rope_inv_freq,
    select_pairs_by_score,
    select_pairs_fixed,
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

"""2-norm calibration statistics."""

import pytest
import torch

from conversion.calibration import load_or_collect, pair_norms, pair_scores_from_projections
from conversion.rope import select_pairs_by_score
from conversion.source import read_source_spec
from tests.helpers import TinySpec


def test_pair_norms_use_rotate_half_pairs():
    x = torch.zeros(1, 8)
    x[0, 1], x[0, 5] = 3.0, 4.0  # pair 1 of a head_dim-8 head = dims (1, 5)
    assert pair_norms(x, 8).tolist() == [[[0.0, 5.0, 0.0, 0.0]]]


def test_constructed_scores_rank_the_loud_pairs_first():
    """Queries of both heads in a group and the group's keys are loud on pairs 3 and 6."""
    tokens, h, g, d = 50, 4, 2, 16
    q = torch.randn(tokens, h, d) * 0.01
    k = torch.randn(tokens, g, d) * 0.01
    for pair in (3, 6):
        q[:, :2, pair] += 5.0  # heads 0 and 1 share kv-head 0
        k[:, 0, pair + d // 2] += 5.0
    q[:, 2:, 1] += 5.0  # kv-head 1's group is loud on pair 1 only
    k[:, 1, 1] += 5.0
    scores = pair_scores_from_projections(q.reshape(tokens, -1), k.reshape(tokens, -1), g, d) / tokens
    pairs = select_pairs_by_score(scores[None], 2)[0]
    assert pairs[0].tolist() == [3, 6]
    assert 1 in pairs[1].tolist()


@pytest.mark.slow
def test_statistics_are_cached_on_disk(tiny_model_factory, calib_text_file, tmp_path):
    spec = read_source_spec(tiny_model_factory(TinySpec()))
    text = calib_text_file.read_text()
    first = load_or_collect(spec, text, tmp_path, max_tokens=1024, seq_len=128)
    assert first.pair_scores.shape == (2, 2, 32) and first.num_tokens == 1024
    assert first.input_second_moment.shape == (2, 256, 256)
    files = list((tmp_path / "calibration").glob("*.pt"))
    assert len(files) == 1
    again = load_or_collect(spec, text, tmp_path, max_tokens=1024, seq_len=128)
    torch.testing.assert_close(again.pair_scores, first.pair_scores)

"""Low-rank key/value factorisation."""

import pytest
import torch

from conversion.errors import ConversionError
from conversion.lowrank import factorize_kv, relative_output_error, relative_weight_error


def _problem(seed=0, nk=48, nv=64, hidden=96, samples=4000):
    g = torch.Generator().manual_seed(seed)
    w_k = torch.randn(nk, hidden, generator=g, dtype=torch.float64)
    w_v = torch.randn(nv, hidden, generator=g, dtype=torch.float64)
    # Anisotropic, correlated activations, like real hidden states.
    mix = torch.randn(hidden, hidden, generator=g, dtype=torch.float64) * torch.logspace(0, -2, hidden, dtype=torch.float64)
    x = torch.randn(samples, hidden, generator=g, dtype=torch.float64) @ mix.T
    return w_k, w_v, x.T @ x / samples


def _errors(w_k, w_v, low, sigma=None):
    m = torch.cat([w_k, w_v])
    approx = torch.cat([low.w_up_k, low.w_up_v]) @ low.w_down
    if sigma is None:
        return relative_weight_error(m, approx)
    return relative_output_error(m, approx, sigma)


@pytest.mark.parametrize("method", ["joint", "split", "aw-joint"])
def test_error_decreases_monotonically_with_rank(method):
    w_k, w_v, sigma = _problem()
    errs = [_errors(w_k, w_v, factorize_kv(w_k, w_v, r, method, sigma), sigma if method == "aw-joint" else None)
            for r in (8, 16, 32, 64, 96)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    if method != "split":  # split halves the rank between keys and values
        assert errs[-1] < 1e-6  # full rank reproduces the weights


def test_activation_aware_beats_weight_svd_on_output_error():
    w_k, w_v, sigma = _problem(seed=1)
    for rank in (8, 24, 48):
        plain = _errors(w_k, w_v, factorize_kv(w_k, w_v, rank, "joint"), sigma)
        aware = _errors(w_k, w_v, factorize_kv(w_k, w_v, rank, "aw-joint", sigma), sigma)
        assert aware < plain, (rank, aware, plain)


def test_joint_is_optimal_in_weight_error_against_split():
    w_k, w_v, _ = _problem(seed=2)
    joint = _errors(w_k, w_v, factorize_kv(w_k, w_v, 32, "joint"))
    split = _errors(w_k, w_v, factorize_kv(w_k, w_v, 32, "split"))
    assert joint <= split + 1e-12


def test_split_keeps_key_and_value_latents_apart():
    w_k, w_v, _ = _problem(seed=3)
    low = factorize_kv(w_k, w_v, 20, "split")
    assert torch.all(low.w_up_k[:, 10:] == 0) and torch.all(low.w_up_v[:, :10] == 0)


def test_impossible_rank_and_missing_statistics_are_refused():
    w_k, w_v, _ = _problem()
    with pytest.raises(ConversionError, match="impossible"):
        factorize_kv(w_k, w_v, 97, "joint")
    with pytest.raises(ConversionError, match="calibration"):
        factorize_kv(w_k, w_v, 8, "aw-joint")


def test_greedy_allocation_is_optimal_and_respects_the_budget():
    import itertools

    from conversion.allocation import allocate_ranks, kept_energy

    gen = torch.Generator().manual_seed(0)
    energies = [sorted((torch.rand(64, generator=gen) * s).tolist(), reverse=True) for s in (1.0, 5.0, 0.2)]
    ranks = allocate_ranks(energies, total=96, step=16)
    assert sum(ranks) == 96 and all(r % 16 == 0 and 16 <= r <= 64 for r in ranks)
    best = max((c for c in itertools.product(range(16, 65, 16), repeat=3) if sum(c) == 96),
               key=lambda c: kept_energy(energies, c))
    assert kept_energy(energies, ranks) == pytest.approx(kept_energy(energies, best))
    assert ranks[1] > ranks[0] > ranks[2]  # the high-energy layer gets the most
    for bad in (40, 100, 16 * 13):
        with pytest.raises(ConversionError):
            allocate_ranks(energies, total=bad, step=16)


def test_factorization_energy_is_what_truncation_loses():
    gen = torch.Generator().manual_seed(1)
    w_k, w_v = torch.randn(24, 40, generator=gen), torch.randn(32, 40, generator=gen)
    low = factorize_kv(w_k, w_v, rank=10, method="joint")
    stacked = torch.cat([w_k, w_v]).double()
    approx = torch.cat([low.w_up_k, low.w_up_v]) @ low.w_down
    assert float((stacked - approx).square().sum()) == pytest.approx(float(low.energy[10:].sum()), rel=1e-9)

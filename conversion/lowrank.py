"""Low-rank factorisation of the non-rotary key rows and the value rows.

Pure linear algebra on float64 tensors. Every method returns a down-projection ``W_down``
(``[C, D]``, the latent is ``c = W_down x``) and up-projections ``W_up_k`` / ``W_up_v`` with
``k_nope ≈ W_up_k c`` and ``v ≈ W_up_v c``.

- ``joint``: one truncated SVD of ``[W_k_nope; W_v]`` (the paper's best).
- ``split``: separate SVDs, half of the latent each (keys first).
- ``aw-joint``: activation-aware joint SVD: whiten by the calibration inputs' second moment
  ``Σ = E[x xᵀ] = L Lᵀ`` and truncate ``M L``; this minimises ``E‖(M − M_r) x‖²``, the
  output error, rather than the weight error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from conversion.errors import ConversionError

SVD_METHODS = ("joint", "split", "aw-joint")


@dataclass(frozen=True)
class LowRankKV:
    w_down: torch.Tensor
    w_up_k: torch.Tensor
    w_up_v: torch.Tensor
    energy: torch.Tensor | None = None
    """Squared singular values of the full (whitened for aw-joint) spectrum, descending: the
    output energy each latent dim keeps; ``energy[r:].sum()`` is what rank ``r`` loses. None for
    ``split``. What per-layer rank allocation compares across layers."""


def _truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank], s.square()


def whitening_factor(second_moment: torch.Tensor, damping: float = 1e-6) -> torch.Tensor:
    """Lower Cholesky factor of ``Σ + λI`` with ``λ = damping · mean(diag Σ)``.

    The damping keeps the factor invertible when calibration saw fewer distinct inputs than
    dimensions (or a dimension that is always zero).
    """
    sigma = second_moment.to(torch.float64)
    lam = damping * torch.diagonal(sigma).mean().clamp_min(1e-12)
    return torch.linalg.cholesky(sigma + lam * torch.eye(sigma.shape[0], dtype=sigma.dtype))


def factorize_kv(
    w_k_nope: torch.Tensor,
    w_v: torch.Tensor,
    rank: int,
    method: str,
    second_moment: torch.Tensor | None = None,
) -> LowRankKV:
    """Factorises keys (``[nk, D]``) and values (``[nv, D]``) through a latent of ``rank``."""
    w_k_nope, w_v = w_k_nope.to(torch.float64), w_v.to(torch.float64)
    nk, hidden = w_k_nope.shape
    stacked = torch.cat([w_k_nope, w_v])
    max_rank = min(stacked.shape)
    if not 1 <= rank <= max_rank:
        raise ConversionError(f"latent rank {rank} is impossible: it must be in [1, {max_rank}]")
    if method == "joint":
        u, s, vh, energy = _truncated_svd(stacked, rank)
        up = u * s
        return LowRankKV(w_down=vh, w_up_k=up[:nk], w_up_v=up[nk:], energy=energy)
    if method == "aw-joint":
        if second_moment is None:
            raise ConversionError("aw-joint SVD needs calibration statistics (--calib-text)")
        chol = whitening_factor(second_moment)
        u, s, vh, energy = _truncated_svd(stacked @ chol, rank)
        # W_down = V_rᵀ L⁻¹, solved rather than inverted for stability.
        w_down = torch.linalg.solve_triangular(chol, vh, upper=False, left=False)
        up = u * s
        return LowRankKV(w_down=w_down, w_up_k=up[:nk], w_up_v=up[nk:], energy=energy)
    if method == "split":
        rank_k = rank // 2 if nk else 0
        rank_v = rank - rank_k
        if rank_k > min(w_k_nope.shape) or rank_v > min(w_v.shape):
            raise ConversionError(f"latent rank {rank} is too large for split SVD")
        zeros = w_v.new_zeros
        if rank_k:
            uk, sk, vhk, _ = _truncated_svd(w_k_nope, rank_k)
        else:
            uk, sk, vhk = zeros(nk, 0), zeros(0), zeros(0, hidden)
        uv, sv, vhv, _ = _truncated_svd(w_v, rank_v)
        w_down = torch.cat([vhk, vhv])
        w_up_k = torch.cat([uk * sk, zeros(nk, rank_v)], dim=1)
        w_up_v = torch.cat([zeros(w_v.shape[0], rank_k), uv * sv], dim=1)
        return LowRankKV(w_down=w_down, w_up_k=w_up_k, w_up_v=w_up_v)
    raise ConversionError(f"unknown --svd {method!r}; choose one of {', '.join(SVD_METHODS)}")


def relative_weight_error(original: torch.Tensor, approx: torch.Tensor) -> float:
    """‖W − W_r‖_F / ‖W‖_F (0 for an empty matrix)."""
    norm = original.norm()
    return float((original - approx).norm() / norm) if norm > 0 else 0.0


def relative_output_error(original: torch.Tensor, approx: torch.Tensor, second_moment: torch.Tensor) -> float:
    """sqrt(E‖(W − W_r)x‖² / E‖Wx‖²) for inputs with second moment Σ = E[x xᵀ]."""
    sigma = second_moment.to(torch.float64)
    diff = (original - approx).to(torch.float64)
    num = torch.einsum("ij,jk,ik->", diff, sigma, diff)
    den = torch.einsum("ij,jk,ik->", original.to(torch.float64), sigma, original.to(torch.float64))
    return float((num.clamp_min(0) / den).sqrt()) if den > 0 else 0.0

"""Rotary-embedding math for partial RoPE: frequencies, pair selection and rotation.

Pure functions only. Llama's ``rotate_half`` layout pairs dim ``i`` with dim ``i + d/2`` and
gives pair ``i`` the frequency ``inv_freq[i]``. Partial RoPE keeps ``r`` pairs per kv-head;
a head's rotary block is laid out as ``[x[P], x[P + d/2]]`` for the sorted pair list ``P``,
which is again a ``rotate_half`` layout, so rotating the block with ``inv_freq[P]`` equals
the original rotation on those dims exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from conversion.errors import ConversionError

STRATEGIES = ("high", "low", "uniform", "2-norm", "retrieval")


def rope_inv_freq(head_dim: int, rope_theta: float, rope_scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies (float32, ``head_dim/2``) as Hugging Face Llama computes them.

    Supports the rope types whose frequencies do not depend on sequence length: default,
    ``linear`` and ``llama3``. Others (dynamic, yarn, longrope) change attention in ways the
    MLA cache cannot reproduce, so they are refused.
    """
    inv_freq = 1.0 / (
        rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / head_dim)
    )
    rope_type = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(rope_scaling["factor"])
    if rope_type == "llama3":
        factor = float(rope_scaling["factor"])
        low_freq_factor = float(rope_scaling["low_freq_factor"])
        high_freq_factor = float(rope_scaling["high_freq_factor"])
        old_context_len = float(rope_scaling["original_max_position_embeddings"])
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ConversionError(
        f"rope type {rope_type!r} is not supported (supported: default, linear, llama3): its "
        "frequencies depend on the sequence length, which a latent cache cannot reproduce"
    )


def check_rope_dim(rope_dim: int, head_dim: int) -> int:
    """Validates ``rope_dim`` (rotary dims per head) and returns the number of pairs."""
    if rope_dim % 2 or rope_dim < 2 or rope_dim > head_dim:
        raise ConversionError(
            f"--rope-dim {rope_dim} is invalid for head_dim {head_dim}: it must be even and "
            f"2 <= rope_dim <= {head_dim}"
        )
    return rope_dim // 2


def select_pairs_fixed(strategy: str, num_pairs_kept: int, num_pairs: int, offset: int = 0) -> list[int]:
    """Pair indices for the data-free strategies (same for every layer and head).

    ``high`` keeps the highest frequencies (pair 0 rotates fastest), ``low`` the lowest,
    ``uniform`` every ``num_pairs // r``-th pair starting at ``offset``.
    """
    r, n = num_pairs_kept, num_pairs
    if not 1 <= r <= n:
        raise ConversionError(f"cannot keep {r} of {n} rotary pairs")
    if strategy == "high":
        return list(range(r))
    if strategy == "low":
        return list(range(n - r, n))
    if strategy == "uniform":
        step = n // r
        if not 0 <= offset < step:
            raise ConversionError(f"uniform offset {offset} must be in [0, {step})")
        return [offset + i * step for i in range(r)]
    raise ConversionError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def select_pairs_by_score(pair_scores: torch.Tensor, num_pairs_kept: int) -> torch.Tensor:
    """2-norm strategy: per layer and kv-head, the ``r`` highest-scoring pairs, sorted.

    ``pair_scores`` is ``[layers, kv_heads, head_dim/2]`` (mean of ‖q_i‖·‖k_i‖); the result
    is ``[layers, kv_heads, r]`` (int64). Ties break towards the lower index so the choice is
    deterministic.
    """
    n = pair_scores.shape[-1]
    if not 1 <= num_pairs_kept <= n:
        raise ConversionError(f"cannot keep {num_pairs_kept} of {n} rotary pairs")
    # Stable descending sort: equal scores keep index order.
    order = torch.sort(pair_scores.to(torch.float64), dim=-1, descending=True, stable=True).indices
    return torch.sort(order[..., :num_pairs_kept], dim=-1).values


def check_share(share: float, option: str) -> float:
    """A share option (``--retrieval-heads``, ``--retrieval-pairs``) must lie in (0, 1]."""
    if not 0.0 < share <= 1.0:
        raise ConversionError(f"{option} {share} must be a share in (0, 1] (e.g. 0.1 for a tenth)")
    return share


def retrieval_head_mask(head_scores: torch.Tensor, share: float) -> torch.Tensor:
    """Retrieval strategy, step 1: the top ``share`` of all kv-heads (every layer together) by
    retrieval score (``[layers, kv_heads]``), as a bool mask of that shape.

    Retrieval is carried by a few heads in a few layers, so the heads are ranked over the whole
    model, not per layer. ``round(share · heads)`` heads are chosen, at least one; ties break
    towards the lower (layer, kv-head) so the choice is deterministic.
    """
    check_share(share, "--retrieval-heads")
    flat = head_scores.to(torch.float64).reshape(-1)
    count = max(1, min(flat.numel(), round(share * flat.numel())))
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:count]] = True
    return mask.view(head_scores.shape)


RETRIEVAL_BANDS = ("low", "high")


def retrieval_forced_pairs(num_pairs_kept: int, share: float) -> int:
    """How many of a retrieval head's ``r`` kept pairs are forced from its band:
    ``round(share · r)``, at least one."""
    check_share(share, "--retrieval-pairs")
    return max(1, min(num_pairs_kept, round(share * num_pairs_kept)))


def select_pairs_retrieval(pair_scores: torch.Tensor, retrieval_mask: torch.Tensor, num_pairs_kept: int,
                           share: float, band: str = "low") -> torch.Tensor:
    """Retrieval strategy, step 2, for one layer: ``[kv_heads, head_dim/2]`` 2-norm scores and a
    ``[kv_heads]`` mask of retrieval heads → ``[kv_heads, r]`` kept pairs (int64, sorted).

    A retrieval head keeps its :func:`retrieval_forced_pairs` lowest-frequency pairs (``band``
    ``low``: the highest indices, pair 0 rotates fastest; ``high``: the fastest pairs instead) and
    fills the rest of its ``r`` with the best 2-norm scores among the other pairs; every other head
    takes exactly :func:`select_pairs_by_score`'s pairs.
    Why: a head that finds a fact thousands of tokens back matches it on slowly rotating pairs,
    whose rotation barely changes over the distance (a position-robust content match), while the
    2-norm score favours pairs that are loud on every token; outside the rotary block a pair is
    squeezed through the shared low-rank latent, which the retrieval match does not survive.
    """
    n = pair_scores.shape[-1]
    if not 1 <= num_pairs_kept <= n:
        raise ConversionError(f"cannot keep {num_pairs_kept} of {n} rotary pairs")
    if retrieval_mask.shape != pair_scores.shape[:-1]:
        raise ConversionError(f"retrieval mask of shape {tuple(retrieval_mask.shape)} does not match the pair "
                              f"scores' kv-heads {tuple(pair_scores.shape[:-1])}")
    if band not in RETRIEVAL_BANDS:
        raise ConversionError(f"unknown --retrieval-band {band!r}; choose one of {', '.join(RETRIEVAL_BANDS)}")
    forced = retrieval_forced_pairs(num_pairs_kept, share)
    band_pairs = slice(n - forced, n) if band == "low" else slice(0, forced)
    scores = pair_scores.to(torch.float64).clone()
    # Forced pairs outrank every score; among themselves they keep index order (stable sort).
    scores[retrieval_mask.to(torch.bool), band_pairs] = float("inf")
    return select_pairs_by_score(scores, num_pairs_kept)


def rope_dim_permutation(pairs: Sequence[int], head_dim: int) -> list[int]:
    """Row order of one head after partial RoPE: ``[P, P + d/2, nope dims in order]``.

    Moving the rotary dims to the front of each head (a row permutation of W_q and W_k)
    lets every layer slice ``[:rope_dim]`` for the rotary block.
    """
    half = head_dim // 2
    rope = list(pairs) + [p + half for p in pairs]
    kept = set(rope)
    return rope + [i for i in range(head_dim) if i not in kept]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_partial_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotates rotary blocks with per-head frequencies.

    ``x``: ``[..., heads, 2r]`` in rotate_half layout; ``positions``: ``[...]`` (the leading
    dims of ``x``); ``inv_freq``: ``[heads, r]``. cos/sin are computed in float32 like
    Hugging Face Llama and cast to ``x``'s dtype before the multiply.
    """
    freqs = positions.to(torch.float32)[..., None, None] * inv_freq.to(torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    return x * cos + rotate_half(x) * sin

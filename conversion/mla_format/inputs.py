"""The input projections of an MHA2MLA layer laid out as vLLM's MLA expects them.

:func:`mla_inputs` is shared by the vLLM plugin's model and the Hugging Face reference model
(``conversion.reference_model``), so both compute the same function; it lives here so that
serving never imports the reference model's file.
"""

from __future__ import annotations

import torch

from conversion.rope import apply_partial_rope


def mla_inputs(
    q_compact: torch.Tensor,
    kv_compact: torch.Tensor,
    positions: torch.Tensor,
    inv_freq_q: torch.Tensor,
    inv_freq_k: torch.Tensor,
    q_index: torch.Tensor,
    kv_index: torch.Tensor,
    head_dim: int,
    rope_dim: int,
    latent_width: int,
    q_zero_columns: int = 1,
    kv_zero_columns: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates the compact projections and lays them out as vLLM's MLA expects.

    ``q_compact``: ``[..., n·d]`` for n query heads (per head ``[rope | nope]``);
    ``kv_compact``: ``[..., C+R]`` (``[latent | rope keys per kv-head]``); ``positions``:
    ``[...]``; ``inv_freq_q`` ``[n, r]`` / ``inv_freq_k`` ``[g, r]``: each head's frequencies;
    ``q_index`` / ``kv_index``: :class:`MLALayout` gather indices, whose indices past the
    compact width select one of ``q_zero_columns`` / ``kv_zero_columns`` appended zeros
    (the layout's indices use one; :func:`distinct_zero_index` gives every padding position
    its own, which makes the backward pass an ``index_add`` without colliding atomics).
    Returns ``q`` ``[..., n, qk_nope+qk_rope]`` and ``kv`` ``[..., kv_lora_rank+qk_rope]``.
    Shared by the reference model and the vLLM plugin so both compute the same function.
    """
    lead = q_compact.shape[:-1]
    q = q_compact.view(*lead, -1, head_dim)
    q_rope = apply_partial_rope(q[..., :rope_dim], positions, inv_freq_q)
    k_rope = kv_compact[..., latent_width:].view(*lead, -1, rope_dim)
    k_rope = apply_partial_rope(k_rope, positions, inv_freq_k)
    q_flat = torch.cat([q_rope, q[..., rope_dim:]], dim=-1).reshape(*lead, -1)
    q_flat = torch.cat([q_flat, q.new_zeros(*lead, q_zero_columns)], dim=-1)
    q_mla = q_flat.index_select(-1, q_index)
    kv_flat = torch.cat([kv_compact[..., :latent_width], k_rope.reshape(*lead, -1),
                         kv_compact.new_zeros(*lead, kv_zero_columns)], dim=-1)
    return q_mla.view(*lead, q.shape[-2], -1), kv_flat.index_select(-1, kv_index)


def distinct_zero_index(index: torch.Tensor, sentinel: int) -> tuple[torch.Tensor, int]:
    """Rewrites a gather index whose padding entries all point at one zero (``sentinel``) so
    that each points at a zero of its own; returns (index, number of zeros). Same values,
    but no two outputs share an input, so the gradient needs no atomic accumulation onto one
    element (which serialises on a GPU)."""
    pad = (index == sentinel).nonzero().flatten()
    out = index.clone()
    out[pad] = sentinel + torch.arange(pad.numel(), device=index.device)
    return out, max(1, pad.numel())

"""Keeping a converted model servable while it trains.

Every weight of the reference model is a real parameter of vLLM's MLA function, but
``kv_b_proj`` is not free everywhere: its zero padding and its identity rows (rotated keys
that ride in the latent, in the native layout) are what make the MLA form equal MHA2MLA
attention and what the plugin's prefill relies on. Training must only move the ``W_up_k``
/ ``W_up_v`` blocks. :class:`StructureGuard` zeroes the gradient of the fixed entries (so
Adam's moments there stay zero and no update happens) and can put the fixed values back
(for optimisers with weight decay, and as a final guarantee before saving).
"""

from __future__ import annotations

import torch
from torch import nn

from conversion.mla_format.layout import MLALayout


def kv_b_free_mask(layout: MLALayout) -> torch.Tensor:
    """Boolean ``[h·(qk_nope + v), kv_lora_rank]``: True where ``kv_b_proj`` holds ``W_up_k``
    or ``W_up_v`` entries, False on padding and identity rows."""
    g, nd, d, c = layout.num_kv_heads, layout.nope_dim, layout.head_dim, layout.latent_width
    ones = layout.build_kv_b_proj(torch.ones(g * nd, c), torch.ones(g * d, c))
    fixed = layout.build_kv_b_proj(torch.zeros(g * nd, c), torch.zeros(g * d, c))
    return (ones - fixed) != 0


class StructureGuard:
    """Pins the fixed entries of every ``kv_b_proj`` in ``model`` to their current values."""

    def __init__(self, model: nn.Module):
        self._entries: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []
        self._hooks = []
        for module in model.modules():
            layout = getattr(module, "layout", None)
            kv_b = getattr(module, "kv_b_proj", None)
            if not isinstance(layout, MLALayout) or kv_b is None:
                continue
            weight = kv_b.weight
            free = kv_b_free_mask(layout).to(weight.device)
            fixed = (weight.detach() * ~free).clone()
            self._entries.append((weight, free, fixed))
            if weight.requires_grad:
                self._hooks.append(weight.register_hook(lambda grad, free=free: grad * free.to(grad.dtype)))

    @property
    def num_guarded(self) -> int:
        return len(self._entries)

    @torch.no_grad()
    def restore(self) -> None:
        """Writes the fixed entries back (padding zeros, identity ones)."""
        for weight, free, fixed in self._entries:
            weight.copy_(torch.where(free, weight, fixed.to(weight.dtype)))

    @torch.no_grad()
    def max_violation(self) -> float:
        """Largest deviation of a fixed entry from its pinned value (0 when intact)."""
        worst = 0.0
        for weight, free, fixed in self._entries:
            diff = (weight.float() - fixed.float()).abs().masked_fill(free, 0)
            worst = max(worst, float(diff.max()))
        return worst

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

"""How much each layer's output suffers when only its latent is cut to rank ``r`` (measured).

Energy spectra (``LowRankKV.energy``) say how much of a layer's own key/value output a rank
keeps, but not what the model's predictions lose: a late layer with large activations holds
most of the energy while an early layer's small error is amplified by every layer after it
(the energy-greedy allocations lost to uniform, ``benchmarks/results/rank-allocation-cpu``).
So the cost of a rank is measured where it matters, on the next-token distribution: start from
a model converted at a wide latent, cut one layer's latent to ``r`` (zeroing the trailing rows
of its down-projection is exactly its rank-``r`` truncation, the SVD dims being ordered) and
take the mean KL divergence of its predictions from the wide model's on calibration text.

Each layer is measured alone and the costs are treated as additive (``allocation.
allocate_by_cost``): the allocation then needs one pass per (layer, rank), not per allocation.
Layer inputs are cached once, so cutting layer ``l`` reruns only layers ``l..L-1``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from conversion.errors import ConversionError


def _next_token_logprobs(model, hidden: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model.lm_head(model.model.norm(hidden)).float(), dim=-1)


def _run_layers(model, hidden: torch.Tensor, positions: torch.Tensor, start: int) -> torch.Tensor:
    for layer in model.model.layers[start:]:
        hidden = layer(hidden, positions, None)
    return hidden


@torch.no_grad()
def truncation_costs(model, windows: torch.Tensor, ranks: Sequence[int], batch_size: int = 4,
                     show_progress: bool = True) -> list[dict[int, float]]:
    """``[layer] → {rank: mean KL(wide ‖ layer cut to rank) per token, in nats}``.

    ``model``: the reference model of a conversion at the widest latent considered
    (:class:`~conversion.reference_model.MHA2MLAForCausalLM`); ``windows``: ``[n, T]`` token
    ids of calibration text; ``ranks``: latent widths to measure, each at most the model's
    latent (which costs 0 by definition and is always included).
    """
    layers = model.model.layers
    wide = layers[0].self_attn.layout.latent_dim
    if any(not 0 < r <= wide for r in ranks):
        raise ConversionError(f"ranks to measure {sorted(ranks)} must lie in [1, {wide}] (the model's latent)")
    ranks = sorted(set(ranks) - {wide})
    costs: list[dict[int, float]] = [{wide: 0.0} for _ in layers]
    down = [layer.self_attn.kv_a_proj_with_mqa.weight for layer in layers]
    steps = len(layers) * len(ranks) * -(-windows.shape[0] // batch_size)
    bar = tqdm(total=steps, desc="measuring rank sensitivity", unit="pass", disable=not show_progress)
    tokens = 0
    for batch in windows.split(batch_size):
        positions = torch.arange(batch.shape[1], device=batch.device)[None].expand(batch.shape[0], -1)
        inputs = [model.model.embed_tokens(batch)]
        for layer in layers:
            inputs.append(layer(inputs[-1], positions, None))
        reference = _next_token_logprobs(model, inputs[-1])
        count = batch.numel()
        for i, weight in enumerate(down):
            saved = weight[:wide].clone()
            for r in ranks:
                weight[r:wide] = 0
                logprobs = _next_token_logprobs(model, _run_layers(model, inputs[i], positions, i))
                kl = F.kl_div(logprobs, reference, log_target=True, reduction="sum").item()
                costs[i][r] = costs[i].get(r, 0.0) + kl
                weight[:wide] = saved
                bar.update()
        tokens += count
    bar.close()
    return [{r: (v / tokens if r != wide else 0.0) for r, v in sorted(c.items())} for c in costs]

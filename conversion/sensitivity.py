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

from conversion.allocation import allocate_by_cost
from conversion.errors import ConversionError


def _next_token_logprobs(model, hidden: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model.lm_head(model.model.norm(hidden)).float(), dim=-1)


def _run_layers(model, hidden: torch.Tensor, positions: torch.Tensor, start: int) -> torch.Tensor:
    for layer in model.model.layers[start:]:
        hidden = layer(hidden, positions, None)
    return hidden


def _positions(batch: torch.Tensor) -> torch.Tensor:
    return torch.arange(batch.shape[1], device=batch.device)[None].expand(batch.shape[0], -1)


def _layer_inputs(model, batch: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
    """Every decoder layer's input for one batch (and the last one's output): measuring a change
    to layer ``l`` then reruns layers ``l..L-1`` only."""
    inputs = [model.model.embed_tokens(batch)]
    for layer in model.model.layers:
        inputs.append(layer(inputs[-1], positions, None))
    return inputs


def _kl_sum(model, hidden: torch.Tensor, positions: torch.Tensor, start: int, reference: torch.Tensor) -> float:
    """KL(reference ‖ the model run from layer ``start`` on ``hidden``), summed over the batch's tokens."""
    logprobs = _next_token_logprobs(model, _run_layers(model, hidden, positions, start))
    return F.kl_div(logprobs, reference, log_target=True, reduction="sum").item()


class _LatentWidths:
    """Cuts layers of a wide conversion to narrower latents in place, and puts them back.

    Zeroing the trailing rows of a layer's ``kv_a_proj_with_mqa`` latent block is exactly its
    rank-``r`` truncation (the SVD dims are ordered); the full rows are kept to restore."""

    def __init__(self, model):
        self.layers = model.model.layers
        self.wide = self.layers[0].self_attn.layout.latent_width
        self.down = [layer.self_attn.kv_a_proj_with_mqa.weight for layer in self.layers]
        self.saved = [weight[: self.wide].clone() for weight in self.down]

    def check(self, widths: Sequence[int], what: str) -> list[int]:
        """``widths`` (one per layer, each in [1, wide]) as a list, or a clear error."""
        widths = list(widths)
        if len(widths) != len(self.layers) or any(not 0 < r <= self.wide for r in widths):
            raise ConversionError(f"{what} {widths} must give each of {len(self.layers)} layers a width in "
                                  f"[1, {self.wide}]")
        return widths

    def set(self, i: int, r: int) -> None:
        self.down[i][: self.wide] = self.saved[i]
        self.down[i][r : self.wide] = 0

    def set_all(self, widths: Sequence[int]) -> None:
        for i, r in enumerate(widths):
            self.set(i, r)

    def restore(self) -> None:
        self.set_all([self.wide] * len(self.layers))


@torch.no_grad()
def truncation_costs(model, windows: torch.Tensor, ranks: Sequence[int], batch_size: int = 4,
                     show_progress: bool = True, base_ranks: Sequence[int] | None = None) -> list[dict[int, float]]:
    """``[layer] → {rank: mean KL(wide ‖ layer cut to rank) per token, in nats}``.

    ``model``: the reference model of a conversion at the widest latent considered
    (:class:`~conversion.reference_model.MHA2MLAForCausalLM`); ``windows``: ``[n, T]`` token
    ids of calibration text; ``ranks``: latent widths to measure, each at most the model's
    latent. ``base_ranks``: the widths every *other* layer has while one layer is measured
    (default: the full width, so the wide model's own cost is 0); measuring around an
    allocation's operating point (e.g. uniform) sees how layers interact there.
    The KL is always taken against the wide model's predictions, so costs at different
    ranks of one layer are comparable.
    """
    cut = _LatentWidths(model)
    layers, wide = cut.layers, cut.wide
    if any(not 0 < r <= wide for r in ranks):
        raise ConversionError(f"ranks to measure {sorted(ranks)} must lie in [1, {wide}] (the model's latent)")
    base = cut.check(base_ranks if base_ranks is not None else [wide] * len(layers), "base ranks")
    base_is_wide = all(b == wide for b in base)
    ranks = sorted(set(ranks) | {wide})
    costs: list[dict[int, float]] = [{} for _ in layers]
    steps = len(layers) * len(ranks) * -(-windows.shape[0] // batch_size)
    bar = tqdm(total=steps, desc="measuring rank sensitivity", unit="pass", disable=not show_progress)
    tokens = 0
    try:
        for batch in windows.split(batch_size):
            positions = _positions(batch)
            cut.restore()
            reference = _next_token_logprobs(model, _run_layers(model, model.model.embed_tokens(batch), positions, 0))
            cut.set_all(base)
            inputs = _layer_inputs(model, batch, positions)
            for i in range(len(layers)):
                for r in ranks:
                    if r == wide and base_is_wide:
                        kl = 0.0  # the wide model itself
                    else:
                        cut.set(i, r)
                        kl = _kl_sum(model, inputs[i], positions, i, reference)
                    costs[i][r] = costs[i].get(r, 0.0) + kl
                    bar.update()
                cut.set(i, base[i])
            tokens += batch.numel()
    finally:
        cut.restore()
        bar.close()
    return [{r: v / tokens for r, v in sorted(c.items())} for c in costs]


@torch.no_grad()
def allocation_kl(model, windows: torch.Tensor, layer_ranks: Sequence[int], batch_size: int = 4) -> float:
    """Mean KL per token (nats) of the model with every layer cut to its width in ``layer_ranks``
    from the wide model itself: what an allocation really costs, interactions included."""
    cut = _LatentWidths(model)
    widths = cut.check(layer_ranks, "widths")
    total, tokens = 0.0, 0
    try:
        for batch in windows.split(batch_size):
            positions = _positions(batch)
            embedded = model.model.embed_tokens(batch)
            cut.restore()
            reference = _next_token_logprobs(model, _run_layers(model, embedded, positions, 0))
            cut.set_all(widths)
            total += _kl_sum(model, embedded, positions, 0, reference)
            tokens += batch.numel()
    finally:
        cut.restore()
    return total / tokens


def measured_allocation(model, windows: torch.Tensor, grid: Sequence[int], total: int, step: int, passes: int = 1,
                        show_progress: bool = True, first_costs: list[dict[int, float]] | None = None):
    """Per-layer widths summing to ``total`` from measured truncation costs, refined in passes.

    Pass 1 measures each layer's cost with every other layer at the average width and spends
    the budget by those costs (:func:`allocation.allocate_by_cost`). Costs measured around one
    operating point are only locally additive, and at a tight budget (96 values for SmolLM2)
    the allocation lands far from uniform; so each further pass measures again around the
    allocation just found and re-allocates. Every pass also measures what its starting
    allocation really costs (a layer at its own base width *is* the base model), so the result
    is the allocation of lowest measured KL among those visited, never a worse one.

    ``first_costs``: pass 1's costs if already measured. Returns (widths, one record per pass).
    """
    layers = len(model.model.layers)
    wide = model.model.layers[0].self_attn.layout.latent_width
    base = [total // layers] * layers
    history: list[dict] = []
    ranks = base
    for p in range(max(1, passes)):
        widths = sorted(set(grid) | set(base))
        costs = first_costs if p == 0 and first_costs is not None else \
            truncation_costs(model, windows, widths, show_progress=show_progress, base_ranks=base)
        ranks = allocate_by_cost(costs, total, step, max_rank=wide)
        history.append({"base": base, "base_kl": costs[0].get(base[0]), "costs": costs, "allocated": ranks})
        if any(h["base"] == ranks for h in history):
            break  # converged (or back to a width set already measured)
        base = ranks
    if passes <= 1:
        return ranks, history
    measured = [(h["base_kl"], h["base"]) for h in history if h["base_kl"] is not None]
    if all(h["base"] != ranks for h in history):
        measured.append((allocation_kl(model, windows, ranks), ranks))
        history.append({"base": ranks, "base_kl": measured[-1][0], "costs": None, "allocated": None})
    return min(measured, key=lambda m: m[0])[1], history


# -- rotary dims per layer too: options taken from conversions at different rotary widths --------

Option = tuple[int, int]
"""(rotary dims per head, latent width) of one layer."""


class MixedAttention:
    """One model whose layer ``l`` runs the attention of the conversion with ``R`` rotary dims,
    its latent cut to ``w``: every (R, w) a layer may take, without converting it again.

    ``models[R]``: reference models of one source converted with R rotary dims at a wide latent
    (the MLPs, norms and embeddings are the source's in each, so only attention differs); the
    model of ``host_rope`` is the one whose decoder layers are switched in place. Each layer's
    attention is converted on its own, so a layer taken from conversion R and cut to w is
    exactly what a conversion with that layer at (R, w) holds."""

    def __init__(self, models: dict, host_rope: int):
        self.host = models[host_rope]
        # each conversion's own attention modules and latent cuts, kept apart from the host's switched layers
        self.attention = {r: [layer.self_attn for layer in m.model.layers] for r, m in models.items()}
        self.cuts = {r: _LatentWidths(m) for r, m in models.items()}
        self.wide = {r: cut.wide for r, cut in self.cuts.items()}
        self.layers = len(self.host.model.layers)

    def check(self, options: Sequence[Option], what: str) -> list[Option]:
        options = [tuple(o) for o in options]
        if len(options) != self.layers or any(r not in self.wide or not 0 < w <= self.wide[r] for r, w in options):
            raise ConversionError(f"{what} {options} must give each of {self.layers} layers a (rotary dims, latent) "
                                  f"with rotary dims in {sorted(self.wide)} and latent in [1, the widest converted]")
        return options

    @torch.no_grad()
    def set(self, layer: int, rope: int, width: int) -> None:
        self.cuts[rope].set(layer, width)
        self.host.model.layers[layer].self_attn = self.attention[rope][layer]

    def set_all(self, options: Sequence[Option]) -> None:
        for layer, (rope, width) in enumerate(options):
            self.set(layer, rope, width)


@torch.no_grad()
def reference_logprobs(original, windows: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """The original model's next-token log-probabilities on each batch of ``windows``: the
    common reference of options taken from different conversions."""
    return [F.log_softmax(original(batch).logits.float(), dim=-1) for batch in windows.split(batch_size)]


@torch.no_grad()
def option_costs(mixed: MixedAttention, reference: Sequence[torch.Tensor], windows: torch.Tensor,
                 grid: dict[int, Sequence[int]], base: Sequence[Option], batch_size: int = 4,
                 show_progress: bool = True) -> list[dict[Option, float]]:
    """``[layer] → {(R, w): mean KL(original ‖ model with every other layer at base) per token}``.

    Measured from the original (``reference``, :func:`reference_logprobs` on the same windows
    and batches) so that options from different conversions are comparable; layer inputs are
    cached, so an option of layer ``l`` reruns layers ``l..L-1`` only."""
    base = mixed.check(base, "base options")
    options = [(r, w) for r, widths in grid.items() for w in widths]
    for option in options:
        mixed.check([option] * mixed.layers, "options to measure")
    model = mixed.host
    costs: list[dict[Option, float]] = [{} for _ in range(mixed.layers)]
    bar = tqdm(total=mixed.layers * len(options) * len(reference), desc="measuring (rotary, latent) options",
               unit="pass", disable=not show_progress)
    try:
        for batch, ref in zip(windows.split(batch_size), reference):
            positions = _positions(batch)
            mixed.set_all(base)
            inputs = _layer_inputs(model, batch, positions)
            for i in range(mixed.layers):
                for option in options:
                    mixed.set(i, *option)
                    costs[i][option] = costs[i].get(option, 0.0) + _kl_sum(model, inputs[i], positions, i, ref)
                    bar.update()
                mixed.set(i, *base[i])
    finally:
        bar.close()
    return [{o: c / windows.numel() for o, c in layer.items()} for layer in costs]


@torch.no_grad()
def mixed_kl(mixed: MixedAttention, reference: Sequence[torch.Tensor], windows: torch.Tensor,
             options: Sequence[Option], batch_size: int = 4) -> float:
    """Mean KL per token (nats) from the original of the model with every layer at its option:
    what an allocation really costs, interactions included."""
    mixed.set_all(mixed.check(options, "options"))
    total = 0.0
    for batch, ref in zip(windows.split(batch_size), reference):
        positions = _positions(batch)
        total += _kl_sum(mixed.host, mixed.host.model.embed_tokens(batch), positions, 0, ref)
    return total / windows.numel()

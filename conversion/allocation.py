"""Per-layer latent ranks under one cache budget (pure).

Layers differ in how much of their key/value output a rank-``r`` latent keeps: the energy
spectrum of each layer's (activation-whitened) joint SVD says exactly what every extra latent
dim buys (``LowRankKV.energy``). Given a total number of latent dims over all layers, handing
them out in aligned groups to whichever layer's next group keeps the most energy is optimal
for the summed loss, because each layer's spectrum is non-increasing (a concave gain).
"""

from __future__ import annotations

import heapq
import math
from typing import Sequence

from conversion.errors import ConversionError

CRITERIA = ("absolute", "relative")
"""Energy criteria of :func:`allocate_ranks`; :func:`allocate_by_cost` takes measured costs."""


def _check_budget(total: int, step: int, min_rank: int | None, caps: Sequence[int]) -> int:
    """The smallest rank any layer gets (``min_rank`` rounded to a group, at least one group),
    after checking that ``total`` is whole groups, covers that floor in every layer and fits
    the layers' caps."""
    if total % step:
        raise ConversionError(f"the latent budget {total} is not a multiple of the group size {step}")
    floor = max(step, (min_rank or step) // step * step)
    if total < floor * len(caps):
        raise ConversionError(f"a latent budget of {total} dims cannot give each of {len(caps)} layers {floor} dims; "
                              f"give at least {floor * len(caps)}")
    if total > sum(caps):
        raise ConversionError(f"a latent budget of {total} dims exceeds what the layers can use ({sum(caps)})")
    return floor


def allocate_ranks(energies: Sequence[Sequence[float]], total: int, step: int = 16,
                   max_rank: int | None = None, criterion: str = "absolute", min_rank: int | None = None) -> list[int]:
    """Latent rank per layer, each a multiple of ``step`` in ``[min_rank, max_rank]`` (``min_rank``
    defaults to one group), summing to ``total``.

    ``absolute`` compares the energy itself (whitened output error, in the same units for every
    layer); ``relative`` compares each layer's share of its own energy.
    """
    layers = len(energies)
    if criterion not in CRITERIA:
        raise ConversionError(f"unknown allocation criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    caps = [min(len(e), max_rank or len(e)) // step * step for e in energies]
    floor = _check_budget(total, step, min_rank, caps)
    scale = [1.0 / max(sum(e), 1e-300) if criterion == "relative" else 1.0 for e in energies]

    def gain(layer: int, rank: int) -> float:
        return scale[layer] * float(sum(energies[layer][rank:rank + step]))

    ranks = [floor] * layers
    heap = [(-gain(i, floor), i) for i in range(layers) if caps[i] > floor]
    heapq.heapify(heap)
    left = total - floor * layers
    while left > 0:
        _, i = heapq.heappop(heap)
        ranks[i] += step
        left -= step
        if ranks[i] < caps[i]:
            heapq.heappush(heap, (-gain(i, ranks[i]), i))
    return ranks


def interpolate_cost(measured: dict[int, float], rank: int) -> float:
    """A layer's cost at ``rank`` from costs measured at a few ranks: piecewise linear between
    them, flat beyond the widest (0 there) and extrapolated from the two narrowest below them."""
    points = sorted(measured.items())
    if rank >= points[-1][0]:
        return points[-1][1]
    if len(points) == 1:
        raise ConversionError(f"one measured rank ({points[0][0]}) cannot say what rank {rank} costs")
    segment = next((i for i in range(len(points) - 1) if rank <= points[i + 1][0]), 0)
    (r0, c0), (r1, c1) = points[segment], points[segment + 1]
    return max(0.0, c0 + (c1 - c0) * (rank - r0) / (r1 - r0))


def _least_cost_picks(options: Sequence[Sequence[tuple[int, float]]], units: int, exact: bool) -> list[int]:
    """Dynamic programming over layers and budget: one ``(size in units, cost)`` option per
    layer, least summed cost, sizes summing to ``units`` (``exact``) or at most that. Exact for
    any costs (measured ones need not be convex, so a greedy could miss)."""
    inf = float("inf")
    best = [0.0] + [inf] * units  # best[u]: least cost of the layers so far using exactly u units
    choices: list[list[int]] = []
    for layer_options in options:
        nxt, pick = [inf] * (units + 1), [0] * (units + 1)
        for used, value in enumerate(best):
            if value == inf:
                continue
            for width, c in layer_options:
                if used + width <= units and value + c < nxt[used + width]:
                    nxt[used + width], pick[used + width] = value + c, width
        best = nxt
        choices.append(pick)
    left = units if exact else min(range(units + 1), key=lambda u: best[u])
    sizes = []
    for pick in reversed(choices):
        sizes.append(pick[left])
        left -= pick[left]
    return sizes[::-1]


def allocate_by_cost(costs: Sequence[dict[int, float]], total: int, step: int = 16, min_rank: int | None = None,
                     max_rank: int | None = None) -> list[int]:
    """Latent rank per layer minimising the summed cost, each a multiple of ``step`` in
    ``[min_rank, max_rank]``, summing to ``total``.

    ``costs[l]``: layer ``l``'s measured cost at some ranks (``sensitivity.truncation_costs``),
    interpolated in between.
    """
    caps = [min(max(c), max_rank or max(c)) // step * step for c in costs]
    floor = _check_budget(total, step, min_rank, caps)
    options = [[(r // step, interpolate_cost(cost, r)) for r in range(floor, cap + 1, step)]
               for cost, cap in zip(costs, caps)]
    return [units * step for units in _least_cost_picks(options, total // step, exact=True)]


def allocate_options(costs: Sequence[dict[int, float]], total: int) -> list[int]:
    """One of each layer's measured options per layer, minimising the summed cost with the
    options' sizes summing to at most ``total``.

    ``costs[l]``: ``{size: cost}`` of the options layer ``l`` may take (e.g. cached values per
    token of a (rotary dims, latent width) pair, each measured, none interpolated). Returns
    each layer's chosen size.
    """
    if not costs or any(not c for c in costs):
        raise ConversionError("every layer needs at least one measured option")
    unit = math.gcd(*(size for c in costs for size in c))
    smallest = sum(min(c) for c in costs)
    if total < smallest:
        raise ConversionError(f"a budget of {total} values is below the narrowest option of every layer ({smallest})")
    options = [[(size // unit, c) for size, c in cost.items()] for cost in costs]
    return [units * unit for units in _least_cost_picks(options, total // unit, exact=False)]


def choose_options(costs: Sequence[dict[tuple[int, int], float]], total_values: int,
                   kv_heads: int) -> list[tuple[int, int]]:
    """Each layer's (rotary dims per head R, latent width w) of least summed measured cost with
    the cached values ``kv_heads·R + w`` summed over layers at most ``total_values``.

    ``costs[l]``: layer ``l``'s measured ``{(R, w): cost}`` (``sensitivity.option_costs``). Of
    several options of one size a layer only ever wants the cheapest, so the choice reduces to
    :func:`allocate_options` over sizes."""
    cheapest = []  # per layer: {values: (cost, option)}
    for layer in costs:
        best: dict[int, tuple[float, tuple[int, int]]] = {}
        for (r, w), c in layer.items():
            size = kv_heads * r + w
            if size not in best or c < best[size][0]:
                best[size] = (c, (r, w))
        cheapest.append(best)
    sizes = allocate_options([{size: c for size, (c, _) in best.items()} for best in cheapest], total_values)
    return [best[size][1] for best, size in zip(cheapest, sizes)]


def kept_energy(energies: Sequence[Sequence[float]], ranks: Sequence[int]) -> float:
    """Sum over layers of the energy the ranks keep (higher is better)."""
    return float(sum(sum(e[:r]) for e, r in zip(energies, ranks)))


BAND_SHARE = 1 / 3
"""``--allocate retrieval-band``: the share of the layers that form the wide band."""
BAND_FACTOR = 1.5
"""``--allocate retrieval-band``: the band's latent against the average (the others take what is left)."""
BAND_ALIGN = 8
"""Band widths are multiples of this (what the Triton decode kernel's column blocks align to)."""


def retrieval_band(layer_scores: Sequence[float], total: int, share: float = BAND_SHARE,
                   factor: float = BAND_FACTOR, align: int = BAND_ALIGN,
                   max_rank: int | None = None) -> tuple[list[int], tuple[int, int]]:
    """Latent widths with a contiguous band of ``round(share × layers)`` layers at ``factor`` × the average
    latent and the rest at what is left of ``total`` (both rounded down to ``align``), and the band as
    ``(first, last)``: the window of layers whose retrieval scores sum highest.

    Why a contiguous band, not the top-scoring layers: retrieval in a Llama-family model runs through a
    stretch of middle-to-late layers, and widening only the layers of the top retrieval heads (at the same
    cache) was worse than widening the whole stretch on every measure
    (``benchmarks/results/2026-12-07-cpu-retrieval-layer-widths``); recovered at 8K, the 14–23 band of
    SmolLM2-135M (1.5× / 0.75×) kept the passkey to 2K (``2026-12-07-h100-long-context``). On SmolLM2 this
    window of its retrieval scores is exactly layers 14–23."""
    layers = len(layer_scores)
    if layers < 2:
        raise ConversionError("a retrieval band needs at least two layers")
    if not 0 < share < 1 or factor <= 1:
        raise ConversionError(f"a retrieval band takes a share in (0, 1) of the layers and a factor above 1, "
                              f"not {share} and {factor}")
    k = min(layers - 1, max(1, round(share * layers)))
    average = total / layers
    wide = int(factor * average) // align * align
    if max_rank is not None:
        wide = min(wide, max_rank // align * align)
    narrow = (total - k * wide) // (layers - k) // align * align
    if narrow < align or wide <= narrow:
        raise ConversionError(f"a latent budget of {total} over {layers} layers is too small for a retrieval band "
                              f"({k} layers at {wide}, the rest at {narrow}): raise --d-kv")
    sums = [sum(layer_scores[i:i + k]) for i in range(layers - k + 1)]
    first = max(range(len(sums)), key=lambda i: (sums[i], -i))
    widths = [wide if first <= i < first + k else narrow for i in range(layers)]
    return widths, (first, first + k - 1)

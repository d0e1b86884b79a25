"""Per-layer widths from measured costs: ``--allocate measured`` (latent widths) and with
``--rope-choices`` (rotary dims and latent widths per layer).

Both convert the source at the widest sizes a layer may take into scratch folders beside the
destination (removed afterwards), measure on calibration text what each layer loses at each
size (:mod:`conversion.sensitivity`), and fix ``plan.layer_latent`` (and ``plan.layer_rope``)
before :func:`conversion.convert.convert` writes the checkpoint.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from conversion.allocation import choose_options, interpolate_cost
from conversion.calibration import CalibrationStats
from conversion.layers import write_checkpoint
from conversion.mla_format.layout import plan_exact_layout
from conversion.plan import WIDE_FACTOR, ConversionPlan, max_latent_rank, select_rope_pairs
from conversion.recovery.data import text_windows
from conversion.reference_model import load_reference
from conversion.sensitivity import MixedAttention, measured_allocation, mixed_kl, option_costs, reference_logprobs
from conversion.source import SourceWeights


def allocate_measured(plan: ConversionPlan, weights: SourceWeights, stats: CalibrationStats | None,
                      text: str, dst: Path, show_progress: bool) -> dict:
    """Fixes ``plan.layer_latent``: converts at the widest latent a layer may take into a
    scratch folder beside ``dst`` (removed afterwards), measures each layer's cost at each width
    with every other layer at the average (:func:`conversion.sensitivity.truncation_costs`, KL
    from the wide model on the calibration text) and spends the budget where it cuts the summed
    cost most (:func:`conversion.allocation.allocate_by_cost`).
    Returns what the report shows about it."""
    import tempfile
    import time

    opts, layers, step = plan.options, plan.spec.num_layers, plan.options.rank_step
    wide = plan.layout.latent_width
    average = plan.latent_total // layers
    started = time.perf_counter()
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dst.name}.wide-", dir=dst.parent) as scratch:
        wide_dir = Path(scratch) / "wide"
        wide_plan = ConversionPlan(plan.spec, plan.layout, opts, torch.float32, [])
        write_checkpoint(wide_plan, weights, stats, select_rope_pairs(wide_plan, stats), wide_dir, show_progress, None)
        windows = _sensitivity_windows(plan, text)
        model = load_reference(wide_dir)
        grid = _measured_widths(step, wide, average, {average, wide})
        # measured around the uniform operating point (every other layer at the average width): closer to
        # where the allocation lands than the wide model, and better measured (38% -> 42% of the gap closed
        # at 192 values, 5% -> 14% at 96; benchmarks/results/rank-allocation-cpu/); further passes measure
        # around the allocation found
        ranks, passes = measured_allocation(model, windows, grid, plan.latent_total, step, opts.allocation_passes,
                                            show_progress=show_progress)
        del model
    costs = passes[0]["costs"]
    uniform = [plan.latent_total / layers] * layers
    plan.layer_latent = ranks
    plan.layout = plan.layout.with_latent(max(ranks))
    predicted = lambda rs: float(sum(interpolate_cost(c, r) for c, r in zip(costs, rs)))  # noqa: E731
    return {
        "method": opts.allocate,
        "latent_total": plan.latent_total,
        "rank_step": step,
        "widest_allowed": wide,
        "layer_latent": ranks,
        "measured_on_tokens": int(windows.numel()),
        "measured_ranks": grid,
        "truncation_costs": [{str(r): c for r, c in layer.items()} for layer in costs],
        "predicted_kl": {"uniform": predicted(uniform), "allocated": predicted(ranks)},
        "passes": [{"base": h["base"], "measured_kl": h["base_kl"]} for h in passes],
        "seconds": time.perf_counter() - started,
    }


def _measured_widths(step: int, wide: int, average: int, extra: set[int]) -> list[int]:
    """Latent widths an allocation measures, up to ``wide``: every ``step`` up to the average
    width, every second step above it (fewer passes where the budget rarely reaches), and ``extra``."""
    return sorted({w for w in range(step, wide + 1, step) if w <= average or w % (2 * step) == 0} | extra)


def _sensitivity_windows(plan: ConversionPlan, text: str) -> torch.Tensor:
    """``[n, T]`` calibration token windows on which allocations measure their costs."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(plan.spec.path))
    seq_len = min(plan.options.calib_seq_len, 512)
    return torch.tensor(text_windows(tokenizer, text, seq_len, plan.options.sensitivity_tokens))


def allocate_measured_with_rope(plan: ConversionPlan, weights: SourceWeights, stats: CalibrationStats | None,
                                text: str, dst: Path, show_progress: bool) -> dict:
    """Fixes ``plan.layer_rope`` and ``plan.layer_latent``: each layer's rotary dims (one of
    ``--rope-choices``) and latent width, under the same total of cached values.

    Converts the source once per rotary width R at the widest latent a layer may take (scratch
    folders beside ``dst``, removed afterwards); each layer's option (R, w) is that layer's
    attention from the R conversion with its latent cut to w (:class:`sensitivity.MixedAttention`).
    Costs are measured as KL from the *original* model (loaded from the source folder), with every
    other layer at the uniform operating point, and the options of least summed cost within the
    budget are chosen exactly (:func:`allocation.choose_options`). On SmolLM2 at 96 values this
    closes 51% of the uniform conversion's perplexity gap, against 25% for latent widths alone
    (``benchmarks/results/rank-allocation-cpu/``). The measured KL of the result and of uniform
    layers are both reported; if the allocation measures worse, uniform layers are kept.
    Returns what the report shows about it."""
    import tempfile
    import time

    from transformers import AutoModelForCausalLM

    spec, opts, step = plan.spec, plan.options, plan.options.rank_step
    g, layers = spec.num_kv_heads, spec.num_layers
    average = plan.latent_total // layers
    base = (opts.rope_dim, average)
    total_values = plan.latent_total + g * opts.rope_dim * layers
    widest_values = WIDE_FACTOR * total_values // layers
    started = time.perf_counter()
    windows = _sensitivity_windows(plan, text)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dst.name}.wide-", dir=dst.parent) as scratch:
        models, grid = {}, {}
        for rope_dim in sorted(set(opts.rope_choices) | {opts.rope_dim}):
            wide = min(max_latent_rank(spec, rope_dim), widest_values - g * rope_dim) // step * step
            if rope_dim == opts.rope_dim:
                wide = max(wide, average)
            if wide < step:
                continue  # this many rotary dims leave no room for a latent group within the widest row
            layout = plan_exact_layout(spec.num_heads, g, spec.head_dim, rope_dim, max(1, average // g)).with_latent(wide)
            wide_plan = ConversionPlan(spec, layout, replace(opts, rope_dim=rope_dim), torch.float32, [])
            folder = Path(scratch) / f"wide-rope{rope_dim}"
            write_checkpoint(wide_plan, weights, stats, select_rope_pairs(wide_plan, stats), folder, False, None)
            models[rope_dim] = load_reference(folder)
            grid[rope_dim] = _measured_widths(step, wide, average, {average} if rope_dim == opts.rope_dim else set())
        original = AutoModelForCausalLM.from_pretrained(str(spec.path), dtype=torch.float32).eval()
        reference = reference_logprobs(original, windows)
        del original
        mixed = MixedAttention(models, host_rope=opts.rope_dim)
        costs = option_costs(mixed, reference, windows, grid, [base] * layers, show_progress=show_progress)
        chosen = choose_options(costs, total_values, g)
        measured = {"uniform": mixed_kl(mixed, reference, windows, [base] * layers),
                    "allocated": mixed_kl(mixed, reference, windows, chosen)}
        del mixed, models
    if measured["allocated"] > measured["uniform"]:
        chosen = [base] * layers
    plan.layer_rope = [r for r, _ in chosen]
    plan.layer_latent = [w for _, w in chosen]
    plan.layout = plan.layout.with_latent(max(plan.layer_latent)).with_rope(max(plan.layer_rope))
    return {
        "method": f"{opts.allocate} (rotary dims {sorted(grid)} and latent widths)",
        "latent_total": sum(plan.layer_latent),
        "values_total": sum(g * r + w for r, w in chosen),
        "rank_step": step,
        "layer_latent": plan.layer_latent,
        "layer_rope": plan.layer_rope,
        "measured_on_tokens": int(windows.numel()),
        "measured_options": {str(r): ws for r, ws in grid.items()},
        "option_costs": [{f"{r}/{w}": c for (r, w), c in layer.items()} for layer in costs],
        "predicted_kl": {"uniform": float(sum(c[base] for c in costs)),
                         "allocated": float(sum(c[o] for c, o in zip(costs, chosen)))},
        "measured_kl": measured,
        "seconds": time.perf_counter() - started,
    }

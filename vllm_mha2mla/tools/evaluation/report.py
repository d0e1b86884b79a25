"""results.json, results.md (rows: task metrics; columns: models, the first the reference
with the others' differences), results.png (grouped bars) and long_context.png (accuracy by
length and depth), each written atomically.

Metrics print as percentages (accuracy, exact match, agreement fractions) except the
perplexities and ``rouge_l_f1`` (a score in [0, 1], three decimals); ``↓`` marks those where
lower is better (perplexities, ``echoes_system_prompt``, ``wrong_needle``)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

_LOWER_IS_BETTER = {"token_perplexity", "bits_per_byte", "byte_perplexity", "word_perplexity", "perplexity"}
_UNIT_SCORES = {"rouge_l_f1"}
"""Shown as they are (three decimals), not as percentages."""
_LOWER_IS_BETTER_PERCENT = {"echoes_system_prompt", "wrong_needle"}


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(value: float | None, metric: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3f}" if metric in _LOWER_IS_BETTER | _UNIT_SCORES else f"{100 * value:.1f}"


def _metric_label(metric: str) -> str:
    if metric in _LOWER_IS_BETTER:
        return metric + " ↓"
    if metric in _UNIT_SCORES:
        return metric
    return metric + (" (%) ↓" if metric in _LOWER_IS_BETTER_PERCENT else " (%)")


def markdown_table(summary: dict) -> str:
    models = summary["models"]
    ref = models[0]
    head = ["task", "metric", "n"] + [ref] + [f"{m} (Δ vs {ref})" for m in models[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, spec in summary["tasks"].items():
        for metric in spec["metrics"]:
            res = {m: summary["results"][m]["tasks"][task] for m in models}
            ref_value = res[ref].get(metric)
            cells = [task, _metric_label(metric), str(res[ref]["n"]),
                     _fmt(ref_value, metric) + _stderr(res[ref], metric)]
            for m in models[1:]:
                value = res[m].get(metric)
                delta = "" if value is None or ref_value is None else \
                    f" ({'+' if value >= ref_value else ''}{_fmt(value - ref_value, metric)})"
                cells.append(_fmt(value, metric) + delta)
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| model | engines | items | seconds | items/s | items/s per engine | prompt tokens/s |",
              "|---|---|---|---|---|---|---|"]
    for m in models:
        t, e = summary["results"][m]["throughput"], summary["results"][m]["engine"]
        device = e["replicas"][0]["device"] if e["replicas"] else "?"
        lines.append(f"| {m} | {e['num_replicas']} × {device} | {t['items']} | {t['seconds']:.1f} | "
                     f"{t['items_per_s']:.1f} | {t['items_per_s_per_engine']:.1f} | {t['prompt_tokens_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"


def _stderr(res: dict, metric: str) -> str:
    err = res.get(f"{metric}_stderr")
    return "" if err is None or math.isnan(err) else f" ± {_fmt(err, metric)}"


def _plot_bars(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = summary["models"]
    acc_tasks = [t for t, s in summary["tasks"].items() if s["metrics"][0] not in _LOWER_IS_BETTER]
    ppl_tasks = [t for t, s in summary["tasks"].items() if s["metrics"][0] in _LOWER_IS_BETTER]
    panels = [(acc_tasks, "accuracy / exact match / agreement (%)"), (ppl_tasks, "perplexity (log scale)")]
    panels = [p for p in panels if p[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6, 1.1 * len(acc_tasks) * len(models) ** 0.5) + 4, 4.5),
                             squeeze=False, gridspec_kw={"width_ratios": [max(1, len(p[0])) for p in panels]})
    width = 0.8 / len(models)
    for ax, (tasks, ylabel) in zip(axes[0], panels):
        for k, m in enumerate(models):
            values = []
            for t in tasks:
                metric = summary["tasks"][t]["metrics"][0]
                v = summary["results"][m]["tasks"][t].get(metric)
                values.append((100 * v if metric not in _LOWER_IS_BETTER else v) if v is not None else 0)
            ax.bar([i + (k - (len(models) - 1) / 2) * width for i in range(len(tasks))], values, width, label=m)
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels(tasks, rotation=30, ha="right")
        ax.set_ylabel(ylabel)
        if tasks is ppl_tasks:
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_heat(summary: dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t, s in summary["tasks"].items() if s["kind"] == "long_context"]
    models = summary["models"]
    if not tasks:
        return False
    fig, axes = plt.subplots(len(tasks), len(models), figsize=(3.2 * len(models) + 1, 2.6 * len(tasks)),
                             squeeze=False, layout="constrained")  # titles clear of the row above's ticks
    for r, task in enumerate(tasks):
        for c, m in enumerate(models):
            grid = summary["results"][m]["tasks"][task]["grid"]
            lengths = sorted({g["length"] for g in grid})
            depths = sorted({g["depth"] for g in grid})
            table = [[next((g["acc"] for g in grid if g["length"] == ln and g["depth"] == d), float("nan"))
                      for ln in lengths] for d in depths]
            ax = axes[r][c]
            im = ax.imshow(table, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)))
            ax.set_xticklabels([f"{ln // 1024}K" if ln >= 1024 else str(ln) for ln in lengths])
            ax.set_yticks(range(len(depths)))
            ax.set_yticklabels([f"{int(100 * d)}%" for d in depths])
            ax.set_title(f"{m}: {task}", fontsize=9)
            if c == 0:
                ax.set_ylabel("needle depth")
            if r == len(tasks) - 1:
                ax.set_xlabel("context length (tokens)")
    fig.colorbar(im, ax=axes, shrink=0.8, label="accuracy")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_reports(summary: dict, output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    _write(output / "results.json", json.dumps(summary, indent=2, default=str) + "\n")
    _write(output / "results.md", markdown_table(summary))
    try:
        _plot_bars(summary, output / "results.png")
        _plot_heat(summary, output / "long_context.png")
    except ImportError:  # matplotlib is in the demo extra
        print("mha2mla eval: matplotlib is not installed: no plots (pip install matplotlib)")

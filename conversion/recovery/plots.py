"""``loss.png`` of a recovery run: what people look at first.

Three panels: the global stage's training loss per step, held-out perplexity against tokens
seen (with the teacher's and the unrecovered student's as reference lines), and the local
stage's per-layer held-out attention-output error before and after.
"""

from __future__ import annotations

import io


def write_loss_plot(report: dict) -> bytes | None:
    """PNG bytes of the run's curves, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ppl = report.get("perplexity", {})
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    glob = report.get("global")
    ax = axes[0]
    if glob and glob["loss_curve"]:
        ax.plot([p["step"] for p in glob["loss_curve"]], [p["loss"] for p in glob["loss_curve"]], color="#2e86c1")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"training loss ({report['options']['global_']['loss']})")
    else:
        ax.text(0.5, 0.5, "no global stage", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("global stage: training loss")
    ax = axes[1]
    points = [(0, ppl.get("student_after_local", ppl.get("student_before")))]
    if glob:
        points += [(p["tokens"], p["perplexity"]) for p in glob["eval_curve"]]
    points = [p for p in points if p[1] is not None]
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", color="#2e86c1", label="student")
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    for key, style, label in (("teacher", "--", "original (teacher)"), ("student_before", ":", "converted, before")):
        if key in ppl:
            ax.axhline(ppl[key], linestyle=style, color="#7f8c8d", label=f"{label}: {ppl[key]:.2f}")
    ax.set_xlabel("tokens seen (global stage)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("held-out perplexity")
    if ppl:
        ax.legend(fontsize=8)
    ax = axes[2]
    local = report.get("local")
    if local:
        layers = [p["layer"] for p in local["layers"]]
        ax.bar([x - 0.2 for x in layers], [p["held_out_error_before"] for p in local["layers"]], width=0.4,
               color="#7f8c8d", label="SVD start")
        ax.bar([x + 0.2 for x in layers], [p["held_out_error_after"] for p in local["layers"]], width=0.4,
               color="#2e86c1", label="after local stage")
        ax.set_xlabel("layer")
        ax.set_ylabel("relative attention-output error (held out)")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no local stage", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("local stage: per-layer error")
    fig.suptitle(f"MHA2MLA recovery: {report['stage']} ({report['device']})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()

"""``summary.json`` and what is made from it: the ratios against the MHA original, the
Markdown tables and the plots.

``summary.json`` holds ``{"rows": [...], "serving": [...]}``: one throughput row per (device,
shape, variant, KV dtype, workload) with the fields :data:`ROW_FIELDS` (and a few more), one
serving row per (device, shape, variant, KV dtype, workload, request rate). New runs replace
the rows they measure again and keep the others, so a matrix can grow over several sessions
and machines. Ratios are computed here, only between rows of the same device, shape, KV dtype
and workload — never across runs of different hardware. Rows collected from several runs carry
``run`` (where they were measured, see ``benchmarks/end_to_end/collect_summary.py``): then each keeps its
own row and its ratios come from its own run's original only.
"""

from __future__ import annotations

import json
from pathlib import Path

ROW_FIELDS = ("device", "vllm_version", "shape", "variant", "cache_values", "kv_cache_dtype", "attention_backend",
              "input_len", "output_len", "num_prompts", "output_tokens_per_s", "kv_capacity_tokens")
ROW_KEY = ("run", "device", "shape", "variant", "kv_cache_dtype", "input_len", "output_len")
"""``run`` is None in a tool's own output (one run per summary)."""
SERVING_KEY = (*ROW_KEY, "request_rate")
TPOT_LIMIT_MS = 100.0
TTFT_LIMIT_MS = 1000.0
"""With the TPOT limit, what a served rate must also keep: an engine out of KV cache keeps its running
requests' TPOT low and queues the rest, so TPOT alone calls a rate served whose first tokens wait 25 s
(the MHA original at 4K/512, 8 req/s, ``benchmarks/results/h100-bench-4/``)."""
KV_BYTES = {"auto": 2, "bfloat16": 2, "float16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}
"""Bytes per cached value of each KV cache dtype; ``auto`` caches in the model dtype (see :func:`kv_bytes`)."""
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}


def kv_bytes(kv_cache_dtype: str, dtype: str | None = "bfloat16") -> int:
    """Bytes per cached value: ``auto`` caches in the model dtype (``--dtype``; rows written before the
    bench had that option ran bfloat16)."""
    if kv_cache_dtype == "auto":
        return DTYPE_BYTES.get(dtype or "bfloat16", 2)
    return KV_BYTES.get(kv_cache_dtype, 2)


def row_bytes(r: dict) -> float:
    """Cache bytes per token per layer of a row: the measured layout's true bytes where the bench recorded them
    (``kv_bytes_per_token_layer``: a low-bit row's codes, scales and minima), else values × bytes per value."""
    recorded = r.get("kv_bytes_per_token_layer")
    return recorded if recorded else r["cache_values"] * kv_bytes(r["kv_cache_dtype"], r.get("dtype"))


def _key(row: dict, fields: tuple[str, ...]) -> tuple:
    return tuple(row.get(f) for f in fields)


def merge_rows(old: list[dict], new: list[dict], fields: tuple[str, ...] = ROW_KEY) -> list[dict]:
    """``old`` with every row that ``new`` measures again replaced, then ``new``'s other rows."""
    fresh = {_key(r, fields): r for r in new}
    kept = [r for r in old if _key(r, fields) not in fresh]
    return kept + list(fresh.values())


def load_summary(path: Path) -> dict:
    if not path.is_file():
        return {"rows": [], "serving": []}
    data = json.loads(path.read_text())
    return {"rows": data.get("rows", []), "serving": data.get("serving", [])}


def save_summary(path: Path, rows: list[dict], serving: list[dict]) -> dict:
    data = load_summary(path)
    data = {"rows": merge_rows(data["rows"], rows), "serving": merge_rows(data["serving"], serving, SERVING_KEY)}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    return data


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each successful row with ``vs_mha`` (output tokens/s over the original's, same device,
    shape, KV dtype and workload), ``capacity_vs_mha`` (KV capacity over the original's) and
    ``expected_capacity`` (the original's cache bytes per token over this row's: what the
    capacity ratio should be if vLLM sizes the cache by the row width)."""
    ok = [r for r in rows if not r.get("error")]
    mha = {_key(r, ("run", "device", "shape", "kv_cache_dtype", "input_len", "output_len")): r
           for r in ok if r["variant"].split("@")[0] == "mha"}
    mha_any_dtype = {_key(r, ("run", "device", "shape")): r for r in ok if r["variant"].split("@")[0] == "mha"}
    out = []
    for r in ok:
        r = dict(r)
        base = mha.get(_key(r, ("run", "device", "shape", "kv_cache_dtype", "input_len", "output_len")))
        if base and base["output_tokens_per_s"]:
            r["vs_mha"] = r["output_tokens_per_s"] / base["output_tokens_per_s"]
        if base and base.get("decode_tokens_per_s") and r.get("decode_tokens_per_s"):
            r["decode_vs_mha"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        cap_base = base or mha_any_dtype.get(_key(r, ("run", "device", "shape")))
        if cap_base and cap_base.get("kv_capacity_tokens") and r.get("kv_capacity_tokens"):
            r["capacity_vs_mha"] = r["kv_capacity_tokens"] / cap_base["kv_capacity_tokens"]
            r["expected_capacity"] = row_bytes(cap_base) / row_bytes(r)
        out.append(r)
    return out


def _under(r: dict, metric: str, limit_ms: float | None) -> bool:
    return limit_ms is None or (r.get(metric) is not None and r[metric] < limit_ms)


def best_serving_rates(serving: list[dict], ttft_limit_ms: float | None = None) -> dict[tuple, float | None]:
    """Per (run, device, shape, variant, KV dtype, workload): the highest request rate whose TPOT p99
    stayed under :data:`TPOT_LIMIT_MS` — and, given ``ttft_limit_ms``, whose TTFT p99 stayed under
    that — with no failed request (None if no rate did)."""
    best: dict[tuple, float | None] = {}
    for r in serving:
        if r.get("error"):
            continue
        key = _key(r, ROW_KEY)
        best.setdefault(key, None)
        if _under(r, "p99_tpot_ms", TPOT_LIMIT_MS) and _under(r, "p99_ttft_ms", ttft_limit_ms) \
                and r.get("failed", 0) == 0:
            best[key] = max(best[key] or 0.0, r["request_rate"])
    return best


def _fmt(value, spec: str = ",.0f") -> str:
    return "–" if value is None else format(value, spec)


def _workload(r: dict) -> str:
    return f"{r['input_len']}/{r['output_len']}"


def markdown(summary: dict) -> str:
    """The tables the README shows: throughput with ratios, then serving latency."""
    runs = [r.get("run") or "" for r in summary["rows"]]
    order = {run: i for i, run in reversed(list(enumerate(runs)))}  # runs as first listed (collected oldest first)
    rows = sorted(with_ratios(summary["rows"]), key=lambda r: (r["device"], r["shape"], r["input_len"],
                                                               r["output_len"], order[r.get("run") or ""],
                                                               r["kv_cache_dtype"], r["cache_values"], r["variant"]))
    with_run = any(runs)

    def run_cell(r: dict) -> str:  # a collected summary's first column: where the row was measured
        return f"| {r.get('run') or ''} " if with_run else ""

    head, rule = ("| run ", "|---") if with_run else ("", "")
    lines = [head + "| device | shape | workload (in/out) | variant | cache values | KV dtype | bytes/token/layer | "
             "attention | prompts | output tok/s | × MHA | decode-phase tok/s (running) | × MHA | KV capacity (tokens) | "
             "capacity × MHA (expected) |",
             rule + "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cap = (f"{r['capacity_vs_mha']:.2f} ({r['expected_capacity']:.2f})" if "capacity_vs_mha" in r else "–")
        decode = (f"{r['decode_tokens_per_s']:,.0f} ({r['decode_running']})" if r.get("decode_tokens_per_s")
                  else "–")
        lines.append(run_cell(r) +
                     f"| {r['device']} | {r['shape']} | {_workload(r)} | {r['variant']} | {r['cache_values']} | "
                     f"{r['kv_cache_dtype']} | {_fmt(row_bytes(r), 'g')} | {r['attention_backend']} | {r['num_prompts']} | "
                     f"{_fmt(r['output_tokens_per_s'])} | {_fmt(r.get('vs_mha'), '.2f')} | {decode} | "
                     f"{_fmt(r.get('decode_vs_mha'), '.2f')} | {_fmt(r.get('kv_capacity_tokens'))} | {cap} |")
    failed = [r for r in summary["rows"] if r.get("error")]
    for r in failed:
        lines.append(run_cell(r) +
                     f"| {r['device']} | {r['shape']} | {_workload(r)} | {r['variant']} | {r.get('cache_values')} | "
                     f"{r['kv_cache_dtype']} | – | – | – | failed: {r['error'].splitlines()[0][:80]} | | | | | | |")
    serving = [r for r in summary["serving"] if not r.get("error")]
    if serving:
        best = best_serving_rates(serving)
        best_with_ttft = best_serving_rates(serving, TTFT_LIMIT_MS)
        lines += ["", f"Serving (`vllm bench serve`, Poisson arrivals; best rate = highest with TPOT p99 < "
                      f"{TPOT_LIMIT_MS:g} ms; and with TTFT p99 < {TTFT_LIMIT_MS / 1000:g} s too):", "",
                  head + "| device | shape | workload | variant | KV dtype | rate (req/s) | "
                  "TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | ITL p50 / p99 (ms) | output tok/s | best rate | "
                  "best rate, TTFT too |",
                  rule + "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(serving, key=lambda r: (*(str(v) for v in _key(r, ROW_KEY)), r["request_rate"])):
            lines.append(
                run_cell(r) +
                f"| {r['device']} | {r['shape']} | {_workload(r)} | {r['variant']} | {r['kv_cache_dtype']} | "
                f"{_fmt(r['request_rate'], 'g')} | {_fmt(r.get('p50_ttft_ms'), '.1f')} / "
                f"{_fmt(r.get('p99_ttft_ms'), '.1f')} | {_fmt(r.get('p50_tpot_ms'), '.1f')} / "
                f"{_fmt(r.get('p99_tpot_ms'), '.1f')} | {_fmt(r.get('p50_itl_ms'), '.1f')} / "
                f"{_fmt(r.get('p99_itl_ms'), '.1f')} | {_fmt(r.get('output_tokens_per_s'))} | "
                f"{_fmt(best.get(_key(r, ROW_KEY)), 'g')} | {_fmt(best_with_ttft.get(_key(r, ROW_KEY)), 'g')} |")
    return "\n".join(lines) + "\n"


def _panels(plt, count: int):
    fig, axes = plt.subplots(1, count, figsize=(5.5 * count, 4), squeeze=False)
    return fig, axes[0]


def _finish(plt, fig, path: Path, written: list[Path]) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)


def _throughput_panel(ax, rows: list[dict], title: str) -> None:
    for series in sorted({(r["variant"], r["kv_cache_dtype"], r["cache_values"]) for r in rows}, key=lambda s: -s[2]):
        # several runs of the same series at one context (a collected summary, oldest first): the latest is drawn
        pts = sorted({r["input_len"] + r["output_len"]: r["output_tokens_per_s"] for r in rows
                      if (r["variant"], r["kv_cache_dtype"], r["cache_values"]) == series}.items())
        label = f"{series[0]} ({series[2]} values{', ' + series[1] if series[1] != 'auto' else ''})"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-" if series[1] == "auto" else "--", marker="o",
                label=label)
    ax.set_xscale("log", base=2)
    ax.set(ylim=(0, None), xlabel="context (input + output tokens)", ylabel="output tokens/s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def _capacity_panel(ax, rows: list[dict], title: str) -> None:
    caps = {f"{r['variant']}\n{r['kv_cache_dtype']}": r["kv_capacity_tokens"] for r in rows
            if r.get("kv_capacity_tokens")}
    ax.bar(list(caps), list(caps.values()), color="tab:blue")
    ax.set_ylabel("KV capacity (tokens)")
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelsize=7, labelrotation=30)  # variant names such as native@FLASHMLA side by side


def _serving_panel(ax, rows: list[dict], title: str, metric: str = "p99_tpot_ms", limit_ms: float = TPOT_LIMIT_MS,
                   label: str = "TPOT p99 (ms)", log_scale: bool = False) -> None:
    def series_of(r: dict) -> tuple[str, str, str]:
        # one line per run too: runs may load the server differently (a fixed request count, or
        # --serve-seconds), so their points at one rate are not one curve
        return r["variant"], r["kv_cache_dtype"], r.get("run") or ""

    for series in sorted({series_of(r) for r in rows}):
        pts = sorted((r["request_rate"], r.get(metric)) for r in rows if series_of(r) == series)
        variant, kv_dtype, run = series
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                label=f"{variant} {kv_dtype}" + (f" ({run})" if run else ""))
    ax.axhline(limit_ms, color="grey", lw=0.8, ls=":")
    if log_scale:
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, None)
    ax.set(xlabel="request rate (req/s)", ylabel=label)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def _ttft_panel(ax, rows: list[dict], title: str) -> None:
    _serving_panel(ax, rows, title, "p99_ttft_ms", TTFT_LIMIT_MS, "TTFT p99 (ms)",
                   log_scale=True)  # queued requests wait seconds, served ones milliseconds


def plot(summary: dict, folder: Path) -> list[Path]:
    """``throughput.png`` (output tokens/s against context length, MHA vs each conversion, one
    panel per device × shape), ``kv_capacity.png`` and, with serving rows, ``serving.png`` and
    ``serving_ttft.png`` (TPOT p99 and TTFT p99 against request rate). Skipped (empty list) without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = with_ratios(summary["rows"])
    serving = [r for r in summary["serving"] if not r.get("error")]
    written: list[Path] = []
    figures = (("throughput.png", _throughput_panel, rows, lambda r: (r["device"], r["shape"])),
               ("kv_capacity.png", _capacity_panel, rows, lambda r: (r["device"], r["shape"])),
               ("serving.png", _serving_panel, serving, lambda r: (r["device"], r["shape"], _workload(r))),
               ("serving_ttft.png", _ttft_panel, serving, lambda r: (r["device"], r["shape"], _workload(r))))
    for name, draw, data, group_of in figures:
        groups = sorted({group_of(r) for r in data})
        if not groups:
            continue
        fig, axes = _panels(plt, len(groups))
        for ax, group in zip(axes, groups):
            draw(ax, [r for r in data if group_of(r) == group], " — ".join(reversed(group)))
        _finish(plt, fig, folder / name, written)
    return written

"""Every `mha2mla bench` run under ``benchmarks/results/`` in one ``benchmarks/results/summary.json``.

Each run folder keeps the summary its own run wrote; this gathers them, oldest first, with each
row's ``run`` set to its folder, so one table and one set of plots show the whole matrix while
every ratio still compares a conversion with the MHA original of its own run (same machine, same
lease: ``vllm_mha2mla.tools.bench.summary.with_ratios``). The plots draw the latest run's point where
several runs measured the same row.

Usage: python -m benchmarks.end_to_end.collect_summary [RESULTS_DIR]   (writes summary.json, summary.md, plots there)
A new bench run folder (named as benchmarks/README.md says) is added to RUNS, after the ones before it.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.common import cli_args
from vllm_mha2mla.tools.bench.run import write_report
from vllm_mha2mla.tools.bench.summary import load_summary

RESULTS = Path(__file__).resolve().parents[1] / "results"

RUNS = ("h200x4-bench", "h100-bench", "h100-bench-2", "h100-bench-3", "h100-bench-4", "h100-bench-5",
        "h100-bench-6", "h100-bench-7", "h100-bench-8", "h100-bench-9", "h100-bench-10", "h100-bench-11",
        "h100-bench-12", "h100-bench-13", "h100-bench-14", "h100-bench-15", "2026-12-08-cpu-int4-cache")
"""The bench run folders, oldest first (a folder's README says what ran in it and how; benchmarks/README.md
says which rows of each are current)."""


def collect(results: Path, runs: tuple[str, ...] = RUNS) -> dict:
    rows: list[dict] = []
    serving: list[dict] = []
    for run in runs:
        path = results / run / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no summary.json in bench run folder {run!r}")
        summary = load_summary(path)
        rows += [{**r, "run": run} for r in summary["rows"]]
        serving += [{**r, "run": run} for r in summary["serving"]]
    out = results / "summary.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"runs": list(runs), "rows": rows, "serving": serving}, indent=1))
    tmp.replace(out)
    return write_report(results)


if __name__ == "__main__":
    args = cli_args(__doc__, min_args=0)
    folder = Path(args[0]) if args else RESULTS
    summary = collect(folder)
    print(f"{len(summary['rows'])} throughput rows and {len(summary['serving'])} serving rows from {len(RUNS)} runs "
          f"-> {folder / 'summary.json'}, summary.md, plots")

"""Issue 31's targets, read off one `mha2mla eval` results.json: how far each recovered model is from the original.

    python -m benchmarks.studies.behaviour_targets RESULTS_JSON [--original original] [--converted converted]
        [--reports DIR] [--output DIR]

Prints a table and writes ``targets.json`` + ``targets.md`` (into ``--output``, default beside RESULTS_JSON):
the mean accuracy of the 8 zero-shot multiple-choice tasks and its distance to the original, the tasks below the
unrecovered conversion, TriviaQA / NQ-open exact match, the agreement task, and the perplexity ratios (held-out
Wikipedia, essays). With ``--reports DIR`` the table also shows the global stage's training tokens of each model,
read from ``DIR/LABEL-finetune_report.json`` (what `benchmarks/gpu/behaviour.sh` collects), because an ablation
"at equal time" is only fair when the token counts are read beside it.

Why a script: the merged evaluation table has ~30 rows per model; the question a recovery run answers is these
eight numbers, and reading them off by hand is where mistakes come from.
"""

from __future__ import annotations

import json

from benchmarks.common import eval_results_with_original, targets_parser, write_targets

MC_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "openbookqa", "sciq")
"""The 8 zero-shot multiple-choice tasks of the issue's target (accuracy, not length-normalised)."""


def mc_mean(tasks: dict) -> float:
    """Mean accuracy (%) of the 8 multiple-choice tasks; a missing task is an error, not a smaller mean."""
    missing = [t for t in MC_TASKS if t not in tasks]
    if missing:
        raise ValueError(f"results lack multiple-choice tasks {missing} (run `mha2mla eval --tasks mc`)")
    return 100.0 * sum(tasks[t]["acc"] for t in MC_TASKS) / len(MC_TASKS)


def target_row(tasks: dict, original: dict, converted: dict | None) -> dict:
    """The target figures of one model against the original (and, for the per-task floor, the conversion)."""
    row = {"mc_mean": mc_mean(tasks), "mc_gap": mc_mean(original) - mc_mean(tasks)}
    if converted is not None:
        row["mc_below_converted"] = [t for t in MC_TASKS if tasks[t]["acc"] < converted[t]["acc"]]
    for task in ("triviaqa", "nq_open"):
        if task in tasks:
            row[f"{task}_em"] = 100.0 * tasks[task]["exact_match"]
            row[f"{task}_gap"] = 100.0 * (original[task]["exact_match"] - tasks[task]["exact_match"])
    if "agreement" in tasks:
        agreement = tasks["agreement"]
        row["first_sentence_match"] = 100.0 * agreement["first_sentence_match"]
        row["rouge_l_f1"] = agreement["rouge_l_f1"]
        row["non_empty"] = 100.0 * agreement["non_empty"]
        row["echoes_system_prompt"] = 100.0 * agreement["echoes_system_prompt"]
    for task in ("wikipedia", "essays"):
        if task in tasks:
            row[f"{task}_ppl_ratio"] = tasks[task]["token_perplexity"] / original[task]["token_perplexity"]
    return row


def global_tokens(report: dict) -> int | None:
    """Tokens the global stage trained on (its throughput x its seconds), None without a global stage."""
    stage = report.get("global") or {}
    if stage.get("tokens_per_s") is None or stage.get("seconds") is None:
        return None
    return round(stage["tokens_per_s"] * stage["seconds"])


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(rows: dict[str, dict]) -> str:
    """One line per model, the issue's target in the header."""
    head = ("| model | train tokens | MC mean (gap) | tasks below converted | TriviaQA / NQ EM (gap) | agreement: first "
            "sentence / ROUGE-L / non-empty | Wikipedia / essays ppl ratio |\n"
            "|---|---|---|---|---|---|---|\n"
            "| *target (192 values)* | | *gap ≤ 1.0* | *none* | *gaps ≤ 2* | *≥ 50% / ≥ 0.6 / ≥ 98%* | *≤ 1.05 / ≤ 1.10* |\n")
    lines = []
    for label, row in rows.items():
        tokens = row.get("train_tokens")
        below = row.get("mc_below_converted")
        lines.append(
            f"| {label} | {_fmt(tokens / 1e6 if tokens else None, '.1f')}{'M' if tokens else ''} "
            f"| {row['mc_mean']:.2f} ({row['mc_gap']:+.2f}) "
            f"| {'–' if below is None else (', '.join(below) or 'none')} "
            f"| {_fmt(row.get('triviaqa_em'), '.1f')} / {_fmt(row.get('nq_open_em'), '.1f')} "
            f"({_fmt(row.get('triviaqa_gap'), '+.1f')} / {_fmt(row.get('nq_open_gap'), '+.1f')}) "
            f"| {_fmt(row.get('first_sentence_match'), '.1f')}% / {_fmt(row.get('rouge_l_f1'), '.3f')} / "
            f"{_fmt(row.get('non_empty'), '.0f')}% "
            f"| {_fmt(row.get('wikipedia_ppl_ratio'), '.3f')} / {_fmt(row.get('essays_ppl_ratio'), '.3f')} |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = targets_parser("python -m benchmarks.studies.behaviour_targets", __doc__,
                            "an `mha2mla eval` results.json holding the original")
    parser.add_argument("--converted", default="converted", help="the unrecovered conversion's label (if present)")
    args = parser.parse_args(argv)
    results = eval_results_with_original(args.results, args.original)
    original = results[args.original]["tasks"]
    converted = results[args.converted]["tasks"] if args.converted in results else None
    rows = {}
    for label, entry in results.items():
        if label == args.original:
            continue
        rows[label] = target_row(entry["tasks"], original, converted if label != args.converted else None)
        report = args.reports / f"{label}-finetune_report.json" if args.reports else None
        if report is not None and report.is_file():
            rows[label]["train_tokens"] = global_tokens(json.loads(report.read_text()))
    write_targets(args.output or args.results.parent, {"original_mc_mean": mc_mean(original), "models": rows},
                  markdown(rows))


if __name__ == "__main__":
    main()

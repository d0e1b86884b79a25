"""Does per-layer rank allocation help before any fine-tuning? (issue 13's question, measured
without changing the serving format.)

Converts SmolLM2-135M-Instruct once at twice the average latent width (2-norm partial RoPE,
activation-aware joint SVD, default-corpus calibration). The SVD latent dims come in
descending order of the energy they keep, so zeroing a layer's trailing latent rows of
``kv_a_proj_with_mqa`` is exactly that layer's rank-``r`` truncation. Each allocation of the same
total — uniform, greedy on absolute energy, greedy on relative energy
(``conversion.allocation.allocate_ranks``), and the allocation minimising the measured KL cost of
each layer's truncation (``conversion.sensitivity`` on default-corpus training text,
``allocate_by_cost``) — is applied to the reference model in place and scored on the
default corpus's held-out split (PyTorch, float32). Reports the perplexity gap to the original
that each allocation closes relative to uniform.

Usage: python -m benchmarks.studies.rank_allocation_study OUT_DIR [--tokens N] [--sensitivity-tokens N]
       [--only NAME,...]
Results: benchmarks/README.md lists the folders this script wrote.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import held_out_windows, study_setup, window_perplexity
from conversion import ConvertOptions, convert, load_reference
from conversion.allocation import allocate_by_cost, allocate_ranks, kept_energy
from conversion.recovery.corpus import default_calibration_text
from conversion.recovery.data import text_windows
from conversion.sensitivity import measured_allocation, truncation_costs

SETTINGS = {  # cache values per token per layer → (rope_dim, average d_kv per kv-head)
    192: (32, 32),
    96: (16, 16),
}
STEP = 16


def main() -> None:
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--sensitivity-tokens", type=int, default=1024)
    ap.add_argument("--wide-factor", type=int, default=2, help="widest latent a layer may take, × the average")
    ap.add_argument("--budgets", default="192,96", help="cache values per layer to study (comma-separated)")
    ap.add_argument("--only", default="", help="comma-separated allocation names to score (default: all)")
    ap.add_argument("--passes", type=int, default=3,
                    help="measured-kl-passes: measure -> allocate passes, each around the last allocation")
    args = ap.parse_args()
    src, tok = study_setup(args.out)
    windows = held_out_windows(tok, args.tokens)
    original = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    results: dict = {"command": "python -m benchmarks.studies.rank_allocation_study " + " ".join(sys.argv[1:]),
                     "held_out_tokens": windows.numel(), "step": STEP,
                     "original_perplexity": window_perplexity(original, windows), "budgets": {}}
    del original
    print(f"original: {results['original_perplexity']:.3f}", flush=True)
    for values, (rope_dim, d_kv) in SETTINGS.items():
        if str(values) not in args.budgets.split(","):
            continue
        suffix = "" if args.wide_factor == 2 else f"-x{args.wide_factor}"
        big = args.out / f"wide-{values}{suffix}"
        if not (big / "config.json").is_file():
            convert(src, big, ConvertOptions(rope_dim=rope_dim, d_kv=args.wide_factor * d_kv, strategy="2-norm", svd="aw-joint",
                                             layout="exact", dtype="float32"))
        report = json.loads((big / "mha2mla_report.json").read_text())
        energies = report["latent_spectra"]
        layers = len(energies)
        wide = report["layout"]["d_kv"] * report["layout"]["num_kv_heads"]  # rows 0..wide-1 of kv_a: the latent
        average = wide // args.wide_factor
        model = load_reference(big)
        kv_a = [layer.self_attn.kv_a_proj_with_mqa.weight for layer in model.model.layers]
        saved = [w.detach().clone() for w in kv_a]
        rows = {"uniform": [average] * layers}
        for criterion in ("absolute", "relative"):
            rows[f"greedy-{criterion}"] = allocate_ranks(energies, average * layers, STEP, max_rank=wide,
                                                         criterion=criterion)
            # the same with every layer kept at >= 2/3 of the average (no starved layer)
            rows[f"greedy-{criterion}-floor"] = allocate_ranks(energies, average * layers, STEP, max_rank=wide,
                                                               criterion=criterion, min_rank=2 * average // 3)
        calib = torch.tensor(text_windows(tok, default_calibration_text(args.sensitivity_tokens * 8), 512,
                                          args.sensitivity_tokens))
        grid = [r for r in range(STEP, wide + 1, STEP) if r <= average or r % (2 * STEP) == 0]
        for label, base, suffix in (("measured-kl", None, ""), ("measured-kl-at-uniform", [average] * layers,
                                                                 "-at-uniform")):
            if args.only and not any(name.startswith(label) for name in args.only.split(",")):
                continue
            costs_file = big / f"truncation_costs-{args.sensitivity_tokens}{suffix}.json"
            if not costs_file.is_file():
                t0 = time.perf_counter()
                measured = truncation_costs(model, calib, grid, base_ranks=base)
                costs_file.write_text(json.dumps({"seconds": time.perf_counter() - t0, "tokens": calib.numel(),
                                                  "base_ranks": base,
                                                  "costs": [{str(r): c for r, c in m.items()} for m in measured]}))
            costs = [{int(r): c for r, c in m.items()} for m in json.loads(costs_file.read_text())["costs"]]
            rows[label] = allocate_by_cost(costs, average * layers, STEP)
            rows[f"{label}-floor"] = allocate_by_cost(costs, average * layers, STEP, min_rank=2 * average // 3)
            if base is not None and (not args.only or "measured-kl-passes" in args.only.split(",")):
                # what `convert --allocate measured --allocation-passes N` does, pass 1 from the cache
                t0 = time.perf_counter()
                chosen, history = measured_allocation(model, calib, grid, average * layers, STEP, args.passes,
                                                      first_costs=costs)
                rows["measured-kl-passes"] = chosen
                for k, h in enumerate(history[1:], start=2):
                    rows[f"measured-kl-pass{k}-start"] = h["base"]
                passes_log = [{"base": h["base"], "measured_kl": h["base_kl"]} for h in history]
                (big / f"passes-{args.sensitivity_tokens}.json").write_text(json.dumps(
                    {"seconds": time.perf_counter() - t0, "passes": passes_log}, indent=1))
        if args.only:
            rows = {k: v for k, v in rows.items() if k in args.only.split(",") or k.startswith("measured-kl-pass")}
        budget: dict = {"rope_dim": rope_dim, "average_latent": average, "wide_latent": wide, "allocations": {}}
        for name, ranks in rows.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                for w, orig, r in zip(kv_a, saved, ranks):
                    w.copy_(orig)
                    w[r:wide] = 0
            ppl = window_perplexity(model, windows)
            budget["allocations"][name] = {"ranks": ranks, "perplexity": ppl,
                                           "kept_energy_share": kept_energy(energies, ranks) / sum(map(sum, energies)),
                                           "seconds": time.perf_counter() - t0}
            print(f"{values} values, {name}: perplexity {ppl:.3f}, ranks {ranks}", flush=True)
        uni = budget["allocations"]["uniform"]["perplexity"]
        for name, row in budget["allocations"].items():
            row["gap_closed_vs_uniform_pct"] = 100 * (uni - row["perplexity"]) / (uni - results["original_perplexity"])
        results["budgets"][str(values)] = budget
        (args.out / "allocation.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| cache values | allocation | held-out perplexity | gap to the original closed vs uniform |",
             "|---|---|---|---|"]
    for values, budget in results["budgets"].items():
        for name, row in budget["allocations"].items():
            lines.append(f"| {values} | {name} | {row['perplexity']:.2f} | {row['gap_closed_vs_uniform_pct']:.1f}% |")
    (args.out / "allocation.md").write_text(f"original: {results['original_perplexity']:.2f}\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

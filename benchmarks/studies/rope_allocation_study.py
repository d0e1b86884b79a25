"""Rotary dims per layer as well as latent widths: does trading one for the other, layer by
layer, reach issue 13's 96-value target? (Measured on the reference model, no serving change.)

At 96 values per token per layer (SmolLM2: 3 kv-heads × (16 rotary + 16 latent dims)) the
latent-only measured allocation (``rank_allocation_study``) closed little of the uniform conversion's
perplexity gap; rotary keys are half of those values, and a uniform split with more of them did
better. So here each layer may also pick its rotary dims.

The source is converted once per rotary width R (2-norm pairs, activation-aware joint SVD, each
at a wide latent). Every layer's option (R, latent width w) — ``kv_heads·R + w`` cached values —
is that layer's attention taken from the R conversion with its latent cut to ``w``
(``conversion.sensitivity.MixedAttention``). Each option's cost is measured with every other
layer at the uniform operating point: the mean KL divergence per token of the next-token
distribution from the *original* model's, on default-corpus training text (``option_costs``).
``allocation.choose_options`` then picks the options of least summed cost within the budget
(exact), and every allocation is scored by held-out perplexity on the corpus's held-out split.
This is what ``mha2mla convert --allocate measured --rope-choices 8,16,24,32`` does.

Usage: python -m benchmarks.studies.rope_allocation_study OUT_DIR [--tokens N] [--sensitivity-tokens N]
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
from conversion.allocation import choose_options
from conversion.recovery.corpus import default_calibration_text
from conversion.recovery.data import text_windows
from conversion.sensitivity import MixedAttention, mixed_kl, option_costs, reference_logprobs

BASE = (16, 48)  # the uniform 96-value conversion: rotary dims per head, latent width (3 kv-heads × 16)
LATENT_GRID = {  # rotary dims per head → latent widths measured (values per layer ≤ 192, twice the average)
    8: (16, 32, 48, 64, 96, 128, 160),
    16: (16, 32, 48, 64, 96, 128),
    24: (16, 32, 48, 64, 96),
    32: (16, 32, 48, 64, 96),
}


def main() -> None:
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--sensitivity-tokens", type=int, default=1024)
    args = ap.parse_args()
    src, tok = study_setup(args.out)
    held_out = held_out_windows(tok, args.tokens)
    calib = torch.tensor(text_windows(tok, default_calibration_text(args.sensitivity_tokens * 8), 512,
                                      args.sensitivity_tokens))
    original = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    reference = reference_logprobs(original, calib)
    results: dict = {"command": "python -m benchmarks.studies.rope_allocation_study " + " ".join(sys.argv[1:]),
                     "held_out_tokens": held_out.numel(), "calibration_tokens": calib.numel(),
                     "original_perplexity": window_perplexity(original, held_out), "allocations": {}}
    print(f"original: {results['original_perplexity']:.3f}", flush=True)
    kv_heads = original.config.num_key_value_heads
    del original
    models = {}
    for rope, widths in LATENT_GRID.items():
        folder = args.out / f"wide-r{rope}"
        if not (folder / "config.json").is_file():
            convert(src, folder, ConvertOptions(rope_dim=rope, d_kv=-(-max(widths) // kv_heads), strategy="2-norm",
                                                svd="aw-joint", layout="exact", dtype="float32"))
        models[rope] = load_reference(folder)
    layers = len(models[BASE[0]].model.layers)
    mixed = MixedAttention(models, host_rope=BASE[0])
    base = [BASE] * layers
    costs_file = args.out / f"option_costs-{calib.numel()}.json"
    if not costs_file.is_file():
        t0 = time.perf_counter()
        measured = option_costs(mixed, reference, calib, LATENT_GRID, base)
        costs_file.write_text(json.dumps({"seconds": time.perf_counter() - t0, "base": BASE, "costs": [
            {f"{r}/{w}": c for (r, w), c in layer.items()} for layer in measured]}))
    costs = [{tuple(map(int, k.split("/"))): c for k, c in layer.items()}
             for layer in json.loads(costs_file.read_text())["costs"]]
    budget = (kv_heads * BASE[0] + BASE[1]) * layers
    rows = {"uniform (16 rotary + 48 latent)": base,
            "uniform (24 rotary + 24 latent)": [(24, 24)] * layers,
            "measured, latent only (16 rotary)": choose_options(
                [{o: c for o, c in layer.items() if o[0] == BASE[0]} for layer in costs], budget, kv_heads),
            "measured, rotary and latent": choose_options(costs, budget, kv_heads)}
    for name, options in rows.items():
        t0 = time.perf_counter()
        values = sum(kv_heads * r + w for r, w in options)
        row = {"options": options, "values_per_layer": values / layers,
               "predicted_kl": sum(c[o] for c, o in zip(costs, options) if o in c),
               "calibration_kl": mixed_kl(mixed, reference, calib, options),
               "perplexity": window_perplexity(mixed.host, held_out)}  # mixed_kl left every layer at its option
        row["seconds"] = time.perf_counter() - t0
        results["allocations"][name] = row
        print(f"{name}: {values / layers:.1f} values/layer, KL {row['calibration_kl']:.3f}, "
              f"perplexity {row['perplexity']:.2f}, {options}", flush=True)
    uni = results["allocations"]["uniform (16 rotary + 48 latent)"]["perplexity"]
    for row in results["allocations"].values():
        row["gap_closed_vs_uniform_pct"] = 100 * (uni - row["perplexity"]) / (uni - results["original_perplexity"])
    (args.out / "rope_allocation.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| allocation (96 values per layer on average) | calibration KL | held-out perplexity | gap closed vs uniform |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {r['calibration_kl']:.3f} | {r['perplexity']:.2f} | {r['gap_closed_vs_uniform_pct']:.1f}% |"
              for name, r in results["allocations"].items()]
    (args.out / "rope_allocation.md").write_text(f"original: {results['original_perplexity']:.2f}\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

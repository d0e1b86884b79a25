"""Does a better per-layer allocation still matter after recovery? (issue 13's second question)

SmolLM2-135M-Instruct at 192 (or 96) cached values per token per layer (rope_dim 32 and d_kv 32, or
16 and 16; 2-norm partial RoPE, activation-aware joint SVD, default-corpus calibration, exact layout,
float32), converted twice — uniform layers and ``--allocate measured`` (same total; with
``--rope-choices`` the rotary dims per layer too) — and each recovered with the same layer-wise
distillation budget (``mha2mla finetune --stage local``). Held-out perplexity (the default corpus's
Wikipedia split) of the original, each conversion and each recovered model come from ``finetune``'s
own before/after evaluation.

Usage: python -m benchmarks.studies.allocation_after_recovery OUT_DIR [--values 192|96] [--rope-choices 8,16,24,32]
       [--local-steps N] [--local-seconds S (0: no time cap, results independent of machine load)]
       [--sensitivity-tokens N]
Results: benchmarks/README.md lists the folders this script wrote.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from conversion import ConvertOptions, convert
from conversion.default_model import ensure_default_model
from conversion.recovery.finetune import FinetuneOptions, finetune
from conversion.recovery.local import LocalOptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--values", type=int, choices=(192, 96), default=192,
                    help="cached values per token per layer: rope_dim = d_kv = values / 6 (3 kv-heads)")
    ap.add_argument("--rope-choices", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--local-steps", type=int, default=40)
    ap.add_argument("--local-seconds", type=float, default=150.0)
    ap.add_argument("--sensitivity-tokens", type=int, default=1024)
    ap.add_argument("--held-out-tokens", type=int, default=16384)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    src = ensure_default_model()
    per_head = args.values // 6
    base = dict(rope_dim=per_head, d_kv=per_head, strategy="2-norm", svd="aw-joint", layout="exact", dtype="float32")
    measured = {"allocate": "measured", "sensitivity_tokens": args.sensitivity_tokens,
                "rope_choices": args.rope_choices}
    results: dict = {"command": "python -m benchmarks.studies.allocation_after_recovery " + " ".join(sys.argv[1:]),
                     "cache_values_per_layer": args.values, "allocations": {}}
    for name, extra in (("uniform", {}), ("measured", measured)):
        converted, recovered = args.out / f"{name}-mla", args.out / f"{name}-recovered"
        t0 = time.perf_counter()
        report = convert(src, converted, ConvertOptions(**base, **extra, overwrite=True))
        convert_s = time.perf_counter() - t0
        rec = finetune(converted, recovered, FinetuneOptions(
            teacher=src, stage="local", seq_len=512, held_out_tokens=args.held_out_tokens, overwrite=True,
            local=LocalOptions(steps_per_layer=args.local_steps, time_budget_s=args.local_seconds or None)))
        row = {"convert_seconds": convert_s, "perplexity": rec["perplexity"],
               "layer_latent": report["layer_latent"] or [report["layout"]["latent_dim"]] * 30,
               "layer_rope": report["layer_rope"], "allocation": report.get("allocation")}
        results["allocations"][name] = row
        print(name, json.dumps(row["perplexity"]), flush=True)
        (args.out / "after_recovery.json").write_text(json.dumps(results, indent=2) + "\n")
    keys = list(next(iter(results["allocations"].values()))["perplexity"])
    lines = ["| allocation | " + " | ".join(k.replace("_", " ") for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, row in results["allocations"].items():
        p = row["perplexity"]
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in p.values()) + " |")
    (args.out / "after_recovery.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""What does a low-bit latent cache cost in quality, and which format? (issue 33, the format before the kernels)

SmolLM2-135M-Instruct converted at 192 (or 96) cached values per token per layer (2-norm partial RoPE,
activation-aware joint SVD, exact layout, float32), recovered with the layer-wise stage on the CPU
(``--local-seconds``; 0 skips it), then scored by the PyTorch reference model with each cache format applied to
every row it attends over (``conversion.reference_model.set_cache_quant``: what a decode step reads). Per format:
held-out perplexity (the default corpus's Wikipedia split), the mean KL divergence from the same model with an
unquantised cache, the share of positions whose top token is unchanged, and the row's bytes — of this model's
row and of the paper's headline row (Llama-2-7B at d_kv 64: 2,048 latent + 512 rotary values) — against
bfloat16.

Formats (``conversion/mla_format/cache_quant.py``): int8 and int4 codes in groups of G columns with a float16
scale and minimum each; ``row`` = one group a segment (closest to vLLM's ``int4_per_token_head``, which also
rotates); ``+H`` = the latent Hadamard-rotated first (free at conversion time); ``rope +H`` = the rotary keys
Hadamard-mixed (the queries' rotary part mixed alike at run time); ``rope bf16`` / ``rope int8`` = the rotary
columns kept in bfloat16 / stored in 8 bits.

Usage: python -m benchmarks.studies.cache_quant_quality OUT_DIR [--values 192|96] [--local-seconds S]
       [--held-out-tokens N] [--seq-len L]
Results: benchmarks/README.md lists the folders this script wrote.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.common import held_out_windows, study_setup
from conversion import ConvertOptions, convert
from conversion.mla_format.cache_quant import CacheQuant

PAPER_ROW = (2048, 512)
"""Llama-2-7B at d_kv 64, rope_dim 16: the latent and rotary values of the paper's best-quality row."""


def formats(width: int) -> dict[str, CacheQuant | None]:
    """The formats compared; ``width`` (the latent's columns) makes ``row`` one group a segment."""
    return {
        "bf16 (none)": None,
        "int8 g64": CacheQuant(8, 8, 64),
        "int4 row": CacheQuant(4, 4, max(width, 2)),
        "int4 g128": CacheQuant(4, 4, 128),
        "int4 g64": CacheQuant(4, 4, 64),
        "int4 g32": CacheQuant(4, 4, 32),
        "int4 g64 +H": CacheQuant(4, 4, 64, hadamard=True),
        "int4 g32 +H": CacheQuant(4, 4, 32, hadamard=True),
        "int4 g64, rope bf16": CacheQuant(4, None, 64),
        "int4 g64 +H, rope bf16": CacheQuant(4, None, 64, hadamard=True),
        "int4 g64 +H, rope int8": CacheQuant(4, 8, 64, hadamard=True),
        "int4 g64, rope int8": CacheQuant(4, 8, 64),
        "int4 g64, rope +H": CacheQuant(4, 4, 64, rope_hadamard=True),
        "int4 g32, rope +H": CacheQuant(4, 4, 32, rope_hadamard=True),
    }


def compare(model, windows: torch.Tensor, reference_logprobs: list[torch.Tensor]) -> dict:
    """Perplexity, mean KL(reference ‖ model) and top-1 agreement over ``windows`` (8 a batch)."""
    nll = kl = same = count = 0.0
    for batch, ref in zip(windows.split(8), reference_logprobs):
        logprobs = model(batch).logits[:, :-1].float().log_softmax(-1)
        nll -= logprobs.gather(-1, batch[:, 1:, None]).sum().item()
        kl += (ref.exp() * (ref - logprobs)).sum().item()
        same += (logprobs.argmax(-1) == ref.argmax(-1)).sum().item()
        count += batch[:, 1:].numel()
    return {"perplexity": float(torch.tensor(nll / count).exp()), "kl": kl / count, "top1_same_pct": 100 * same / count}


def main() -> None:
    from conversion.recovery.finetune import FinetuneOptions, finetune
    from conversion.recovery.local import LocalOptions
    from conversion.reference_model import load_reference, set_cache_quant

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--values", type=int, choices=(192, 96), default=192,
                    help="cached values per token per layer: rope_dim = d_kv = values / 6 (3 kv-heads)")
    ap.add_argument("--local-seconds", type=float, default=150.0, help="layer-wise recovery budget (0: none)")
    ap.add_argument("--held-out-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--formats", help="semicolon-separated names of the formats to score (default: all); bf16 always")
    args = ap.parse_args()
    src, tokenizer = study_setup(args.out)
    per_head = args.values // 6
    started = time.perf_counter()
    model_dir = args.out / "mla"
    if not (model_dir / "config.json").is_file():
        convert(src, model_dir, ConvertOptions(rope_dim=per_head, d_kv=per_head, strategy="2-norm", svd="aw-joint",
                                               layout="exact", dtype="float32", overwrite=True))
    if args.local_seconds > 0:
        recovered = args.out / "mla-local"
        if not (recovered / "config.json").is_file():
            finetune(model_dir, recovered, FinetuneOptions(
                teacher=src, stage="local", seq_len=512, held_out_tokens=4096, overwrite=True,
                local=LocalOptions(steps_per_layer=40, time_budget_s=args.local_seconds)))
        model_dir = recovered
    model = load_reference(model_dir)
    lay = model.model.layers[0].self_attn.layout
    latent, rope = lay.latent_width, lay.num_kv_heads * lay.rope_dim
    windows = held_out_windows(tokenizer, args.held_out_tokens, args.seq_len)
    with torch.no_grad():
        reference = [model(b).logits[:, :-1].float().log_softmax(-1) for b in windows.split(8)]
        rows = {}
        chosen = {n: f for n, f in formats(latent).items()
                  if f is None or not args.formats or n in args.formats.split(";")}
        if args.formats and len(chosen) < len(args.formats.split(";")) + 1:
            raise SystemExit(f"unknown format in --formats; the formats: {', '.join(formats(latent))}")
        for name, fmt in tqdm(chosen.items(), desc="cache formats"):
            set_cache_quant(model, fmt)
            row = compare(model, windows, reference)
            bytes_model = fmt.row_bytes(latent, rope) if fmt else 2 * (latent + rope)
            # "row" stays one group a segment on the paper's row too
            paper_fmt = replace(fmt, group=max(PAPER_ROW)) if fmt and fmt.group == max(latent, 2) else fmt
            bytes_paper = paper_fmt.row_bytes(*PAPER_ROW) if paper_fmt else 2 * sum(PAPER_ROW)
            row.update(bytes=bytes_model, bf16_over_bytes=2 * (latent + rope) / bytes_model,
                       paper_row_bf16_over_bytes=2 * sum(PAPER_ROW) / bytes_paper, format=fmt and vars(fmt))
            rows[name] = row
            tqdm.write(f"{name}: {json.dumps({k: v for k, v in row.items() if k != 'format'})}")
    set_cache_quant(model, None)
    base = rows["bf16 (none)"]["perplexity"]
    result = {"command": "python -m benchmarks.studies.cache_quant_quality " + " ".join(sys.argv[1:]),
              "model": str(model_dir), "latent_columns": latent, "rope_columns": rope,
              "held_out_tokens": int(windows.numel()), "seconds": time.perf_counter() - started, "formats": rows}
    (args.out / "cache_quant_quality.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"| format | perplexity (× bf16) | KL to bf16 cache | top-1 same | row bytes ({latent}+{rope} values) | "
             "bf16 ÷ bytes | paper row: bf16 ÷ bytes |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['perplexity']:.3f} ({r['perplexity'] / base:.4f}) | {r['kl']:.5f} | "
                     f"{r['top1_same_pct']:.2f}% | {r['bytes']} | {r['bf16_over_bytes']:.2f} | "
                     f"{r['paper_row_bf16_over_bytes']:.2f} |")
    (args.out / "cache_quant_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

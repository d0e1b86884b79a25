"""``mha2mla`` command line: ``convert`` (and ``demo``, the end-to-end comparison in vLLM)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from conversion.errors import ConversionError


def _add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", type=Path, help="local Hugging Face folder (Llama, Mistral or Qwen2)")
    p.add_argument("dst", type=Path, help="output folder (written atomically)")
    p.add_argument("--rope-dim", type=int, required=True, help="rotary dims kept per head (even)")
    p.add_argument("--strategy", default="2-norm", choices=["high", "low", "uniform", "2-norm"])
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--d-kv", type=int, help="latent dims per kv-head")
    budget.add_argument("--kv-budget", type=int, choices=[576, 512, 320],
                        help="cached values per token per layer (a vLLM-native MLA size)")
    p.add_argument("--svd", default="joint", choices=["joint", "split", "aw-joint"])
    p.add_argument("--layout", default="auto", choices=["auto", "native", "exact"],
                   help="vLLM cache layout: native 576-value rows (zero-padded), exact sizes (the plugin's own "
                        "backend), or auto (native when it fits)")
    p.add_argument("--calib-text", type=Path, help="text file for 2-norm / aw-joint statistics")
    p.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens (default 16384)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="output dtype (default: source's)")
    p.add_argument("--uniform-offset", type=int, default=0, help="first pair for --strategy uniform")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def print_report(report: dict) -> None:
    """Summary tables of a conversion report (layout, KV cache, reconstruction errors)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    lay = report["layout"]
    console.print(
        f"[bold]MLA layout[/]: kv_lora_rank={lay['kv_lora_rank']} qk_rope={lay['qk_rope_head_dim']} "
        f"qk_nope={lay['qk_nope_head_dim']} v={lay['v_head_dim']} (rope_dim={lay['rope_dim']}, "
        f"d_kv={lay['d_kv']}); vLLM-native shape: {report['native_vllm_shape']}"
    )
    table = Table(title="KV cache per token per layer")
    for col in ("what", "values", "dtype", "bytes", "reduction"):
        table.add_column(col, justify="right" if col != "what" else "left")
    for row in report["kv_cache"]["rows"]:
        table.add_row(row["what"], str(row["values"]), row["dtype"], f"{row['bytes_per_token_per_layer']:g}",
                      f"{row['reduction_pct']:.1f}%")
    console.print(table)
    errors = report["layer_errors"]
    if errors:
        table = Table(title="relative reconstruction error (mean / max over layers)")
        table.add_column("quantity")
        table.add_column("mean", justify="right")
        table.add_column("max", justify="right")
        for key in [k for k in errors[0] if k != "layer"]:
            vals = [e[key] for e in errors]
            table.add_row(key, f"{sum(vals) / len(vals):.4f}", f"{max(vals):.4f}")
        console.print(table)
    for note in report["notes"]:
        console.print(f"[yellow]note[/]: {note}")
    console.print(f"wrote {report['destination']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mha2mla", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert_args(sub.add_parser("convert", help="convert a Llama-family checkpoint to MLA"))
    demo = sub.add_parser("demo", help="convert a real model and compare it with the original in vLLM")
    from vllm_mha2mla.demo import add_arguments

    add_arguments(demo)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from vllm_mha2mla.demo import main_from_args

        return main_from_args(args)
    try:
        if args.command == "convert":
            from conversion.convert import ConvertOptions, convert

            report = convert(
                args.src,
                args.dst,
                ConvertOptions(
                    rope_dim=args.rope_dim,
                    strategy=args.strategy,
                    d_kv=args.d_kv,
                    kv_budget=args.kv_budget,
                    svd=args.svd,
                    calib_text=args.calib_text,
                    calib_tokens=args.calib_tokens,
                    dtype=args.dtype,
                    uniform_offset=args.uniform_offset,
                    overwrite=args.overwrite,
                    layout=args.layout,
                ),
            )
            print_report(report)
    except ConversionError as exc:
        print(f"mha2mla: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

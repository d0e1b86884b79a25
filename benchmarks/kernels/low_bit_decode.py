"""Decode per step over a low-bit latent cache against bf16 and fp8, at equal batch and context (issue 33's
second target: fp8 ≤ 0.65× and int4 ≤ 0.5× of the bf16 row's time), the kernels alone on one GPU.

For each row shape (32 heads, Llama-2-7B's: 576 = 512 + 64 native, the paper's 1,024 = 512 + 512, 1,536 =
1,024 + 512 and 2,560 = 2,048 + 512) at one batch and context: the plugin's Triton kernel over a bf16 cache (its
own plan), over an fp8 cache (per-tensor scale), and the low-bit kernel
(``vllm_mha2mla/attention/triton_low_bit_decode.py``) over rows of each format in ``FORMATS``. Timed with
``triton.testing.do_bench`` (median ms); the bytes each reads per step (the rows of every cached token, scales and
minima included), the bandwidth that is, and the time against bf16 in the same run. Before timing, each low-bit
kernel's output is checked against the PyTorch decode of the same bytes on the first requests (max |Δ| recorded).

No vLLM needed: torch and Triton. Results are written after every shape (a call cut off keeps what it measured).

Usage (GPU): python -m benchmarks.kernels.low_bit_decode OUT.json [--batch 64] [--context 8192]
                                                           [--shapes 2560,576,1024,1536] [--formats int4-rope8,...]
Results: benchmarks/README.md lists the folders this script wrote.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import DECODE_SCALE, paged_inputs
from conversion.mla_format.cache_quant import CacheQuant
from conversion.mla_format.cache_rows import RowLayout, encode_rows
from vllm_mha2mla.attention.quantized_cache import paged_decode
from vllm_mha2mla.attention.triton_decode import mla_paged_decode
from vllm_mha2mla.attention.triton_low_bit_decode import low_bit_paged_decode

SHAPES = {"576": (512, 64), "1024": (512, 512), "1536": (1024, 512), "2560": (2048, 512)}
"""Row name → (latent, rope) at 32 heads."""
FORMATS = {
    "int4-rope8": CacheQuant(4, 8, 64),  # the format the CPU engine serves as int4_per_token_head
    "int4-rope-bf16": CacheQuant(4, None, 64),
    "int4": CacheQuant(4, 4, 64),
}
CHECK_REQUESTS = 4
ENCODE_CHUNK = 1 << 16


def low_bit_pages(cache: torch.Tensor, layout: RowLayout) -> torch.Tensor:
    """A bf16 paged cache's rows encoded as ``layout`` bytes, page for page (chunked: the encoder's float32
    intermediates of 500K rows × 2,560 values would take 5 GB at once)."""
    pages, page, width = cache.shape
    out = torch.empty(pages, page, layout.row_bytes, dtype=torch.uint8, device=cache.device)
    src, dst = cache.view(-1, width), out.view(-1, layout.row_bytes)
    for start in range(0, src.shape[0], ENCODE_CHUNK):
        rows = src[start:start + ENCODE_CHUNK].float()
        dst[start:start + ENCODE_CHUNK] = encode_rows(rows[:, :layout.latent], rows[:, layout.latent:], layout)
    return out


def timed(fn) -> float:
    """Median milliseconds of ``fn`` (CUDA events, L2 flushed between runs by do_bench)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))


def measure_shape(name: str, latent: int, rope: int, batch: int, context: int, formats: dict) -> dict:
    """One row shape: bf16, fp8 and every low-bit format, each timed and its bytes counted."""
    q, cache, table, lens = paged_inputs(latent, rope, 32, batch, context)
    tokens = int(lens.sum())
    width = latent + rope
    rows: dict[str, dict] = {}

    def record(kind: str, fn, row_bytes: int, extra: dict | None = None) -> None:
        ms = timed(fn)
        rows[kind] = {"ms": ms, "row_bytes": row_bytes, "gb_read": tokens * row_bytes / 1e9,
                      "tb_per_s": tokens * row_bytes / ms / 1e9, **(extra or {})}
        print(f"{name} {kind}: {ms:.3f} ms, {row_bytes} B/row, {rows[kind]['tb_per_s']:.2f} TB/s", flush=True)

    record("bf16", lambda: mla_paged_decode(q, cache, table, lens, DECODE_SCALE, latent, context), 2 * width)
    k_scale = (cache.abs().amax().float() / 448.0).reshape(1)
    fp8 = (cache.float() / k_scale).to(torch.float8_e4m3fn)
    record("fp8", lambda: mla_paged_decode(q, fp8, table, lens, DECODE_SCALE, latent, context, k_scale=k_scale),
           width)
    del fp8
    for kind, fmt in formats.items():
        layout = RowLayout(fmt, latent, rope)
        pages = low_bit_pages(cache, layout)
        got, _ = low_bit_paged_decode(q[:CHECK_REQUESTS], pages, table[:CHECK_REQUESTS], lens[:CHECK_REQUESTS],
                                      DECODE_SCALE, layout, context)
        want = paged_decode(q[:CHECK_REQUESTS].float(), pages, table[:CHECK_REQUESTS], lens[:CHECK_REQUESTS],
                            DECODE_SCALE, layout)
        error = float((got.float() - want).abs().max())
        record(kind, lambda: low_bit_paged_decode(q, pages, table, lens, DECODE_SCALE, layout, context),
               layout.row_bytes, {"max_abs_error_vs_torch": error})
        del pages
    for row in rows.values():
        row["time_vs_bf16"] = row["ms"] / rows["bf16"]["ms"]
    return {"latent": latent, "rope": rope, "batch": batch, "context": context, "tokens": tokens, "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--shapes", default="2560,576,1024,1536", help=f"comma-separated names of {list(SHAPES)}")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated names of {list(FORMATS)}")
    args = parser.parse_args(argv)
    shapes = args.shapes.split(",")
    formats = {k: FORMATS[k] for k in args.formats.split(",")}
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shapes {unknown}: choose from {list(SHAPES)}")
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "heads": 32,
               "formats": {k: vars(v) for k, v in formats.items()}, "shapes": {}}
    import triton

    results["triton"] = triton.__version__
    for name in shapes:
        start = time.time()
        results["shapes"][name] = measure_shape(name, *SHAPES[name], args.batch, args.context, formats)
        results["shapes"][name]["seconds"] = time.time() - start
        args.out.write_text(json.dumps(results, indent=1))
    print(table(results))
    return results


def table(results: dict) -> str:
    """Markdown: per shape and cache, ms per step, bytes per row, TB/s, time against bf16."""
    lines = ["| row | cache | ms/step | bytes/row | TB/s | × bf16 time |", "|---|---|---|---|---|---|"]
    for name, shape in results["shapes"].items():
        for kind, row in shape["rows"].items():
            lines.append(f"| {name} | {kind} | {row['ms']:.3f} | {row['row_bytes']} | {row['tb_per_s']:.2f} | "
                         f"{row['time_vs_bf16']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

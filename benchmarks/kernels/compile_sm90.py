"""What Triton makes of a decode launch for an H100, on a machine without a GPU.

Compiles the plugin's split decode kernel, or its balanced one (``vllm_mha2mla/attention/triton_decode.py``), for sm_90 with the same
compile-time arguments and the same 16-divisibility of pointers and strides that a real launch
specializes on, then reports per launch: shared memory, registers and spilled bytes (ptxas), which
matrix instruction Triton chose (``mma.sync`` = MMA v2; Hopper's ``wgmma`` = v3, needing M ≥ 64), and
how many loads its software pipeliner turned into asynchronous copies (0: every tile waits for its
load). Why: GPU time is scarce, and whether a tile fits shared memory, spills or is pipelined can be
read here first. It guides; the GPU measures speed.

``--against`` recompiles every launch whose shared memory an H100 run recorded (an fp8-tiles record) and
sets the two side by side, to check that a compile here predicts the GPU's (any Triton on the path: a
wheel of the GPU's version unpacked onto ``PYTHONPATH`` compiles as the GPU's does).

Usage: python -m benchmarks.kernels.compile_sm90 LATENT ROPE [--heads 32] [--batch 64] [--context 8704] [--fp8]
                                                 [--tile H,N,WARPS,STAGES ...] [--programs P]
         (no --tile: the launch plan_launch picks for an H100; each --tile replaces its tile sizes)
         (--low-bit BITS,ROPE_BITS,GROUP: the low-bit cache kernel over rows of that format, e.g. 4,8,64)
         (--low-bit ... --write: the low-bit cache write kernel instead, with the division and rounding
          instructions it compiled to)
         (--programs P: the balanced kernel, P programs per head group sharing the batch's tokens)
         (--two-pass: the two-pass decode's scores and values kernels, as plan_two_pass plans them;
          --two-pass-tiles SH,SN,SK,SW,M,VS,VH,VN,VW replaces the scores' heads, rows, column chunk, warps,
          rows-as-M (0/1) and the values' slice, heads, rows, warps; repeatable)
       python -m benchmarks.kernels.compile_sm90 --against DEVICE_FP8_TILES.json [--json-out OUT.json]
         (a record of the former ``gpu_layer_widths.py fp8-tiles`` mode: batch 16, context 1024, fp8, 32 heads)
Results: benchmarks/README.md lists the folders this script wrote or checked.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vllm_mha2mla.attention import triton_decode
from conversion.mla_format.cache_quant import CacheQuant
from conversion.mla_format.cache_rows import RowLayout
from vllm_mha2mla.attention.triton_decode import DecodeLaunch, plan_launch, split_kernel_constants
from vllm_mha2mla.attention.triton_low_bit_decode import (_low_bit_decode_split_kernel, plan_low_bit_launch,
                                                          low_bit_decode_constants)
from vllm_mha2mla.attention.triton_low_bit_write import _low_bit_write_kernel, write_constants
from vllm_mha2mla.attention.triton_two_pass_decode import (TwoPassLaunch, _mla_scores_kernel, _mla_values_kernel,
                                                           plan_two_pass, score_kernel_constants,
                                                           value_kernel_constants)

H100_SMS = 132
PAGE = 16  # vLLM's block size for the plugin's backend


def _cache_arguments(latent: int, rope: int, heads: int, context: int, fp8: bool) -> dict:
    """The run-time arguments both decode kernels open with, as (Triton type, value): a contiguous query
    ``[batch, heads, width]``, a cache ``[pages, PAGE, width]``, its block table and the lengths; values
    decide which integers Triton specializes as divisible by 16."""
    width = latent + rope
    return {
        "Q": ("*bf16", None), "stride_qb": ("i32", heads * width), "stride_qh": ("i32", width),
        "KV": ("*fp8e4nv" if fp8 else "*bf16", None), "stride_kv_page": ("i32", PAGE * width),
        "stride_kv_tok": ("i32", width), "BlockTable": ("*i32", None), "stride_bt": ("i32", -(-context // PAGE)),
        "SeqLens": ("*i32", None),
    }


def _scale_arguments(heads: int, fp8: bool) -> dict:
    return {"KScale": ("*fp32" if fp8 else "*i32", None), "sm_scale": ("fp32", None), "num_heads": ("i32", heads)}


def _runtime_arguments(latent: int, rope: int, heads: int, context: int, splits: int, fp8: bool) -> dict:
    """The split kernel's run-time arguments: :func:`_cache_arguments`, the float32 partials
    ``[batch, heads, splits, latent + 1]``, the scales and the split count."""
    return {
        **_cache_arguments(latent, rope, heads, context, fp8), "Partial": ("*fp32", None),
        "stride_pb": ("i32", heads * splits * (latent + 1)), "stride_ph": ("i32", splits * (latent + 1)),
        "stride_ps": ("i32", latent + 1), **_scale_arguments(heads, fp8), "num_splits": ("i32", splits),
    }


def _balanced_runtime_arguments(latent: int, rope: int, heads: int, batch: int, context: int, programs: int,
                                fp8: bool) -> dict:
    """The balanced kernel's run-time arguments: :func:`_cache_arguments`, the lengths' running sum,
    the output ``[batch, heads, latent]`` and its lse, the float32 pieces ``[programs, 2, heads, latent]``
    and theirs, the scales, the program count and the smallest chunk."""
    return {
        **_cache_arguments(latent, rope, heads, context, fp8), "CuLens": ("*i32", None), "batch": ("i32", batch),
        "Out": ("*bf16", None), "stride_ob": ("i32", heads * latent), "stride_oh": ("i32", latent),
        "Lse": ("*fp32", None), "stride_lb": ("i32", heads),
        "Partial": ("*fp32", None), "stride_pp": ("i32", 2 * heads * latent), "stride_ps": ("i32", heads * latent),
        "stride_ph": ("i32", latent), "PartLse": ("*fp32", None), "stride_lp": ("i32", 2 * heads),
        "stride_ls": ("i32", heads), **_scale_arguments(heads, fp8), "num_programs": ("i32", programs),
        "min_chunk": ("i32", None),
    }


def _ptxas_report(ptx: str) -> dict:
    """Registers and spill stores of the compiled PTX from the CUDA 12 ptxas that ships with Triton.

    Triton 3.9 declares PTX 9.4, which that ptxas refuses by version only; the PTX is given to it
    with the version it names as its own (the kernel uses no newer instruction). The newer
    ``ptxas-blackwell`` beside it accepts 9.4 but gave some of these kernels 32 registers and
    kilobytes of spills that the GPU's runs do not show (448 + 64 values: 32 registers, 7,232 spilled
    bytes, against 255 and 104 from CUDA 12's), so it is only the fallback."""
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas", "ptxas-blackwell"):
        tool = bin_dir / name
        if not tool.is_file():
            continue
        text = ptx
        for _ in range(2):  # once as written, once at the version this ptxas names
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                f.write(text)
            try:
                done = subprocess.run([str(tool), "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                                      capture_output=True, text=True)
            finally:
                os.unlink(f.name)
            if done.returncode == 0:
                regs = re.search(r"Used (\d+) registers", done.stderr)
                spills = re.search(r"(\d+) bytes spill stores", done.stderr)
                return {"registers": int(regs[1]) if regs else None,
                        "spill_store_bytes": int(spills[1]) if spills else None, "ptxas": name}
            own = re.search(r"Unsupported \.version [\d.]+; current version is '([\d.]+)'", done.stderr)
            if not own:
                break
            text = re.sub(r"^\.version [\d.]+", f".version {own[1]}", ptx, count=1, flags=re.M)
    return {"registers": None, "spill_store_bytes": None, "ptxas": "none accepted the PTX"}


def compile_launch(plan: DecodeLaunch, latent: int, rope: int, heads: int, context: int, fp8: bool,
                   batch: int = 64) -> dict:
    """Compile one launch for sm_90 and read what Triton made of it (the balanced kernel where the
    launch has ``num_programs``)."""
    constants = split_kernel_constants(plan, latent, rope, PAGE, scaled_cache=fp8, fp8_cache=fp8)
    if plan.num_programs:
        runtime = _balanced_runtime_arguments(latent, rope, heads, batch, context, plan.num_programs, fp8)
        constants["BLOCK_B"] = triton_decode.batch_block(batch)
        kernel_fn = triton_decode._mla_decode_balanced_kernel
    else:
        runtime = _runtime_arguments(latent, rope, heads, context, plan.num_splits, fp8)
        kernel_fn = triton_decode._mla_decode_split_kernel
    return _compile(kernel_fn, runtime, constants, plan.num_warps, plan.num_stages)


def compile_two_pass(plan: TwoPassLaunch, latent: int, rope: int, heads: int, context: int, fp8: bool) -> list[dict]:
    """Compile the two-pass decode's kernels (``triton_two_pass_decode``) for one plan: the scores kernel
    over whole rows and the values kernel over a latent slice, each with its own tiles."""
    splits, tiles = plan.num_splits, plan.score_tiles(context)
    scratch = {
        "Probs": ("*fp16" if fp8 else "*bf16", None), "stride_pb": ("i32", heads * context),
        "stride_ph": ("i32", context), "TileMax": ("*fp32", None), "stride_tb": ("i32", heads * tiles),
        "stride_th": ("i32", tiles), "Stats": ("*fp32", None), "stride_sb": ("i32", heads * splits * 2),
        "stride_sh": ("i32", splits * 2), "stride_ss": ("i32", 2),
    }
    cache = _cache_arguments(latent, rope, heads, context, fp8)
    scores_runtime = {**cache, **scratch, **_scale_arguments(heads, fp8), "num_splits": ("i32", splits)}
    values_runtime = {
        **{k: v for k, v in cache.items() if k not in ("Q", "stride_qb", "stride_qh")}, **scratch,
        "Partial": ("*fp32", None), "stride_xb": ("i32", heads * splits * (latent + 1)),
        "stride_xh": ("i32", splits * (latent + 1)), "stride_xs": ("i32", latent + 1),
        "KScale": ("*fp32" if fp8 else "*i32", None), "num_heads": ("i32", heads), "num_splits": ("i32", splits),
        "num_head_groups": ("i32", -(-heads // plan.value_heads)),
    }
    scores = _compile(_mla_scores_kernel, scores_runtime,
                      score_kernel_constants(plan, latent + rope, PAGE, scaled_cache=fp8, fp8_cache=fp8),
                      plan.score_warps, plan.num_stages)
    values = _compile(_mla_values_kernel, values_runtime, value_kernel_constants(plan, latent, PAGE, scaled_cache=fp8),
                      plan.value_warps, plan.num_stages)
    return [{"kernel": "scores", "block_h": plan.score_heads, "block_n": plan.score_rows,
             "num_warps": plan.score_warps, "chunk": plan.score_chunk, "rows_as_m": plan.scores_rows_as_m,
             **scores},
            {"kernel": "values", "block_h": plan.value_heads, "block_n": plan.value_rows,
             "num_warps": plan.value_warps, "slice": plan.value_slice, **values}]


def compile_low_bit_launch(plan: DecodeLaunch, layout: RowLayout, heads: int, context: int) -> dict:
    """Compile the low-bit kernel (``triton_low_bit_decode``) for one launch over ``layout``'s rows."""
    constants = low_bit_decode_constants(plan, layout, PAGE)
    width, row = layout.latent + layout.rope, layout.row_bytes
    runtime = {
        "Q": ("*bf16", None), "stride_qb": ("i32", heads * width), "stride_qh": ("i32", width),
        "KVBytes": ("*u8", None), "KVHalf": ("*fp16", None), "KVRaw": ("*bf16", None),
        "stride_kv_page": ("i32", PAGE * row), "stride_kv_tok": ("i32", row),
        "BlockTable": ("*i32", None), "stride_bt": ("i32", -(-context // PAGE)), "SeqLens": ("*i32", None),
        "Partial": ("*fp32", None), "stride_pb": ("i32", heads * plan.num_splits * (layout.latent + 1)),
        "stride_ph": ("i32", plan.num_splits * (layout.latent + 1)), "stride_ps": ("i32", layout.latent + 1),
        "sm_scale": ("fp32", None), "num_heads": ("i32", heads), "num_splits": ("i32", plan.num_splits),
    }
    return _compile(_low_bit_decode_split_kernel, runtime, constants, plan.num_warps, plan.num_stages)


def compile_low_bit_write(layout: RowLayout) -> dict:
    """Compile the low-bit cache write (``triton_low_bit_write``) over ``layout``'s rows from bf16 ``[kv_c | k_pe]``
    with the launch options it runs with; reports its registers and which float32 divisions, float16 conversions
    and fused multiply-adds the PTX holds (its bytes equal the PyTorch write's only with correctly rounded
    divisions: ``div.rn``, no ``div.full`` / ``div.approx``)."""
    runtime = {"KVC": ("*bf16", None), "stride_c": ("i32", None), "KPE": ("*bf16", None), "stride_p": ("i32", None),
               "Slots": ("*i64", None), "CacheBytes": ("*u8", None), "CacheHalf": ("*fp16", None),
               "CacheRaw": ("*i16", None), "stride_page": ("i32", PAGE * layout.row_bytes),
               "stride_tok": ("i32", layout.row_bytes)}
    constants = write_constants(layout, PAGE, layout.latent)
    kinds = {name: kind for name, (kind, _) in runtime.items()} | {name: "constexpr" for name in constants}
    signature = {name: kinds[name] for name in _low_bit_write_kernel.arg_names}
    names = list(signature)
    aligned = [name for name, (kind, value) in runtime.items()
               if kind.startswith("*") or (value is not None and value % 16 == 0)]
    source = ASTSource(_low_bit_write_kernel, signature,
                       constexprs={(names.index(k),): v for k, v in constants.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": 1, "enable_fp_fusion": False})
    ptx = kernel.asm["ptx"]
    return {"shared_bytes": kernel.metadata.shared, "div_rn_f32": len(re.findall(r"div\.rn\.f32", ptx)),
            "div_inexact_f32": len(re.findall(r"div\.(?:full|approx)(?:\.ftz)?\.f32", ptx)),
            "cvt_rn_f16": len(re.findall(r"cvt\.rn\.f16\.f32", ptx)), "fma_f32": len(re.findall(r"fma\.\w+\.f32", ptx)),
            **_ptxas_report(ptx)}


def _compile(kernel_fn, runtime: dict, constants: dict, num_warps: int, num_stages: int) -> dict:
    """Compile ``kernel_fn`` for sm_90 with these run-time arguments (Triton type, value; in the kernel's
    order) and constants."""
    signature = {name: kind for name, (kind, _) in runtime.items()} | {name: "constexpr" for name in constants}
    names = list(signature)
    aligned = [name for name, (kind, value) in runtime.items()
               if kind.startswith("*") or (kind == "i32" and value is not None and value % 16 == 0)]
    source = ASTSource(kernel_fn, signature,
                       constexprs={(names.index(k),): v for k, v in constants.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    ttgir = kernel.asm["ttgir"]
    return {"shared_bytes": kernel.metadata.shared,
            "mma_versions": sorted({int(v) for v in re.findall(r"versionMajor = (\d)", ttgir)}),
            "async_copies": ttgir.count("async_copy_global_to_local"),
            **_ptxas_report(kernel.asm["ptx"])}


def against_device(record: Path) -> list[dict]:
    """Recompile every launch of an fp8-tiles record (``fp8_tiles.json`` of a GPU run) at its batch,
    context and recorded tiles, and set the shared memory compiled here beside the bytes the H100's
    Triton compiled or asked for."""
    cases = json.loads(record.read_text())["cases"]
    rows = []
    for case in cases:
        if not case.get("shared_bytes"):
            continue
        plan = plan_launch(16, 32, case["latent"], case["rope"], 1024, H100_SMS, 1 << 30, fp8_cache=True)
        launch = replace(plan, latent_blocks=tuple(case["latent_blocks"]), block_r=case["block_r"],
                         block_h=case["block_h"], block_n=case["block_n"], num_warps=case["num_warps"],
                         num_stages=case["num_stages"])  # as recorded: the plan rules have changed since
        here = compile_launch(launch, case["latent"], case["rope"], 32, 1024, fp8=True)
        rows.append({**{k: case[k] for k in ("latent", "rope", "latent_blocks", "block_r", "block_h", "block_n",
                                             "num_stages", "num_warps")},
                     "device_shared_bytes": case["shared_bytes"], "here_shared_bytes": here["shared_bytes"],
                     "triton_here": triton.__version__})
        print(f"{case['latent']} + {case['rope']} h{case['block_h']} n{case['block_n']} s{case['num_stages']}: "
              f"device {case['shared_bytes']} B, here {here['shared_bytes']} B", flush=True)
    equal = sum(r["device_shared_bytes"] == r["here_shared_bytes"] for r in rows)
    print(f"{equal} of {len(rows)} equal (Triton {triton.__version__} here)")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("latent", type=int, nargs="?")
    parser.add_argument("rope", type=int, nargs="?")
    parser.add_argument("--against", type=Path, metavar="FP8_TILES_JSON",
                        help="recompile the launches of an H100 fp8-tiles record and compare shared memory")
    parser.add_argument("--json-out", type=Path, help="also write the rows here")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=8704)
    parser.add_argument("--fp8", action="store_true", help="an e4m3 cache (float16 products)")
    parser.add_argument("--tile", action="append", default=[], metavar="H,N,WARPS,STAGES",
                        help="heads per program, cached rows per tile, warps, pipeline stages (repeatable)")
    parser.add_argument("--low-bit", metavar="BITS,ROPE_BITS,GROUP",
                        help="the low-bit cache kernel over rows of this format (ROPE_BITS 0: bf16 rotary keys), "
                             "e.g. 4,8,64")
    parser.add_argument("--write", action="store_true",
                        help="with --low-bit: compile the cache write kernel (one row shape, no launch plan)")
    parser.add_argument("--programs", type=int, default=0,
                        help="compile the balanced kernel with this many programs per head group (0: the plan's)")
    parser.add_argument("--two-pass", action="store_true",
                        help="compile the two-pass decode's scores and values kernels (plan_two_pass's plan)")
    parser.add_argument("--two-pass-tiles", action="append", default=[], metavar="SH,SN,SK,SW,M,VS,VH,VN,VW",
                        help="with --two-pass: other tiles for both kernels (repeatable)")
    args = parser.parse_args(argv)
    if args.two_pass:
        return two_pass_main(parser, args)
    if args.against is not None:
        rows = against_device(args.against)
        if args.json_out:
            args.json_out.write_text(json.dumps({"record": str(args.against), "rows": rows}, indent=1))
        return rows
    if args.latent is None or args.rope is None:
        parser.error("LATENT and ROPE are required (or --against)")
    layout = None
    if args.low_bit:
        bits, rope_bits, group = (int(x) for x in args.low_bit.split(","))
        layout = RowLayout(CacheQuant(bits, rope_bits or None, group), args.latent, args.rope)
        if args.write:
            rows = [{"latent": args.latent, "rope": args.rope, "format": args.low_bit, "row_bytes": layout.row_bytes,
                     "triton": triton.__version__, **compile_low_bit_write(layout)}]
            print(json.dumps(rows))
            if args.json_out:
                args.json_out.write_text(json.dumps(rows, indent=1))
            return rows
        plan = plan_low_bit_launch(args.batch, args.heads, layout, args.context, H100_SMS)
    elif args.write:
        parser.error("--write compiles the low-bit write kernel: give --low-bit BITS,ROPE_BITS,GROUP")
    else:
        plan = plan_launch(args.batch, args.heads, args.latent, args.rope, args.context, H100_SMS,
                           fp8_cache=args.fp8)
    if args.programs:
        plan = replace(plan, num_programs=args.programs)
    launches = [plan]
    for tile in args.tile:
        try:
            h, n, w, s = (int(x) for x in tile.split(","))
        except ValueError:
            parser.error(f"--tile {tile!r}: expected four integers H,N,WARPS,STAGES")
        launches.append(replace(plan, block_h=h, block_n=n, num_warps=w, num_stages=s))
    rows = []
    for launch in launches:
        row = {"latent_blocks": list(launch.latent_blocks), "block_r": launch.block_r, "block_h": launch.block_h,
               "block_n": launch.block_n, "num_warps": launch.num_warps, "num_stages": launch.num_stages,
               "num_programs": launch.num_programs, "is_plan": launch == plan, "triton": triton.__version__}
        if layout is not None:
            row.update(compile_low_bit_launch(launch, layout, args.heads, args.context), row_bytes=layout.row_bytes)
        else:
            row.update(compile_launch(launch, args.latent, args.rope, args.heads, args.context, args.fp8, args.batch))
        rows.append(row)
        print(f"{'plan ' if row['is_plan'] else 'tile '}h{launch.block_h} n{launch.block_n} w{launch.num_warps} "
              f"s{launch.num_stages} {list(launch.latent_blocks)}+{launch.block_r}: shared {row['shared_bytes']} B, "
              f"{row['registers']} registers, {row['spill_store_bytes']} B spilled, MMA v{row['mma_versions']}, "
              f"{row['async_copies']} async copies", flush=True)
    print(json.dumps(rows))
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1))
    return rows


def two_pass_main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[dict]:
    """``--two-pass``: the plan's kernels and those of each ``--two-pass-tiles``, one row per kernel."""
    if args.latent is None or args.rope is None:
        parser.error("LATENT and ROPE are required")
    plan = plan_two_pass(args.batch, args.heads, args.latent, args.rope, args.context, H100_SMS)
    launches = [plan]
    for tile in args.two_pass_tiles:
        try:
            sh, sn, sk, sw, m, vs, vh, vn, vw = (int(x) for x in tile.split(","))
        except ValueError:
            parser.error(f"--two-pass-tiles {tile!r}: expected nine integers SH,SN,SK,SW,M,VS,VH,VN,VW")
        launches.append(replace(plan, score_heads=sh, score_rows=sn, score_chunk=sk, score_warps=sw,
                                scores_rows_as_m=bool(m), value_slice=vs, value_heads=vh, value_rows=vn,
                                value_warps=vw))
    rows = []
    for launch in launches:
        for row in compile_two_pass(launch, args.latent, args.rope, args.heads, args.context, args.fp8):
            rows.append({**row, "is_plan": launch == plan, "triton": triton.__version__})
            print(f"{'plan' if launch == plan else 'tile'} {row['kernel']} h{row['block_h']} n{row['block_n']} "
                  f"w{row['num_warps']}: shared {row['shared_bytes']} B, {row['registers']} registers, "
                  f"{row['spill_store_bytes']} B spilled, MMA v{row['mma_versions']}, {row['async_copies']} async "
                  "copies", flush=True)
    print(json.dumps(rows))
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()

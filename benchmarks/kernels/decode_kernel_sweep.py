"""The plugin's Triton decode kernel alone, over its launch settings, at the batches and contexts the
engine runs decode at: which tile sizes, warps, pipeline depth and KV splits its launch plan
(``plan_launch``) should pick, because the kernel, not the engine, bounds the long-context rows.

No vLLM needed: the kernel alone on random pages, each variant checked against the default
plan's output, timed with ``triton.testing.do_bench`` (median), bandwidth = cached bytes read.

  (no mode)   SHAPES: tokens per tile × warps × pipeline depth × KV splits around the default plan.
  fp8         the decode phases of engines with an fp8 cache: the kernel with a bf16 cache as the
              yardstick, the fp8 kernel as it was (a copy of the module at ``$OLD_DECODE``, when
              given), and the fp8 kernel's plan and head groups × row tiles × warps × pipeline depth,
              each checked against float32 PyTorch.
  fp8-plan    the same without the tile variants.
  balanced    the balanced kernel (programs sharing the batch's tokens evenly, FlashMLA's scheduling)
              against the plan's fixed splits per request, over program counts (multiples of the SMs),
              tiles and warps, at the engine runs' decode batches; the spill-free 576 tile (32 heads ×
              16 rows) and split counts that are not powers of two beside them; vLLM's FlashMLA on the
              576-value rows when vLLM imports.
  crossover   the fixed splits against the balanced kernel (forced) over batch sizes: where the
              balanced kernel starts to pay.

Usage (GPU): python -m benchmarks.kernels.decode_kernel_sweep [fp8|fp8-plan|balanced|crossover] OUT.json
Results: benchmarks/README.md lists the folders this script wrote.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from benchmarks.common import DECODE_SCALE, PAGE, cli_args, decode_call, paged_inputs
from vllm_mha2mla.attention.paged_attention import paged_latent_decode
from vllm_mha2mla.attention.triton_decode import (SHARED_MEMORY_BUDGET, balanced_launch, mla_paged_decode,
                                                  plan_launch, shared_memory_bytes)

# (name, latent, rope, heads, batch, context): the engine runs' decode phases
SHAPES = [
    ("576_llama2_b310_8k", 512, 64, 32, 310, 8700),
    ("1024_llama2_b212_8k", 512, 512, 32, 212, 8700),
    ("512_llama3_cut75_b348_8k", 384, 128, 32, 348, 8700),
    ("576_llama2_b1024_1k", 512, 64, 32, 1024, 1280),  # the 1K/256 runs
    ("576_llama2_b32_8k", 512, 64, 32, 32, 8700),
    ("1024_llama2_b16_8k", 512, 512, 32, 16, 8192),
]


def main(out_file: Path) -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    results = {"device": torch.cuda.get_device_name(0), "sms": sms, "page": PAGE, "shapes": {}}
    for name, latent, rope, heads, batch, context in SHAPES:
        q, cache, table, lens = paged_inputs(latent, rope, heads, batch, context)
        gbytes = float(lens.sum()) * (latent + rope) * 2 / 1e9
        default = plan_launch(batch, heads, latent, rope, context, sms)
        want, _ = mla_paged_decode(q, cache, table, lens, 0.07, latent, context, launch=default)
        rows = []
        variants = [replace(default, block_n=n, num_warps=w, num_stages=s, num_splits=x)
                    for n, w, s, x in itertools.product((32, 64), (4, 8), (2,), (1, 2, 4, 8, 16, 32))]
        for launch in [default] + [v for v in variants if v != default]:
            block_n, stages = launch.block_n, launch.num_stages
            if shared_memory_bytes(launch.block_h, block_n, launch.block_c, launch.block_r) * (stages - 1) > \
                    SHARED_MEMORY_BUDGET:
                continue
            t0 = time.time()
            timed = _timed(lambda: mla_paged_decode(q, cache, table, lens, 0.07, latent, context, launch=launch)[0],
                           want.float(), key="max_abs_diff_vs_default")
            if "error" in timed:
                rows.append({**asdict(launch), **timed})
                continue
            rows.append({**asdict(launch), **timed, "tb_per_s": gbytes / timed["ms"], "is_default": launch == default,
                         "compile_and_time_s": time.time() - t0})
        ok = [r for r in rows if "ms" in r and r["max_abs_diff_vs_default"] < 2e-2]
        best = min(ok, key=lambda r: r["ms"])
        base = next(r for r in rows if r.get("is_default"))
        results["shapes"][name] = {"latent": latent, "rope": rope, "heads": heads, "batch": batch, "context": context,
                                   "gbytes_read": gbytes, "default": base, "best": best,
                                   "speedup_best_vs_default": base["ms"] / best["ms"], "variants": rows}
        print(f"{name}: default {base['ms']:.3f} ms ({base['tb_per_s']:.2f} TB/s) "
              f"[n{base['block_n']} w{base['num_warps']} s{base['num_stages']} x{base['num_splits']}]  best "
              f"{best['ms']:.3f} ms ({best['tb_per_s']:.2f} TB/s) [n{best['block_n']} w{best['num_warps']} "
              f"s{best['num_stages']} x{best['num_splits']}]", flush=True)
        out_file.write_text(json.dumps(results, indent=1))
        torch.cuda.empty_cache()


FP8_SHAPES = [
    ("1024_llama2_b166_8k", 512, 512, 32, 166, 8700),  # r16-d16: 166 running in the fp8 engine
    ("576_llama2_b310_8k", 512, 64, 32, 310, 8700),
    ("512_llama3_cut75_b348_8k", 384, 128, 32, 348, 8700),
    ("256_qwen_cut75_b458_8k", 192, 64, 28, 458, 8700),
]


def _timed(run, want, key: str = "max_abs_diff_vs_torch") -> dict:
    """One launch variant: its output's largest difference from ``want`` (float32 PyTorch on the
    first requests, or the default launch's output for all of them), under ``key``, and its median
    time; the error where it does not fit the GPU."""
    from triton.testing import do_bench

    try:
        out = run()
        err = float((out[: len(want)].float() - want).abs().max())
        return {key: err, "ms": do_bench(run, warmup=25, rep=100, return_mode="median")}
    except Exception as exc:  # out of shared memory / registers for this tile
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}


def _reference(q, cache, table, lens, latent, scale=1.0, requests=4):
    """float32 PyTorch decode of the first ``requests`` (scale 0.07), over their own pages only,
    each multiplied by ``scale`` (an fp8 cache's ``k_scale``)."""
    pages = table[:requests].flatten().long()
    own = torch.arange(pages.numel(), device=q.device, dtype=torch.int32).view(requests, -1)
    return paged_latent_decode(q[:requests].float(), cache[pages].float() * scale, own, lens[:requests], 0.07, latent)


def _old_decode():
    """The kernel module as it was before the change under test (``$OLD_DECODE``: a file path)."""
    path = os.environ.get("OLD_DECODE")
    if not path:
        return None
    spec = importlib.util.spec_from_file_location("old_triton_decode", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def fp8(out_file: Path, tiles: bool = True) -> None:
    """FP8_SHAPES: bf16, the old fp8 kernel, the fp8 plan and (``tiles``) the tile variants."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    old = _old_decode()
    results = {"device": torch.cuda.get_device_name(0), "sms": sms, "page": PAGE, "old_kernel": bool(old), "shapes": {}}
    for name, latent, rope, heads, batch, context in FP8_SHAPES:
        torch.cuda.empty_cache()
        q, cache, table, lens = paged_inputs(latent, rope, heads, batch, context)
        k_scale = (cache.abs().amax().float() / 448.0).reshape(1)  # vLLM's per-tensor scale, here from the data
        rows = (cache.float() / k_scale).to(torch.float8_e4m3fn)
        want, want_bf16 = _reference(q, rows, table, lens, latent, k_scale), _reference(q, cache, table, lens, latent)
        tokens = float(lens.sum())
        bf16_plan = plan_launch(batch, heads, latent, rope, context, sms)
        plan = plan_launch(batch, heads, latent, rope, context, sms, fp8_cache=True)
        shape = {"latent": latent, "rope": rope, "heads": heads, "batch": batch, "context": context,
                 "bf16_plan": asdict(bf16_plan), "fp8_plan": asdict(plan), "variants": []}
        shape["bf16"] = {**_timed(lambda: mla_paged_decode(q, cache, table, lens, 0.07, latent, context,
                                                           launch=bf16_plan)[0], want_bf16),
                         "gbytes": tokens * (latent + rope) * 2 / 1e9}
        if old is not None:
            old_plan = old.plan_launch(batch, heads, latent, rope, context, sms, fp8_cache=True)
            shape["old_fp8"] = {**_timed(lambda: old.mla_paged_decode(q, rows, table, lens, 0.07, latent, context,
                                                                      k_scale=k_scale, launch=old_plan)[0], want),
                                "plan": asdict(old_plan)}
        variants = [plan] + [replace(plan, block_h=h, block_n=n, num_warps=w, num_stages=st)
                             for h, n, w, st in itertools.product((16, 32), (16, 32, 64), (4, 8), (1, 2)) if tiles]
        for launch in dict.fromkeys(variants):  # the plan's own tiles appear once
            row = {**asdict(launch), "is_plan": launch == plan,
                   **_timed(lambda: mla_paged_decode(q, rows, table, lens, 0.07, latent, context, k_scale=k_scale,
                                                     launch=launch)[0], want)}
            shape["variants"].append(row)
        gbytes = tokens * (latent + rope) / 1e9
        for row in [shape["bf16"], shape.get("old_fp8"), *shape["variants"]]:
            if row and "ms" in row:
                row["tb_per_s"] = row.get("gbytes", gbytes) / row["ms"]
        ok = [r for r in shape["variants"] if "ms" in r and r["max_abs_diff_vs_torch"] < 2e-2]
        shape["best"] = min(ok, key=lambda r: r["ms"]) if ok else None
        shape["plan"] = next((r for r in shape["variants"] if r["is_plan"]), None)
        results["shapes"][name] = shape

        def line(label, row):
            if not row or "ms" not in row:
                return f"{label} {row.get('error') if row else '-'}"
            return f"{label} {row['ms']:.3f} ms ({row['tb_per_s']:.2f} TB/s, err {row['max_abs_diff_vs_torch']:.1e})"

        best = shape["best"]
        print(f"{name}: " + "  ".join([line("bf16", shape["bf16"]), line("old fp8", shape.get("old_fp8")),
                                       line("fp8 plan", shape["plan"]), line("fp8 best", best)])
              + (f" [h{best['block_h']} n{best['block_n']} w{best['num_warps']} s{best['num_stages']} "
                 f"{best['latent_blocks']}]" if best else ""), flush=True)
        out_file.write_text(json.dumps(results, indent=1))


BALANCED_SHAPES = [  # (name, latent, rope, heads, batch, context, page)
    ("576_llama2_b310_8k_p64", 512, 64, 32, 310, 8700, 64),  # the ncu profile's case (FlashMLA's page)
    ("576_llama2_b310_8k", 512, 64, 32, 310, 8700, PAGE),
    ("1024_llama2_b212_8k", 512, 512, 32, 212, 8700, PAGE),
    ("512_llama3_cut75_b348_8k", 384, 128, 32, 348, 8700, PAGE),
    ("576_llama2_b1024_1k", 512, 64, 32, 1024, 1280, PAGE),
    ("576_llama2_b32_8k", 512, 64, 32, 32, 8700, PAGE),
    ("1024_llama2_b16_8k", 512, 512, 32, 16, 8192, PAGE),
]


def _flashmla(q, cache, table, lens, latent):
    """vLLM's FlashMLA decode on these inputs (576-value rows, 64-token pages), or None without vLLM."""
    if q.shape[-1] != 576 or cache.shape[1] != 64:
        return None
    try:
        return decode_call("flashmla", latent, q, cache, table, lens, 0), DECODE_SCALE
    except (ImportError, SystemExit):
        return None


def balanced(out_file: Path) -> None:
    """BALANCED_SHAPES: the plan with fixed splits (``balanced=False``), other split counts and the
    32 × 16 tile; the balanced kernel at 1–8 × SMs programs per head group with the split plan's tiles and
    their neighbours; and the plan as ``plan_launch`` now gives it."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    results = {"device": torch.cuda.get_device_name(0), "sms": sms, "shapes": {}}
    for name, latent, rope, heads, batch, context, page in BALANCED_SHAPES:
        torch.cuda.empty_cache()
        q, cache, table, lens = paged_inputs(latent, rope, heads, batch, context, page=page)
        gbytes = float(lens.sum()) * (latent + rope) * 2 / 1e9
        plan = plan_launch(batch, heads, latent, rope, context, sms)
        split = plan_launch(batch, heads, latent, rope, context, sms, balanced=False)  # the plan before balancing
        want, _ = mla_paged_decode(q, cache, table, lens, 0.07, latent, context, launch=split)
        groups = -(-heads // split.block_h)
        fixed = [split] + [replace(split, num_splits=x) for x in (2, 3, 5, 6, 8) if x != split.num_splits]
        fixed += [replace(split, block_n=16), replace(split, block_n=16, num_splits=2 * split.num_splits)]
        tiles = dict.fromkeys([(split.block_n, split.num_warps), (16, 4), (32, 4), (64, 4), (32, 8), (64, 8)])
        even = [plan] + [replace(split, block_n=n, num_warps=w, num_programs=max(1, k * sms // groups))
                         for n, w in tiles for k in (1, 2, 3, 4, 8)]
        rows = []
        for launch in dict.fromkeys(fixed + even):
            if shared_memory_bytes(launch.block_h, launch.block_n, launch.block_c, launch.block_r) > \
                    SHARED_MEMORY_BUDGET:
                continue
            timed = _timed(lambda: mla_paged_decode(q, cache, table, lens, 0.07, latent, context, launch=launch)[0],
                           want.float(), key="max_abs_diff_vs_split")
            row = {**asdict(launch), **timed, "is_plan": launch == plan, "is_split_plan": launch == split}
            if "ms" in timed:
                row["tb_per_s"] = gbytes / timed["ms"]
            rows.append(row)
        ok = [r for r in rows if "ms" in r and r["max_abs_diff_vs_split"] < 2e-2]
        base = next(r for r in rows if r["is_split_plan"])
        planned = next(r for r in rows if r["is_plan"])
        best_fixed = min((r for r in ok if not r["num_programs"]), key=lambda r: r["ms"])
        best_even = min((r for r in ok if r["num_programs"]), key=lambda r: r["ms"], default=None)
        shape = {"latent": latent, "rope": rope, "heads": heads, "batch": batch, "context": context, "page": page,
                 "gbytes_read": gbytes, "split_plan": base, "plan": planned, "best_fixed": best_fixed,
                 "best_balanced": best_even,
                 "variants": rows}
        flash = _flashmla(q, cache, table, lens, latent)
        if flash is not None:
            call, scale = flash
            reference = mla_paged_decode(q, cache, table, lens, scale, latent, context, launch=split)[0].float()
            shape["flashmla"] = _timed(lambda: call()[0].squeeze(1), reference, key="max_abs_diff_vs_split")
            if "ms" in shape["flashmla"]:
                shape["flashmla"]["tb_per_s"] = gbytes / shape["flashmla"]["ms"]
        results["shapes"][name] = shape

        def tag(r):
            return (f"{r['ms']:.3f} ms {r['tb_per_s']:.2f} TB/s [h{r['block_h']} n{r['block_n']} w{r['num_warps']} "
                    f"x{r['num_splits']} P{r['num_programs']}]") if r else "-"

        line = (f"{name}: split plan {tag(base)} | fixed {tag(best_fixed)} | balanced {tag(best_even)} | "
                f"plan {tag(planned)} = {base['ms'] / planned['ms']:.2f}x the split plan")
        if "flashmla" in shape and "ms" in shape["flashmla"]:
            line += f" | FlashMLA {shape['flashmla']['ms']:.3f} ms"
        print(line, flush=True)
        out_file.write_text(json.dumps(results, indent=1))


def crossover(out_file: Path) -> None:
    """The fixed splits against the balanced kernel (forced) over batch sizes at 8.7K tokens: where
    the balanced kernel starts to pay."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    results = {"device": torch.cuda.get_device_name(0), "sms": sms, "page": PAGE, "rows": []}
    for latent, rope in ((512, 64), (512, 512), (384, 128)):
        for batch in (16, 32, 48, 64, 96, 128, 160, 192, 224, 256, 310):
            torch.cuda.empty_cache()
            q, cache, table, lens = paged_inputs(latent, rope, 32, batch, 8700)
            gbytes = float(lens.sum()) * (latent + rope) * 2 / 1e9
            fixed = plan_launch(batch, 32, latent, rope, 8700, sms, balanced=False)
            even = balanced_launch(fixed, batch, 32, sms, min_requests_per_sm=0.0)
            want, _ = mla_paged_decode(q, cache, table, lens, 0.07, latent, 8700, launch=fixed)
            row = {"latent": latent, "rope": rope, "batch": batch, "gbytes_read": gbytes,
                   "fixed": asdict(fixed), "balanced": asdict(even)}
            for label, launch in (("fixed", fixed), ("balanced", even)):
                row[label].update(_timed(lambda: mla_paged_decode(q, cache, table, lens, 0.07, latent, 8700,
                                                                  launch=launch)[0], want.float(),
                                         key="max_abs_diff_vs_fixed"))
            row["balanced_speedup"] = row["fixed"]["ms"] / row["balanced"]["ms"]
            results["rows"].append(row)
            print(f"{latent}+{rope} batch {batch}: fixed {row['fixed']['ms']:.3f} ms (x{fixed.num_splits}), balanced "
                  f"{row['balanced']['ms']:.3f} ms (P{even.num_programs}) = {row['balanced_speedup']:.2f}x", flush=True)
            out_file.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    args = cli_args(__doc__)
    if args[0] in ("crossover", "balanced", "fp8", "fp8-plan") and len(args) < 2:
        raise SystemExit(__doc__)
    if args[0] == "crossover":
        crossover(Path(args[1]))
    elif args[0] == "balanced":
        balanced(Path(args[1]))
    elif args[0] in ("fp8", "fp8-plan"):
        fp8(Path(args[1]), tiles=args[0] == "fp8")
    else:
        main(Path(args[0]))

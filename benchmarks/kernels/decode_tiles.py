"""Launch variants of the plugin's Triton decode kernel alone, across the row shapes a conversion can
produce: which latent blocks, head groups, rows per tile, warps and pipeline depth the launch plan
(``plan_launch``) should choose for each row width, and whether the plan fits the GPU's shared memory.
Why: the decode kernel bounds the long-context engines; Triton tiles are powers of two, so rows that
are not (640, 896, 1,536 ... latent columns) need their own tiles. No vLLM needed.

  blocks:        the latent in power-of-two blocks (640 = 512 + 128) against one padded tile, over
                 head groups, row tiles and warps, at widths of a per-layer pattern and two engine rows.
  native-blocks: the 576- and 1024-value engine shapes with their 512 latent split into blocks,
                 over row tiles, warps and pipeline depth.
  wide-blocks:   the Llama-3-8B cut50 row (896 + 128) at its 8K/1K decode batch: latent blocks × head
                 groups × row tiles × warps × pipeline depth.
  paper-blocks:  the paper's widest Llama-2-7B rows (1024 + 512, 2048 + 512) at their 8K/1K decode
                 batches: one latent block vs halves and quarters, over the same tiles.
  paper-warps:   the same rows (widest first) with 8 or 16 warps and 2 or 3 pipeline stages: more
                 threads to hold the 1,024–2,048 accumulator columns per head.
  fit:           the launch plan on this GPU's own shared memory, bf16 and fp8 caches, from the native
                 576 row to 2048-latent rows: each plan launches, its estimate is set beside the bytes
                 Triton compiled, and the output is checked against float32 PyTorch.
                 (The compiled shared memory of any launch, without a GPU: benchmarks.kernels.compile_sm90.)
  two-pass:      the two-pass decode (scores, then values by latent slice) against the one-pass plan on
                 the rows whose accumulators crowd it (2048 + 512, 1024 + 512, 896 + 128): scores tiles,
                 then values tiles.

Each variant's output is checked against the padded plan's and, on the first requests, against
float32 PyTorch; timed with ``triton.testing.do_bench`` (median), bandwidth = cached bytes read.
(These modes were ``gpu_layer_widths.py blocks|native-blocks|...|fit`` before the benchmarks were grouped.)

Usage (GPU): python -m benchmarks.kernels.decode_tiles {blocks,native-blocks,wide-blocks,paper-blocks,paper-warps,fit,two-pass} OUT.json
Results: benchmarks/README.md lists the folders this script wrote.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch

from benchmarks.common import PAGE, cli_args, paged_inputs
from vllm_mha2mla.attention import triton_decode
from vllm_mha2mla.attention.paged_attention import paged_latent_decode
from vllm_mha2mla.attention.triton_decode import (SHARED_MEMORY_BUDGET, device_shared_memory, latent_blocks,
                                                  mla_paged_decode, plan_launch, shared_memory_bytes)

BLOCK_CASES = [  # (latent, rope, batch, seq_len): gpu_layer_widths' per-layer pattern widths, two 8K/1K engine rows
    *[(w, 512, 256, 768) for w in (128, 384, 448, 512, 640, 896)],
    (384, 128, 348, 8704),  # Llama-3-8B cut75 (8 kv-heads × 16 rope), 8K/1K decode batch
    (512, 64, 310, 8704),  # the native 576 row, for reference (one block either way)
]


def _device_results(heads: int) -> tuple[int, dict]:
    """This GPU's multiprocessor count and the results' header."""
    return (torch.cuda.get_device_properties(0).multi_processor_count,
            {"device": torch.cuda.get_device_name(0), "heads": heads, "page": PAGE, "cases": []})


def _case_inputs(latent: int, rope: int, heads: int, batch: int, seq_len: int):
    """A case's paged bf16 inputs (the allocator emptied first: the cases' caches differ by gigabytes) and
    the gigabytes of cache one decode call reads."""
    torch.cuda.empty_cache()
    q, cache, table, lens = paged_inputs(latent, rope, heads, batch, seq_len)
    return q, cache, table, lens, float(lens.sum()) * (latent + rope) * 2 / 1e9


def _tile_grid(plan, block_options, heads=(16, 32), rows=(16, 32, 64), warps=(4, 8), stages=None) -> list:
    """The plan with each latent block option × head group × row tile × warps × pipeline depth
    (``stages`` None: the plan's own), every other setting kept: what each sweep below varies."""
    from dataclasses import replace

    return [replace(plan, latent_blocks=b, block_h=h, block_n=n, num_warps=w, num_stages=st)
            for b, h, n, w, st in itertools.product(block_options, heads, rows, warps, stages or (plan.num_stages,))]


def _block_variants(plan, padded) -> list:
    """Exact blocks and the padded tile, over head groups, row tiles and warps."""
    return _tile_grid(plan, (plan.latent_blocks, padded.latent_blocks))


NATIVE_CASES = [(512, 64, 310, 8704), (512, 512, 212, 8704), (512, 64, 1024, 1280)]  # the 8K/1K and 1K/256 engines


def _native_variants(plan, padded) -> list:
    """The 512 latent of the native and paper rows split into blocks (two 256-wide accumulators
    instead of one 512-wide), over row tiles, warps and pipeline depth."""
    return _tile_grid(plan, ((512,), (256, 256), (256, 128, 128)), heads=(plan.block_h,), rows=(32, 64),
                      stages=(2, 3))


WIDE_CASES = [(896, 128, 97, 8704), (896, 128, 512, 1280), (640, 128, 128, 8704)]
"""Llama-3-8B cut50 (8 kv-heads: d_kv 112, rope 16 each) at the 8K/1K engine's decode batch, where the
plan's 16-head groups read the cache slowly in the engine, and at a 1K/256 batch; a 640 + 128 row."""


def _wide_variants(plan, padded) -> list:
    """A latent past 512 as three exact blocks or two 512 blocks (the last padded), over head
    groups, row tiles, warps and pipeline depth."""
    return _tile_grid(plan, (plan.latent_blocks, latent_blocks(plan.block_c, max_blocks=2)), stages=(1, 2))


PAPER_CASES = [(1024, 512, 64, 8704), (2048, 512, 40, 8704)]
"""Llama-2-7B at the paper's d_kv 32 and 64 (rope_dim 16 on 32 heads: 1,536 and 2,560 values) at about
their 8K/1K engines' decode batches (KV capacity / 9.2K tokens): the widest rows, whose one power-of-two
latent block holds 1,024 or 2,048 float32 accumulator columns per head."""


def _split_variants(plan, padded, warps=(4, 8), stages=(1, 2)) -> list:
    """A power-of-two latent as one block, two halves, or a half and two quarters (narrower
    accumulators, the same columns), over head groups, row tiles, warps and pipeline depth."""
    c = plan.block_c
    return _tile_grid(plan, ((c,), (c // 2, c // 2), (c // 2, c // 4, c // 4)), warps=warps, stages=stages)


def blocks(out_file: Path, heads: int = 32, cases: list = BLOCK_CASES, variants=_block_variants) -> dict:
    """The decode kernel's launch variants (``variants(plan, padded_plan)``) at each case, each
    output checked against the padded plan's and, on the first requests, against float32 PyTorch."""
    from dataclasses import replace

    import triton

    sms, results = _device_results(heads)
    for latent, rope, batch, seq_len in cases:
        q, cache, table, lens, gbytes = _case_inputs(latent, rope, heads, batch, seq_len)
        plan = plan_launch(batch, heads, latent, rope, seq_len, sms)
        padded = replace(plan, latent_blocks=latent_blocks(latent, max_blocks=1))
        want = paged_latent_decode(q[:4].float(), cache.float(), table[:4], lens[:4], 0.1, latent)
        base, _ = mla_paged_decode(q, cache, table, lens, 0.1, latent, seq_len, launch=padded)
        case: dict = {"latent": latent, "rope": rope, "batch": batch, "seq_len": seq_len, "gbytes": gbytes,
                      "plan": {**vars(plan), "latent_blocks": list(plan.latent_blocks)}, "variants": []}
        for launch in dict.fromkeys(variants(plan, padded)):  # each distinct launch once
            if shared_memory_bytes(launch.block_h, launch.block_n, launch.block_c, launch.block_r) \
                    * max(1, launch.num_stages - 1) > SHARED_MEMORY_BUDGET:
                continue
            row = {"latent_blocks": list(launch.latent_blocks), "block_h": launch.block_h, "block_n": launch.block_n,
                   "num_warps": launch.num_warps, "num_stages": launch.num_stages, "is_plan": launch == plan,
                   "is_padded_plan": launch == padded}
            try:
                out, _ = mla_paged_decode(q, cache, table, lens, 0.1, latent, seq_len, launch=launch)
                row["max_abs_diff_vs_padded"] = float((out.float() - base.float()).abs().max())
                row["max_abs_diff_vs_torch"] = float((out[:4].float() - want).abs().max())
                row["ms"] = triton.testing.do_bench(
                    lambda: mla_paged_decode(q, cache, table, lens, 0.1, latent, seq_len, launch=launch),
                    rep=50, return_mode="median")
                row["tb_per_s"] = gbytes / row["ms"]
            except Exception as exc:  # a variant may not fit the hardware
                row["error"] = str(exc).splitlines()[0][:200]
            case["variants"].append(row)
        timed = [r for r in case["variants"] if "ms" in r and r["max_abs_diff_vs_torch"] < 2e-2]
        for key in ("is_plan", "is_padded_plan"):
            case[key[3:]] = next((r for r in timed if r[key]), None)
        case["best"] = min(timed, key=lambda r: r["ms"]) if timed else None
        results["cases"].append(case)
        print(f"latent {latent} + rope {rope}, {batch} x {seq_len}: " + "  ".join(
            f"{k} {case[k]['ms']:.3f} ms {case[k]['tb_per_s']:.2f} TB/s {case[k]['latent_blocks']} "
            f"h{case[k]['block_h']} n{case[k]['block_n']} w{case[k]['num_warps']} s{case[k]['num_stages']}"
            for k in ("padded_plan", "plan", "best") if case[k]), flush=True)
        out_file.write_text(json.dumps(results, indent=1))
    return results


FIT_CASES = [(512, 64), (384, 128), (512, 512), (640, 512), (896, 512), (1024, 512), (1536, 1024), (2048, 512)]
"""(latent, rope): the native row, Llama-3-8B cut75, the paper's 1024 values, per-layer widths up to
the widest rows a conversion allows."""


def _compiled_shared_bytes(kernel) -> list[int]:
    """Shared memory of every compiled variant of a Triton kernel (empty where this Triton keeps
    its cache elsewhere): what the launch really asked for."""
    found = []
    try:
        for per_device in kernel.device_caches.values():
            found += [int(k.metadata.shared) for k in per_device[0].values()]
    except (AttributeError, IndexError, TypeError):
        pass
    return found


def fit(out_file: Path, heads: int = 32, batch: int = 64, seq_len: int = 2048) -> dict:
    """Every FIT_CASES row with a bf16 and an fp8 cache: the plan for this GPU's shared memory
    must launch (Triton raises OutOfResources past the limit) and agree with float32 PyTorch, or
    be refused by ``plan_launch`` before any launch."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    budget = device_shared_memory(0)
    results: dict = {"device": torch.cuda.get_device_name(0), "shared_memory_budget": budget, "cases": []}
    for latent, rope in FIT_CASES:
        q, cache, table, lens = paged_inputs(latent, rope, heads, batch, seq_len)
        for fp8 in (False, True):
            k_scale = torch.tensor([0.05], device="cuda") if fp8 else None
            rows = (cache.float() / 0.05).to(torch.float8_e4m3fn) if fp8 else cache
            reference_rows = rows.float() * 0.05 if fp8 else cache.float()
            row: dict = {"latent": latent, "rope": rope, "fp8_cache": fp8}
            try:
                plan = plan_launch(batch, heads, latent, rope, seq_len, sms, budget, fp8_cache=fp8)
            except ValueError as exc:  # refused before any launch, with the sizes: what a backend start reports
                row.update(refused=str(exc), ok=True)
                results["cases"].append(row)
                print(json.dumps(row), flush=True)
                continue
            row["plan"] = {**vars(plan), "latent_blocks": list(plan.latent_blocks)}
            row["estimated_shared_bytes"] = shared_memory_bytes(plan.block_h, plan.block_n, plan.block_c, plan.block_r)
            try:
                getattr(triton_decode._mla_decode_split_kernel, "device_caches", {}).clear()  # this case's kernel only
                out, _ = mla_paged_decode(q, rows, table, lens, 0.1, latent, seq_len, k_scale=k_scale)
                torch.cuda.synchronize()
                row["triton_shared_bytes"] = max(_compiled_shared_bytes(triton_decode._mla_decode_split_kernel),
                                                 default=None)
                want = paged_latent_decode(q[:4].float(), reference_rows, table[:4], lens[:4], 0.1, latent)
                row["max_abs_diff_vs_torch"] = float((out[:4].float() - want).abs().max())
                row["ok"] = row["max_abs_diff_vs_torch"] < 2e-2
            except Exception as exc:  # a planned launch that fails (OutOfResources) is what this mode looks for
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                row["ok"] = False
            results["cases"].append(row)
            print(json.dumps(row), flush=True)
        del q, cache, table, lens
        torch.cuda.empty_cache()
    results["all_ok"] = all(r["ok"] for r in results["cases"])
    out_file.write_text(json.dumps(results, indent=1))
    print("every plan launched and matched, or was refused before launch:", results["all_ok"], flush=True)
    return results


TWO_PASS_CASES = [(2048, 512, 40, 8704), (1024, 512, 64, 8704), (896, 128, 97, 8704)]
"""The rows whose accumulators crowd the one-pass kernel (benchmarks/results/h100-paper-rows/), at their
8K/1K engines' decode batches."""


def _timed(fn, want, gbytes: float) -> dict:
    """One launch's output error on the first requests against float32 PyTorch, then its median time."""
    import triton

    try:
        out, _ = fn()
        row = {"max_abs_diff_vs_torch": float((out[:want.shape[0]].float() - want).abs().max())}
        row["ms"] = triton.testing.do_bench(fn, rep=50, return_mode="median")
        row["tb_per_s"] = gbytes / row["ms"]
    except Exception as exc:  # a variant may not fit the hardware
        row = {"error": str(exc).splitlines()[0][:200]}
    return row


def two_pass(out_file: Path, heads: int = 32, cases: list = TWO_PASS_CASES) -> dict:
    """The two-pass decode (``triton_two_pass_decode``) against the one-pass plan in the same run: first the
    scores' tiles (rows × column chunk × warps × orientation) with the plan's values tiles, then the values'
    tiles (slice × rows × warps, heads as the plan gives them: ``value_heads_for``) with the best scores tiles.
    Bandwidth counts the cached bytes once (what one pass reads), so the two kernels' rates compare
    directly."""
    from dataclasses import replace

    from vllm_mha2mla.attention.triton_two_pass_decode import plan_two_pass, two_pass_paged_decode, value_heads_for

    sms, results = _device_results(heads)
    for latent, rope, batch, seq_len in cases:
        q, cache, table, lens, gbytes = _case_inputs(latent, rope, heads, batch, seq_len)
        want = paged_latent_decode(q[:4].float(), cache.float(), table[:4], lens[:4], 0.1, latent)
        one_pass = _timed(lambda: mla_paged_decode(q, cache, table, lens, 0.1, latent, seq_len), want, gbytes)
        plan = plan_two_pass(batch, heads, latent, rope, seq_len, sms)

        def run(launch):
            return _timed(lambda: two_pass_paged_decode(q, cache, table, lens, 0.1, latent, seq_len, launch),
                          want, gbytes)

        variants = []
        for sn, sk, sw, rows_as_m in itertools.product((32, 64, 128), (64, 128), (4, 8), (False, True)):
            launch = replace(plan, score_rows=sn, score_chunk=sk, score_warps=sw, scores_rows_as_m=rows_as_m)
            variants.append({"sweep": "scores", **vars(launch), **run(launch)})
        timed = [v for v in variants if "ms" in v and v["max_abs_diff_vs_torch"] < 2e-2]
        best = min(timed, key=lambda v: v["ms"]) if timed else vars(plan)
        score_tiles = {k: best[k] for k in ("score_rows", "score_chunk", "score_warps", "scores_rows_as_m")}
        for vs, vn, vw in itertools.product((256, 512), (32, 64), (4, 8)):
            if vn > score_tiles["score_rows"]:  # a values tile lies within one score tile
                continue
            launch = replace(plan, **score_tiles, value_slice=vs, value_heads=value_heads_for(vs, heads),
                             value_rows=vn, value_warps=vw)
            variants.append({"sweep": "values", **vars(launch), **run(launch)})
        timed = [v for v in variants if "ms" in v and v["max_abs_diff_vs_torch"] < 2e-2]
        fastest = min(timed, key=lambda v: v["ms"]) if timed else None
        case = {"latent": latent, "rope": rope, "batch": batch, "seq_len": seq_len, "gbytes": gbytes,
                "one_pass_plan": one_pass, "two_pass_plan": {**vars(plan), **run(plan)},
                "best": fastest, "variants": variants}
        if fastest and "ms" in one_pass:
            case["best_speedup_vs_one_pass"] = one_pass["ms"] / fastest["ms"]
        results["cases"].append(case)
        print(f"latent {latent} + rope {rope}, {batch} x {seq_len}: one pass {one_pass.get('ms', 0):.3f} ms, "
              f"two-pass plan {case['two_pass_plan'].get('ms', 0):.3f} ms, best {(fastest or {}).get('ms', 0):.3f} ms "
              f"({case.get('best_speedup_vs_one_pass', 0):.2f}x)", flush=True)
        out_file.write_text(json.dumps(results, indent=1))
    return results


MODES = {
    "blocks": blocks, "fit": fit, "two-pass": two_pass,
    "native-blocks": lambda o: blocks(o, cases=NATIVE_CASES, variants=_native_variants),
    "wide-blocks": lambda o: blocks(o, cases=WIDE_CASES, variants=_wide_variants),
    "paper-blocks": lambda o: blocks(o, cases=PAPER_CASES, variants=_split_variants),
    "paper-warps": lambda o: blocks(o, cases=PAPER_CASES[::-1],
                                    variants=lambda plan, padded: _split_variants(plan, padded, (8, 16), (2, 3))),
}


if __name__ == "__main__":
    args = cli_args(__doc__, min_args=2)
    if args[0] not in MODES:
        raise SystemExit(f"unknown mode {args[0]!r}\n{__doc__}")
    MODES[args[0]](Path(args[1]))

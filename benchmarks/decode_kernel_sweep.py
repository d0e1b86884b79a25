"""The plugin's Triton decode kernel at the batch and context of the long-context engine runs
(`results/h200x4-bench/`: ~310 sequences of ~8.7K tokens at 576 values, where it moved 1.3 TB/s
against FlashMLA's 2.7 TB/s), over tile sizes, warps, pipeline depth and KV splits.

No vLLM needed: the kernel alone on random pages, each variant checked against the default
plan's output, timed with ``triton.testing.do_bench`` (median), bandwidth = cached bytes read.

Usage (GPU): python benchmarks/decode_kernel_sweep.py OUT.json
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_mha2mla.triton_decode import SHARED_MEMORY_BUDGET, mla_paged_decode, plan_launch, shared_memory_bytes  # noqa: E402

# (name, latent, rope, heads, batch, context): the engine runs' decode phases
SHAPES = [
    ("576_llama2_b310_8k", 512, 64, 32, 310, 8700),
    ("1024_llama2_b212_8k", 512, 512, 32, 212, 8700),
    ("512_llama3_cut75_b348_8k", 384, 128, 32, 348, 8700),
    ("576_llama2_b1024_1k", 512, 64, 32, 1024, 1280),  # the 1K/256 runs
    ("576_llama2_b32_8k", 512, 64, 32, 32, 8700),
    ("1024_llama2_b16_8k", 512, 512, 32, 16, 8192),
]
PAGE = 16  # vLLM's default block size for this backend


def paged_inputs(latent, rope, heads, batch, context, seed=0):
    """Random bf16 queries and a paged cache of 16-token pages in random order, each request
    holding 90-100% of ``context`` tokens: (q, cache, block table, lengths)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    lens = torch.randint(int(context * 0.9), context + 1, (batch,), device="cuda", generator=g).to(torch.int32)
    per_req = -(-context // PAGE)
    pages = batch * per_req
    cache = (torch.randn(pages, PAGE, latent + rope, device="cuda", generator=g) * 0.5).to(torch.bfloat16)
    table = torch.randperm(pages, device="cuda", generator=g)[: batch * per_req].view(batch, per_req).to(torch.int32)
    q = (torch.randn(batch, heads, latent + rope, device="cuda", generator=g) * 0.5).to(torch.bfloat16)
    return q, cache, table, lens


def main(out_file: Path) -> None:
    from triton.testing import do_bench

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
            try:
                got, _ = mla_paged_decode(q, cache, table, lens, 0.07, latent, context, launch=launch)
                err = float((got.float() - want.float()).abs().max())
                ms = do_bench(lambda: mla_paged_decode(q, cache, table, lens, 0.07, latent, context, launch=launch),
                              warmup=25, rep=100, return_mode="median")
            except Exception as exc:  # out of shared memory / registers for this tile
                rows.append({**asdict(launch), "error": str(exc).splitlines()[0][:200]})
                continue
            rows.append({**asdict(launch), "ms": ms, "tb_per_s": gbytes / ms, "max_abs_diff_vs_default": err,
                         "is_default": launch == default, "compile_and_time_s": time.time() - t0})
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


if __name__ == "__main__":
    main(Path(sys.argv[1]))

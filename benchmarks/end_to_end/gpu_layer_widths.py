"""Per-layer latent widths on the GPU (issue 13, item 3): vLLM 0.26 + the plugin's Triton backend.

  parity:     a random-weight GQA Llama converted with a different latent width per layer
              (``--layer-latent``), served in bf16 with CUDA graphs and torch.compile, with and
              without chunked prefill + prefix caching, and with an fp8 KV cache: every layer's
              paged cache has its own width, and the tokens are scored teacher-forced against
              the float32 reference model (as ``gpu_plugin.py parity`` does).
  throughput: dummy-weight Llama-2-7B-shaped engines at equal total cache: the uniform exact
              layout (rope_dim 16, d_kv 16: 1024 values per token per layer) vs per-layer
              latents with the same mean, vs the MHA original; output tokens/s of one batch.

  kernels:    the decode kernel alone at each latent width of the throughput pattern (batch 256,
              32 heads, 768 cached tokens, rope 512): time per call with the default launch plan
              and with every head in one program group, summed over the pattern vs uniform.
  throughput-narrow: as throughput, uniform latent 448 vs per-layer 384..512, a pattern whose
              widths all share the uniform layer's kernel tiles (isolates per-width overheads).
  blocks:     the decode kernel with the latent in power-of-two blocks (640 = 512 + 128) against
              one padded tile, over head groups, row tiles and warps (no vLLM needed).
  native-blocks: the 576- and 1024-value engine shapes with their 512 latent split into blocks,
              over row tiles, warps and pipeline depth (no vLLM needed).
  wide-blocks: the Llama-3-8B cut50 row (896 + 128) at its 8K/1K decode batch: latent blocks x head
              groups x row tiles x warps x pipeline depth (no vLLM needed).
  paper-blocks: the paper's widest Llama-2-7B rows (1024 + 512, 2048 + 512) at their 8K/1K decode
              batches: one latent block vs halves and quarters, over the same tiles (no vLLM needed).
  paper-warps: the same rows (widest first) with 8 or 16 warps and 2 or 3 pipeline stages: more
              threads to hold the 1,024–2,048 accumulator columns per head (no vLLM needed).
  fit:        the launch plan on this GPU's own shared memory, bf16 and fp8 caches, from the native
              576 row to 2048-latent rows: each plan launches, its estimate is set beside the bytes
              Triton compiled, and the output is checked against float32 PyTorch (no vLLM needed).
              (The compiled shared memory of any launch, without a GPU: benchmarks/compile_sm90.py.)

Usage: python benchmarks/gpu_layer_widths.py {parity,throughput,throughput-narrow,kernels,sweep,blocks,native-blocks,wide-blocks,paper-blocks,paper-warps,fit} OUT.json
"""

from __future__ import annotations

import itertools
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_plugin import _prompts, score_runs  # noqa: E402
from benchmarks.synthetic import llama_config, mla_config_for, save_random_llama, write_config_only  # noqa: E402
from conversion import ConvertOptions, convert, load_reference  # noqa: E402
from vllm_mha2mla.runner import EngineRequest, run_engine_in_subprocess  # noqa: E402

PARITY_LLAMA = llama_config(1024, 16, 4, 64, 6, 4096, 2816)
PARITY_WIDTHS = [32, 160, 96, 48, 128, 64]  # latent per layer (4 kv-heads × rope_dim 16 = 64 rope values)
SEVEN_B = llama_config(4096, 32, 32, 128, 32, 32000, 11008)
THROUGHPUT_PATTERN = [128, 896, 512, 384, 640]  # mean 512 = the uniform latent (32 kv-heads × d_kv 16)
NARROW_PATTERN = [384, 416, 448, 480, 512]  # mean 448 = 32 kv-heads × d_kv 14; one tile class under the padded plan (512)


def parity(out_file: Path) -> dict:
    tmp = Path(tempfile.mkdtemp())
    src = save_random_llama(tmp / "src", PARITY_LLAMA)
    models = {"per_layer": tmp / "mla", "uniform": tmp / "uniform"}
    convert(src, models["per_layer"], ConvertOptions(rope_dim=16, strategy="uniform", layer_latent=PARITY_WIDTHS,
                                                     dtype="bfloat16"), show_progress=False)
    mean = sum(PARITY_WIDTHS) // len(PARITY_WIDTHS) // 4  # the same mean latent, every layer alike
    convert(src, models["uniform"], ConvertOptions(rope_dim=16, strategy="uniform", d_kv=mean, layout="exact",
                                                   dtype="bfloat16"), show_progress=False)
    prompts = _prompts(8, 4096) + [p * 6 for p in _prompts(4, 4096, seed=1)]  # some long enough to chunk
    common = dict(prompt_token_ids=prompts, max_tokens=32, dtype="bfloat16", prompt_logprobs=True,
                  skip_tokenizer_init=True, max_model_len=1024, gpu_memory_utilization=0.5)
    chunked = {"enable_chunked_prefill": True, "enable_prefix_caching": True, "max_num_batched_tokens": 64}
    variants = {
        "per_layer_cuda_graphs": ("per_layer", {}),
        "per_layer_chunked_prefill_prefix_cache": ("per_layer", chunked),
        "uniform_chunked_prefill_prefix_cache": ("uniform", chunked),
        "per_layer_fp8_kv": ("per_layer", {"kv_cache_dtype": "fp8"}),
    }
    device = torch.device("cuda")
    rope = json.loads((models["per_layer"] / "config.json").read_text())["qk_rope_head_dim"]
    results: dict = {"llama": PARITY_LLAMA, "layer_latent": PARITY_WIDTHS, "uniform_latent": 4 * mean,
                     "rope_values": rope, "runs": {}}
    for key, (model, extra) in variants.items():
        try:
            run = run_engine_in_subprocess(EngineRequest(model=str(models[model]), **common, **extra))
        except RuntimeError as exc:
            results["runs"][key] = {"error": str(exc)[-2000:]}
            continue
        results["vllm_version"] = run["vllm_version"]
        reference = load_reference(models[model]).to(device)
        scored = score_runs({key: run}, None, reference, device)[key]
        scored["kv_cache_widths"] = run["kv_cache_widths"]
        if model == "per_layer":
            scored["widths_as_converted"] = run["kv_cache_widths"] == [w + rope for w in PARITY_WIDTHS]
        results["runs"][key] = scored
        print(key, json.dumps(scored), flush=True)
    out_file.write_text(json.dumps(results, indent=2))
    return results


def throughput(out_file: Path, num_prompts: int = 256, prompt_len: int = 512, out_len: int = 256,
               pattern: list[int] = THROUGHPUT_PATTERN, with_mha: bool = True) -> dict:
    tmp = Path(tempfile.mkdtemp())
    base = write_config_only(tmp / "llama7b", SEVEN_B)
    layers = SEVEN_B["num_hidden_layers"]
    mean = sum(pattern) // len(pattern)
    d_kv = mean // SEVEN_B["num_key_value_heads"]
    widths = (pattern * layers)[:layers]
    widths[-1] += mean * layers - sum(widths)  # the same total as uniform exactly
    folders = {
        **({"mha_original": base} if with_mha else {}),
        "mla_uniform": write_config_only(tmp / "uniform", mla_config_for(base, 16, d_kv, cache_size=None)),
        "mla_per_layer": write_config_only(tmp / "per_layer", mla_config_for(base, 16, d_kv, layer_latent=widths)),
    }
    prompts = _prompts(num_prompts, 32000, seed=2)
    prompts = [(p * (prompt_len // len(p) + 1))[:prompt_len] for p in prompts]
    results: dict = {"shape": "Llama-2-7B (dummy weights)", "num_prompts": num_prompts, "prompt_len": prompt_len,
                     "out_len": out_len, "layer_latent": widths, "engines": {}}
    for name, folder in folders.items():
        req = EngineRequest(model=str(folder), prompt_token_ids=prompts, max_tokens=out_len, dtype="bfloat16",
                            load_format="dummy", skip_tokenizer_init=True, max_model_len=2048,
                            timed_repeats=3, max_num_seqs=num_prompts, gpu_memory_utilization=0.9)
        try:
            run = run_engine_in_subprocess(req)
        except RuntimeError as exc:
            results["engines"][name] = {"error": str(exc)[-2000:]}
            continue
        results["engines"][name] = {k: run.get(k) for k in (
            "output_tokens_per_s", "timed_seconds_median", "timed_runs", "kv_cache_tokens", "attention_backends",
            "kv_cache_widths", "device", "vllm_version")}
        print(name, results["engines"][name], flush=True)
    engines = results["engines"]
    if all("output_tokens_per_s" in engines.get(k, {}) for k in ("mla_uniform", "mla_per_layer")):
        uni, per = engines["mla_uniform"], engines["mla_per_layer"]
        results["per_layer_vs_uniform_throughput"] = per["output_tokens_per_s"] / uni["output_tokens_per_s"]
        results["per_layer_vs_uniform_kv_tokens"] = per["kv_cache_tokens"] / uni["kv_cache_tokens"]
    out_file.write_text(json.dumps(results, indent=2))
    return results


def kernels(out_file: Path, batch: int = 256, heads: int = 32, rope: int = 512, seq_len: int = 768) -> dict:
    from dataclasses import replace

    import triton

    from vllm_mha2mla.triton_decode import mla_paged_decode, plan_launch

    page = 16
    pages_per_seq = seq_len // page
    table = torch.arange(batch * pages_per_seq, device="cuda", dtype=torch.int32).view(batch, pages_per_seq)
    lens = torch.full((batch,), seq_len, device="cuda", dtype=torch.int32)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows: dict = {}
    for latent in sorted(set(THROUGHPUT_PATTERN)):
        width = latent + rope
        cache = torch.randn(batch * pages_per_seq, page, width, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(batch, heads, width, device="cuda", dtype=torch.bfloat16)
        plan = plan_launch(batch, heads, latent, rope, seq_len, sms)
        variants = {"default": plan, "all_heads_one_group": replace(plan, block_h=max(16, triton.next_power_of_2(heads)),
                                                                     num_warps=8)}
        rows[latent] = {"plan": vars(plan)}
        for name, launch in variants.items():
            try:
                ms = triton.testing.do_bench(lambda: mla_paged_decode(q, cache, table, lens, 0.1, latent, seq_len,
                                                                      num_sms=sms, launch=launch))
                rows[latent][name] = {"ms": ms, "GB_per_s": batch * seq_len * width * 2 / ms / 1e6}
            except Exception as exc:  # a variant may not fit the hardware
                rows[latent][name] = {"error": str(exc)[-300:]}
        print(latent, rows[latent], flush=True)
    pattern_ms = {v: sum(rows[w][v].get("ms", float("nan")) for w in THROUGHPUT_PATTERN) for v in
                  ("default", "all_heads_one_group")}
    results = {"batch": batch, "heads": heads, "rope": rope, "seq_len": seq_len, "widths": rows,
               "pattern_sum_ms": pattern_ms, "uniform_512_x5_ms": {v: 5 * rows[512][v].get("ms", float("nan"))
                                                                    for v in ("default", "all_heads_one_group")}}
    out_file.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: results[k] for k in ("pattern_sum_ms", "uniform_512_x5_ms")}))
    return results


def sweep(out_file: Path, heads: int = 32, rope: int = 512) -> dict:
    """Launch configurations of the decode kernel for latents wider than 512 (1024-wide tiles),
    where the default plan reads at half the bandwidth of narrower rows (``kernels``)."""
    import triton

    from vllm_mha2mla.triton_decode import DecodeLaunch, mla_paged_decode, shared_memory_bytes

    page, sms = 16, torch.cuda.get_device_properties(0).multi_processor_count
    results: dict = {"heads": heads, "rope": rope, "cases": []}
    for latent, batch, seq_len in [(896, 256, 768), (640, 256, 768), (896, 32, 4096)]:
        width = latent + rope
        pages_per_seq = seq_len // page
        table = torch.arange(batch * pages_per_seq, device="cuda", dtype=torch.int32).view(batch, pages_per_seq)
        lens = torch.full((batch,), seq_len, device="cuda", dtype=torch.int32)
        cache = torch.randn(batch * pages_per_seq, page, width, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(batch, heads, width, device="cuda", dtype=torch.bfloat16)
        best = None
        for block_h, block_n, warps, stages, splits in itertools.product((16, 32), (16, 32), (4, 8), (1, 2),
                                                                        (1, 2, 4, 8)):
            if shared_memory_bytes(block_h, block_n, 1024, triton.next_power_of_2(rope)) > 228 * 1024:
                continue
            launch = DecodeLaunch(block_h, block_n, (1024,), triton.next_power_of_2(rope), warps, stages, splits)
            try:
                ms = triton.testing.do_bench(lambda: mla_paged_decode(q, cache, table, lens, 0.1, latent, seq_len,
                                                                      num_sms=sms, launch=launch), rep=20)
            except Exception:
                continue
            row = {"latent": latent, "batch": batch, "seq_len": seq_len, "launch": vars(launch), "ms": ms,
                   "GB_per_s": batch * seq_len * width * 2 / ms / 1e6}
            results["cases"].append(row)
            if best is None or ms < best["ms"]:
                best = row
        print("best", json.dumps(best), flush=True)
    out_file.write_text(json.dumps(results, indent=2))
    return results


BLOCK_CASES = [  # (latent, rope, batch, seq_len): the throughput pattern's widths, and the 8K/1K engines' shapes
    *[(w, 512, 256, 768) for w in (128, 384, 448, 512, 640, 896)],
    (384, 128, 348, 8704),  # Llama-3-8B cut75 (8 kv-heads × 16 rope), 8K/1K decode batch
    (512, 64, 310, 8704),  # the native 576 row, for reference (one block either way)
]


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
plan's 16-head groups moved ~1.1 TB/s (results/h100-bench-4/), and at a 1K/256 batch; a 640 + 128 row."""


def _wide_variants(plan, padded) -> list:
    """A latent past 512 as three exact blocks or two 512 blocks (the last padded), over head
    groups, row tiles, warps and pipeline depth."""
    from vllm_mha2mla.triton_decode import latent_blocks

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

    from benchmarks.decode_kernel_sweep import PAGE, paged_inputs
    from vllm_mha2mla.paged_attention import paged_latent_decode
    from vllm_mha2mla.triton_decode import (SHARED_MEMORY_BUDGET, latent_blocks, mla_paged_decode, plan_launch,
                                            shared_memory_bytes)

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    results: dict = {"device": torch.cuda.get_device_name(0), "heads": heads, "page": PAGE, "cases": []}
    for latent, rope, batch, seq_len in cases:
        torch.cuda.empty_cache()
        q, cache, table, lens = paged_inputs(latent, rope, heads, batch, seq_len)
        gbytes = float(lens.sum()) * (latent + rope) * 2 / 1e9
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
    from vllm_mha2mla import triton_decode
    from vllm_mha2mla.paged_attention import paged_latent_decode
    from vllm_mha2mla.triton_decode import device_shared_memory, mla_paged_decode, plan_launch, shared_memory_bytes

    from benchmarks.decode_kernel_sweep import paged_inputs

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


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    {"parity": parity, "throughput": throughput, "kernels": kernels, "sweep": sweep, "blocks": blocks, "fit": fit,
     "native-blocks": lambda o: blocks(o, cases=NATIVE_CASES, variants=_native_variants),
     "wide-blocks": lambda o: blocks(o, cases=WIDE_CASES, variants=_wide_variants),
     "paper-blocks": lambda o: blocks(o, cases=PAPER_CASES, variants=_split_variants),
     "paper-warps": lambda o: blocks(o, cases=PAPER_CASES[::-1],
                                     variants=lambda plan, padded: _split_variants(plan, padded, (8, 16), (2, 3))),
     "throughput-narrow": lambda o: throughput(o, pattern=NARROW_PATTERN, with_mha=False)}[mode](out)

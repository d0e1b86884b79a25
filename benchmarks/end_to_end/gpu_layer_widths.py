"""Per-layer latent widths on the GPU: does a checkpoint whose layers cache different latent widths
serve correctly in vLLM with the plugin's Triton backend, and what do per-layer widths cost against a
uniform layout of the same total cache? (Issue 13, item 3.)

  parity:     a random-weight GQA Llama converted with a different latent width per layer
              (``--layer-latent``), served in bf16 with CUDA graphs and torch.compile, with and
              without chunked prefill + prefix caching, and with an fp8 KV cache: every layer's
              paged cache has its own width, and the tokens are scored teacher-forced against
              the float32 reference model (as ``gpu_plugin parity`` does).
  throughput: dummy-weight Llama-2-7B-shaped engines at equal total cache: the uniform exact
              layout (rope_dim 16, d_kv 16: 1024 values per token per layer) vs per-layer
              latents with the same mean, vs the MHA original; output tokens/s of one batch.
  throughput-narrow: as throughput, uniform latent 448 vs per-layer 384..512, a pattern whose
              widths all share the uniform layer's kernel tiles (isolates per-width overheads).
  kernels:    the decode kernel alone at each latent width of the throughput pattern (batch 256,
              32 heads, 768 cached tokens, rope 512): time per call with the default launch plan
              and with every head in one program group, summed over the pattern vs uniform.
  sweep:      launch configurations of the decode kernel for latents wider than 512.

The tile sweeps over other row shapes (blocks, native-blocks, wide-blocks, paper-blocks, paper-warps,
fit) are ``benchmarks.kernels.decode_tiles``.

Usage (GPU): python -m benchmarks.end_to_end.gpu_layer_widths {parity,throughput,throughput-narrow,kernels,sweep} OUT.json
Results: benchmarks/README.md lists the folders this script wrote.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from pathlib import Path

import torch

from benchmarks.common import (cli_args, llama_config, mla_config_for, random_prompts, save_random_llama, score_runs,
                               write_config_only)
from conversion import ConvertOptions, convert, load_reference
from vllm_mha2mla.attention.triton_decode import (DecodeLaunch, mla_paged_decode, plan_launch,
                                                  shared_memory_bytes)
from vllm_mha2mla.tools.runner import EngineRequest, run_engine_in_subprocess

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
    prompts = random_prompts(8, 4096) + [p * 6 for p in random_prompts(4, 4096, seed=1)]  # some long enough to chunk
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
    prompts = random_prompts(num_prompts, 32000, seed=2)
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


MODES = {"parity": parity, "throughput": throughput, "kernels": kernels, "sweep": sweep,
         "throughput-narrow": lambda o: throughput(o, pattern=NARROW_PATTERN, with_mha=False)}


if __name__ == "__main__":
    args = cli_args(__doc__, min_args=2)
    if args[0] not in MODES:
        raise SystemExit(f"unknown mode {args[0]!r} (the tile sweeps moved to benchmarks.kernels.decode_tiles)\n{__doc__}")
    MODES[args[0]](Path(args[1]))

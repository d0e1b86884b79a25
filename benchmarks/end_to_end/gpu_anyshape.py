"""GPU engine checks of the plugin's any-shape MLA backend (issue: serve any MHA2MLA shape): do
checkpoints vLLM's own MLA kernels cannot serve (exact layouts, any latent/rope width) serve in bf16
as the float32 reference computes them, on every engine path (CUDA graphs, torch.compile, chunked
prefill, prefix caching, fp8 cache), and how fast against vLLM's kernels and the MHA original?

  parity:     bf16 engines (CUDA graphs + torch.compile) on non-native checkpoints against the
              float32 reference: Llama-2-7B-shaped (2 layers, random weights) at the paper's
              1024-value config, with chunked prefill + prefix caching and fp8 KV; the 576 layout
              forced onto the plugin backend.
  parity576, parity1024: one of those two cases.
  throughput576, throughput1024: dummy-weight Llama-2-7B (32 layers): at 576 values the plugin
              backend vs vLLM's FLASHMLA and TRITON_MLA on the same model and workload; at 1024
              values (exact layout, plugin backend) vs the MHA original. (``mha2mla bench`` is the
              throughput suite; these modes came before it.)
  smollm2:    the demo's real model (third argument: the SmolLM2-135M-Instruct Q4_1 GGUF file),
              converted as the demo does, teacher-forced against the float32 reference on held-out text.

The kernels alone (decode/prefill correctness, decode timings against FlashMLA and Triton MLA) are
``benchmarks.kernels.anyshape_kernels``.

Usage (GPU): python -m benchmarks.end_to_end.gpu_anyshape MODE OUT.json [GGUF]
Results: benchmarks/README.md lists the folders this script wrote.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (PARITY_CASES, cli_args, held_out_prompts, llama_config, mla_config_for, random_prompts,
                               save_random_llama, score_runs, write_config_only)
from conversion import ConvertOptions, convert, load_reference
from conversion.default_model import _dequantize_to_folder
from conversion.text_data import shared_text_path, split_text
from vllm_mha2mla.tools.runner import EngineRequest, run_engine_in_subprocess

LLAMA2_7B = dict(hidden=4096, heads=32, kv_heads=32, head_dim=128, vocab=32000, intermediate=11008)


def _save(out_file: Path, results: dict) -> None:
    out_file.write_text(json.dumps(results, indent=2))


# -- parity ----------------------------------------------------------------------------------------
def _judge(case: dict) -> None:
    base = case["runs"]["baseline_llama"]
    for key, r in case["runs"].items():
        if key != "baseline_llama" and "error" not in r and "fp8" not in key:
            lp = r["max_prompt_logprob_error"]  # None where prompt log-probs were not asked for
            r["ok"] = ((lp is None or lp <= 2 * base["max_prompt_logprob_error"] + 0.02)
                       and r["max_margin"] <= 2 * base["max_margin"] + 0.02)


def _parity_case(tmp: Path, name: str, src: Path, options: ConvertOptions, variants: list[tuple[str, dict]],
                 common: dict) -> dict:
    mla = tmp / f"{name}_mla"
    convert(src, mla, options, show_progress=False)
    layout = json.loads((mla / "config.json").read_text())["mha2mla"]["layout"]
    runs = {"baseline_llama": run_engine_in_subprocess(EngineRequest(model=str(src), **common))}
    for key, extra in variants:
        try:
            t0 = time.time()
            runs[key] = run_engine_in_subprocess(EngineRequest(model=str(mla), **{**common, **extra}))
            runs[key]["wall_seconds"] = time.time() - t0
        except RuntimeError as exc:
            runs[key] = {"error": str(exc)[-2500:]}
            print(key, runs[key]["error"], flush=True)
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).cuda().eval()
    reference = load_reference(mla).cuda()
    case: dict = {"layout": layout, "cache_values": layout["kv_lora_rank"] + layout["qk_rope_head_dim"],
                  "runs": score_runs(runs, original, reference, "cuda")}
    _judge(case)
    del original, reference
    torch.cuda.empty_cache()
    print(name, json.dumps({k: {kk: v.get(kk) for kk in ("backends", "ok", "max_margin", "max_prompt_logprob_error",
                                                         "kv_cache_tokens")}
                            for k, v in case["runs"].items()}, indent=1), flush=True)
    return case


def parity(out_file: Path, only: tuple[str, ...] = ("llama2_7b_shaped_1024", "gqa_d128_576_forced")) -> dict:
    tmp = Path(tempfile.mkdtemp())
    short = random_prompts(8, 4096)
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(3, 4096, (200,), generator=g).tolist()
    long_prompts = [shared + torch.randint(3, 4096, (150 + 60 * i,), generator=g).tolist() for i in range(6)]
    common = dict(max_tokens=24, dtype="bfloat16", prompt_logprobs=True, skip_tokenizer_init=True,
                  max_model_len=1024, gpu_memory_utilization=0.5, prompt_token_ids=short)
    # prompt log-probs would bypass the prefix cache: greedy margins only
    chunked = {"prompt_token_ids": long_prompts, "enable_prefix_caching": True, "max_num_batched_tokens": 128,
               "prompt_logprobs": False}
    results: dict = {"device": torch.cuda.get_device_name(0), "cases": {}}
    l7 = LLAMA2_7B
    paper_cfg = llama_config(l7["hidden"], l7["heads"], l7["kv_heads"], l7["head_dim"], 2, 4096, l7["intermediate"])
    gqa_cfg, rope_dim, d_kv = PARITY_CASES["gqa_d128"]
    cases = {
        "llama2_7b_shaped_1024": (
            "llama2_1024", paper_cfg,
            ConvertOptions(rope_dim=16, strategy="uniform", d_kv=16, dtype="bfloat16", layout="exact"),
            [("mha2mla_auto", {}), ("mha2mla_fp8kv", {"kv_cache_dtype": "fp8"}),
             ("mha2mla_chunked_prefix_cached", chunked)]),
        "gqa_d128_576_forced": (
            "gqa576", gqa_cfg, ConvertOptions(rope_dim=rope_dim, strategy="uniform", d_kv=d_kv, dtype="bfloat16"),
            [("mha2mla_CUSTOM", {"attention_backend": "CUSTOM"}),
             ("mha2mla_CUSTOM_chunked_prefix_cached", {"attention_backend": "CUSTOM", **chunked})]),
    }
    for case, (name, cfg, options, variants) in cases.items():
        if case in only:
            src = save_random_llama(tmp / f"{name}_src", cfg)
            results["cases"][case] = _parity_case(tmp, name, src, options, variants, common)
            _save(out_file, results)
    return results


def smollm2(out_file: Path, gguf: Path) -> dict:
    """The demo's real model (SmolLM2-135M-Instruct, from the GGUF ``mha2mla demo`` uses),
    converted as the demo does (2-norm, aw-joint, exact layout: 192 values), on the plugin
    backend, teacher-forced against the float32 reference on held-out text."""
    from transformers import AutoTokenizer

    tmp = Path(tempfile.mkdtemp())
    src = tmp / "smollm2_src"
    src.mkdir()
    _dequantize_to_folder(gguf.parent, gguf.name, src)
    calib, held_out = split_text(shared_text_path().read_text())
    calib_file = tmp / "calib.txt"
    calib_file.write_text(calib)
    ids = AutoTokenizer.from_pretrained(str(src))(held_out, add_special_tokens=False).input_ids
    short = held_out_prompts(ids)
    long_prompts = [ids[:200] + ids[1000 + 400 * i : 1000 + 400 * i + 150 + 60 * i] for i in range(6)]
    options = ConvertOptions(rope_dim=32, strategy="2-norm", d_kv=32, svd="aw-joint", calib_text=calib_file,
                             calib_tokens=8192, layout="exact", dtype="bfloat16")
    common = dict(max_tokens=24, dtype="bfloat16", prompt_logprobs=True, max_model_len=1024,
                  gpu_memory_utilization=0.5, prompt_token_ids=short)
    chunked = {"prompt_token_ids": long_prompts, "enable_prefix_caching": True, "max_num_batched_tokens": 128,
               "prompt_logprobs": False}
    results = {"device": torch.cuda.get_device_name(0), "cases": {"smollm2_135m_192": _parity_case(
        tmp, "smollm2", src, options, [("mha2mla_auto", {}), ("mha2mla_chunked_prefix_cached", chunked)], common)}}
    _save(out_file, results)
    return results


# -- throughput ------------------------------------------------------------------------------------
def throughput(out_file: Path, which: str = "576", num_prompts: int = 256, prompt_len: int = 1024,
               out_len: int = 256) -> dict:
    tmp = Path(tempfile.mkdtemp())
    l7 = LLAMA2_7B
    llama = llama_config(l7["hidden"], l7["heads"], l7["kv_heads"], l7["head_dim"], 32, l7["vocab"], l7["intermediate"])
    base = write_config_only(tmp / "llama", llama)
    native = write_config_only(tmp / "mla576", mla_config_for(base, rope_dim=8, d_kv=10))
    paper = write_config_only(tmp / "mla1024", mla_config_for(base, rope_dim=16, d_kv=16, cache_size=None))
    prompts = [torch.randint(3, 32000, (prompt_len,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(num_prompts)]
    results: dict = {"workload": {"num_prompts": num_prompts, "prompt_len": prompt_len, "output_len": out_len,
                                  "model": "dummy-weight Llama-2-7B shapes, 32 layers, bf16"}, "runs": {}}
    runs = {"576": [("576_mha2mla_backend", native, "CUSTOM"), ("576_vllm_FLASHMLA", native, "FLASHMLA"),
                    ("576_vllm_TRITON_MLA", native, "TRITON_MLA")],
            "1024": [("1024_mha2mla_backend", paper, None), ("llama_mha", base, None)]}[which]
    for name, folder, backend in runs:
        req = EngineRequest(model=str(folder), prompt_token_ids=prompts, max_tokens=out_len, dtype="bfloat16",
                            load_format="dummy", skip_tokenizer_init=True, max_model_len=prompt_len + out_len + 16,
                            timed_repeats=1, max_num_seqs=num_prompts, gpu_memory_utilization=0.9,
                            attention_backend=backend)
        t0 = time.time()
        try:
            run = run_engine_in_subprocess(req)
        except RuntimeError as exc:
            results["runs"][name] = {"error": str(exc)[-2500:]}
            print(name, results["runs"][name]["error"], flush=True)
            continue
        results["runs"][name] = {k: run.get(k) for k in ("attention_backends", "kv_cache_tokens", "output_tokens_per_s",
                                                          "timed_runs", "init_seconds", "device", "vllm_version")}
        results["runs"][name]["wall_seconds"] = time.time() - t0
        _save(out_file, results)
        print(name, json.dumps(results["runs"][name]), flush=True)
    r = {k: v for k, v in results["runs"].items() if "error" not in v}
    ratios = {}
    if "576_mha2mla_backend" in r:
        natives = [r[k]["output_tokens_per_s"] for k in ("576_vllm_FLASHMLA", "576_vllm_TRITON_MLA") if k in r]
        if natives:
            ratios["576_plugin_vs_best_native_tokens_per_s"] = r["576_mha2mla_backend"]["output_tokens_per_s"] / max(natives)
    if "1024_mha2mla_backend" in r and "llama_mha" in r:
        ratios["1024_vs_mha_tokens_per_s"] = r["1024_mha2mla_backend"]["output_tokens_per_s"] / r["llama_mha"]["output_tokens_per_s"]
        ratios["1024_vs_mha_kv_capacity"] = r["1024_mha2mla_backend"]["kv_cache_tokens"] / r["llama_mha"]["kv_cache_tokens"]
    results["ratios"] = ratios
    _save(out_file, results)
    print(json.dumps(ratios), flush=True)
    return results


if __name__ == "__main__":
    args = cli_args(__doc__, min_args=2)
    mode, out = args[0], Path(args[1])
    if mode.startswith("throughput"):
        throughput(out, which=mode.removeprefix("throughput"))
    elif mode == "parity576":
        parity(out, only=("gqa_d128_576_forced",))
    elif mode == "parity1024":
        parity(out, only=("llama2_7b_shaped_1024",))
    elif mode == "smollm2":
        smollm2(out, Path(cli_args(__doc__, min_args=3)[2]))
    elif mode == "parity":
        parity(out)
    else:
        raise SystemExit(f"unknown mode {mode!r} (kernel, kerneltimings, kernelcheck: "
                         f"benchmarks.kernels.anyshape_kernels)\n{__doc__}")

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
  int4:       the 4-bit latent cache on the GPU backend (issue 33: ``--kv-cache-dtype int4_per_token_head``, the
              plugin's CacheQuant(4, 8, 64) rows; Triton write and decode, CUDA graphs and torch.compile on): a
              small non-native exact checkpoint (random weights, 4 layers, 12 heads of 64, 288-value rows) served
              in bf16 on short prompts and on chunked prefill + prefix caching (shared 200-token prefix,
              128-token steps), its greedy tokens compared with the float64 reference under
              ``set_cache_quant(..., CacheQuant(4, 8, 64))`` (exact agreement and teacher-forced margins, beside a
              bf16 ``auto`` engine against the plain reference), and its KV capacity against that engine's at the
              same KV memory (expected: bf16 row bytes / ``RowLayout.row_bytes``).

The kernels alone (decode/prefill correctness, decode timings against FlashMLA and Triton MLA) are
``benchmarks.kernels.anyshape_kernels``.

Usage (GPU): python -m benchmarks.end_to_end.gpu_anyshape MODE OUT.json [GGUF]
  The int4 check on the lent GPU machine (vLLM 0.26, torch 2.11; repository root, as benchmarks/results/
  h100-anyshape/README.md): build the bundle here with ../shared/device/build-vllm-gpu-bundle.sh, carry its parts
  (.gpu-bundle/p0 ... one call each), then in one call
    source /root/gpu-env.sh && python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . && \
    PYTHONPATH=/tmp/site:$PYTHONPATH python3 -m benchmarks.end_to_end.gpu_anyshape int4 $OUT/int4.json
  (five small engines and two float64 references: minutes on one H100; it prints and saves "checks",
  "all_ok": true = pass; a failed engine's error is kept in its run and its checks are false).
Results: benchmarks/README.md lists the folders this script wrote.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (PARITY_CASES, cli_args, held_out_prompts, llama_config, mla_config_for, random_prompts,
                               save_random_llama, score_runs, teacher_forced, write_config_only)
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


# -- the 4-bit latent cache ----------------------------------------------------------------------------
INT4 = "int4_per_token_head"


def _greedy_agreement(reference, prompts: list[list[int]], outputs: list[dict], max_tokens: int) -> dict:
    """How many of each engine sequence's greedy tokens equal the reference's own greedy continuation (up to the
    first difference: after it the two continue from different text)."""
    agree, equal = [], 0
    for prompt, out in zip(prompts, outputs):
        want = reference.greedy_generate(torch.tensor([prompt], device="cuda"), max_tokens)[0].tolist()
        got = out["token_ids"]
        n = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        agree.append(n)
        equal += int(got == want[:len(got)])
    return {"sequences_equal": equal, "sequences": len(prompts), "tokens_before_first_difference": agree}


def int4_cache(out_file: Path) -> dict:
    """The ``int4`` mode (module docstring). Checks: the layers decode through the low-bit Triton kernel with the
    row's bytes, the cache tensors are uint8 rows of ``RowLayout.row_bytes``, chunked prefill and prefix caching
    ran (cached tokens), each int4 run's teacher-forced margin and prompt log-prob error against the quantized
    reference are within what the bf16 ``auto`` engine shows against the plain one (2x + 0.02, as ``_judge``), and
    the capacity ratio is the row bytes' ratio within 3%. Greedy agreement is reported, not judged: bf16 engines
    flip near-tied tokens of a random-weight model (the CPU engine in float32 equals the float64 reference token
    for token: tests/test_vllm_plugin.py)."""
    from conversion.mla_format.cache_quant import CacheQuant
    from conversion.mla_format.layout import MLALayout
    from conversion.reference_model import set_cache_quant
    from vllm_mha2mla.backend_selection import cache_row_layout

    tmp = Path(tempfile.mkdtemp())
    cfg, _, _ = PARITY_CASES["mha_d64"]  # hidden 768, 12 heads of 64 (MHA), 4 layers, vocab 4096
    src = save_random_llama(tmp / "src", cfg)
    mla = tmp / "mla_exact"
    convert(src, mla, ConvertOptions(rope_dim=8, strategy="uniform", d_kv=16, dtype="bfloat16", layout="exact"),
            show_progress=False)
    layout = MLALayout.from_dict(json.loads((mla / "config.json").read_text())["mha2mla"]["layout"])
    row = cache_row_layout(layout, INT4)
    bf16_row_bytes = 2 * layout.cache_values
    short = random_prompts(8, 4096)
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(3, 4096, (200,), generator=g).tolist()
    long_prompts = [shared + torch.randint(3, 4096, (150 + 60 * i,), generator=g).tolist() for i in range(6)]
    common = dict(model=str(mla), max_tokens=24, dtype="bfloat16", skip_tokenizer_init=True, max_model_len=1024,
                  gpu_memory_utilization=0.5, kv_cache_memory_bytes=256 << 20)
    plain_short = dict(prompt_token_ids=short, prompt_logprobs=True)
    chunked = dict(prompt_token_ids=long_prompts, enable_prefix_caching=True, enable_chunked_prefill=True,
                   max_num_batched_tokens=128)
    variants = {"bf16_auto": plain_short, "int4": {**plain_short, "kv_cache_dtype": INT4},
                "bf16_auto_chunked_prefix_cached": chunked, "int4_chunked_prefix_cached": {**chunked,
                                                                                             "kv_cache_dtype": INT4},
                "int4_eager": {**plain_short, "kv_cache_dtype": INT4, "enforce_eager": True}}
    runs: dict = {}
    for key, extra in variants.items():
        t0 = time.time()
        try:
            runs[key] = run_engine_in_subprocess(EngineRequest(**common, **extra))
            runs[key]["wall_seconds"] = time.time() - t0
        except RuntimeError as exc:
            runs[key] = {"error": str(exc)[-2500:]}
            print(key, runs[key]["error"], flush=True)
    plain = load_reference(mla, dtype=torch.float64).cuda()
    quant = set_cache_quant(load_reference(mla, dtype=torch.float64).cuda(), CacheQuant(4, 8, 64))
    scored: dict = {}
    for key, run in runs.items():
        if "error" in run:
            scored[key] = run
            continue
        prompts = [o["prompt_token_ids"] for o in run["outputs"]]
        entry = {"backends": run["attention_backends"], "kv_cache_tokens": run["kv_cache_tokens"],
                 "kv_cache_widths": run["kv_cache_widths"], "scheduling": run["scheduling"],
                 "cached_tokens": sum(o["num_cached_tokens"] or 0 for o in run["outputs"]),
                 "wall_seconds": run.get("wall_seconds")}
        refs = {"quantized": quant, "plain": plain} if "int4" in key else {"plain": plain}
        for name, ref in refs.items():
            entry[f"vs_{name}_reference"] = {**teacher_forced(ref, prompts, run["outputs"], "cuda"),
                                             **_greedy_agreement(ref, prompts, run["outputs"], 24)}
        scored[key] = entry
    checks: dict = {}
    ok = {k: v for k, v in scored.items() if "error" not in v}
    decode_name = f"decode:triton_low_bit({INT4}, {row.row_bytes} B/row)"
    for key in ("int4", "int4_chunked_prefix_cached", "int4_eager"):
        if key not in ok:
            checks[f"{key}_ran"] = False
            continue
        run, base = ok[key], ok.get(key.replace("int4", "bf16_auto").replace("_eager", ""))
        checks[f"{key}_low_bit_kernels"] = decode_name in run["backends"] and "CUSTOM" in run["backends"]
        checks[f"{key}_row_bytes"] = run["kv_cache_widths"] == [row.row_bytes] * cfg["num_hidden_layers"]
        if base is not None:
            mine, theirs = run["vs_quantized_reference"], base["vs_plain_reference"]
            checks[f"{key}_margin"] = mine["max_margin"] <= 2 * theirs["max_margin"] + 0.02
            if mine["max_prompt_logprob_error"] is not None and theirs["max_prompt_logprob_error"] is not None:
                checks[f"{key}_prompt_logprobs"] = (mine["max_prompt_logprob_error"]
                                                    <= 2 * theirs["max_prompt_logprob_error"] + 0.02)
    if "int4_chunked_prefix_cached" in ok:
        checks["int4_chunked_prefix_cached_hit_the_cache"] = ok["int4_chunked_prefix_cached"]["cached_tokens"] >= 128
    capacity = None
    if "int4" in ok and "bf16_auto" in ok:
        capacity = {"int4_tokens": ok["int4"]["kv_cache_tokens"], "bf16_tokens": ok["bf16_auto"]["kv_cache_tokens"],
                    "measured_ratio": ok["int4"]["kv_cache_tokens"] / ok["bf16_auto"]["kv_cache_tokens"],
                    "expected_ratio": bf16_row_bytes / row.row_bytes, "bf16_row_bytes": bf16_row_bytes,
                    "int4_row_bytes": row.row_bytes}
        checks["capacity_follows_row_bytes"] = abs(capacity["measured_ratio"] / capacity["expected_ratio"] - 1) < 0.03
    results = {"device": torch.cuda.get_device_name(0), "layout": layout.to_dict(),
               "row": {"latent": row.latent, "rope": row.rope, "row_bytes": row.row_bytes, "format": str(row.fmt)},
               "runs": scored, "capacity": capacity, "checks": checks, "all_ok": bool(checks) and all(checks.values())}
    _save(out_file, results)
    print(json.dumps({"checks": checks, "capacity": capacity,
                      "greedy": {k: v.get("vs_quantized_reference", v.get("vs_plain_reference", v)).get(
                          "tokens_before_first_difference") if "error" not in v else v["error"][-300:]
                          for k, v in scored.items()}}, indent=1), flush=True)
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
    elif mode == "int4":
        int4_cache(out)
    else:
        raise SystemExit(f"unknown mode {mode!r} (kernel, kerneltimings, kernelcheck: "
                         f"benchmarks.kernels.anyshape_kernels)\n{__doc__}")

"""GPU checks of the vLLM plugin on native MLA shapes: do converted checkpoints that fit vLLM's own
576-value MLA row serve as the float32 reference computes them, on each of vLLM's MLA backends, and
how fast against vLLM's own DeepSeek-V2 model class and the MHA original? (Issue: vLLM plugin.)

  parity:     bf16 engines (CUDA graphs + torch.compile on) per MLA backend vs the float32
              reference model; fp8 KV cache. Random-weight models (no data on the GPU host).
  throughput: dummy-weight Llama-2-7B-shaped engines: our MHA2MLAForCausalLM vs vLLM's
              DeepseekV2ForCausalLM on the same MLA shapes vs the MHA original (LlamaForCausalLM).
              (``mha2mla bench`` is the throughput suite; this mode came before it.)
  tp2:        parity with tensor parallel 2 (2 GPUs): heads split, latent replicated.

Greedy decoding in bf16 flips near-tied tokens, so parity is judged teacher-forced: every
token vLLM chose must be within ``margin`` of the reference's best logit, and prompt
log-probabilities must be as close to float32 as vLLM's own bf16 Llama path is (2× + 0.02).

Usage (GPU): python -m benchmarks.end_to_end.gpu_plugin {parity,throughput,tp2} OUT.json
Results: benchmarks/README.md lists the folders this script wrote.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (PARITY_CASES, cli_args, llama_config, mla_config_for, random_prompts,
                               save_random_llama, score_runs, write_config_only)
from conversion import ConvertOptions, convert, load_reference
from vllm_mha2mla.tools.runner import EngineRequest, run_engine_in_subprocess

PARITY_BACKENDS = {"gqa_d128": [None, "FLASHMLA", "FLASH_ATTN_MLA", "TRITON_MLA"]}


def parity(out_file: Path, tensor_parallel_size: int = 1, only: tuple[str, ...] | None = None) -> dict:
    tmp = Path(tempfile.mkdtemp())
    cases = {k: v for k, v in PARITY_CASES.items() if only is None or k in only}
    backends = PARITY_BACKENDS if tensor_parallel_size == 1 else {}
    prompts = random_prompts(8, 4096)
    results: dict = {"cases": {}, "tensor_parallel_size": tensor_parallel_size}
    for name, (cfg, rope_dim, d_kv) in cases.items():
        src = save_random_llama(tmp / f"{name}_src", cfg)
        mla = tmp / f"{name}_mla"
        convert(src, mla, ConvertOptions(rope_dim=rope_dim, strategy="uniform", d_kv=d_kv, dtype="bfloat16"),
                show_progress=False)
        common = dict(prompt_token_ids=prompts, max_tokens=32, dtype="bfloat16", prompt_logprobs=True,
                      skip_tokenizer_init=True, max_model_len=1024, gpu_memory_utilization=0.5,
                      tensor_parallel_size=tensor_parallel_size)
        runs = {"baseline_llama": run_engine_in_subprocess(EngineRequest(model=str(src), **common))}
        variants = [(f"mla_{b or 'auto'}", {"attention_backend": b}) for b in backends.get(name, [None])]
        if name == "gqa_d128" and tensor_parallel_size == 1:
            variants.append(("mla_auto_fp8kv", {"kv_cache_dtype": "fp8"}))
        for key, extra in variants:
            try:
                runs[key] = run_engine_in_subprocess(EngineRequest(model=str(mla), **common, **extra))
            except RuntimeError as exc:
                runs[key] = {"error": str(exc)[-1500:]}
        from transformers import AutoModelForCausalLM

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        original = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).to(device).eval()
        reference = load_reference(mla).to(device)
        case: dict = {"rope_dim": rope_dim, "d_kv": d_kv, "runs": {}}
        case["runs"] = score_runs(runs, original, reference, device)
        base = case["runs"]["baseline_llama"]
        for key, r in case["runs"].items():
            if key != "baseline_llama" and "error" not in r:
                r["ok"] = (r["max_prompt_logprob_error"] <= 2 * base["max_prompt_logprob_error"] + 0.02
                           and r["max_margin"] <= 2 * base["max_margin"] + 0.02) if "fp8" not in key else None
        results["cases"][name] = case
        del original, reference
        torch.cuda.empty_cache()
        out_file.write_text(json.dumps(results, indent=2))
        print(json.dumps({name: {k: {kk: v.get(kk) for kk in ("backends", "ok", "max_margin",
                                                             "max_prompt_logprob_error", "error")}
                                 for k, v in case["runs"].items()}}, indent=1), flush=True)
    return results


def throughput(out_file: Path, num_prompts: int = 256, prompt_len: int = 512, out_len: int = 256) -> dict:
    tmp = Path(tempfile.mkdtemp())
    llama = llama_config(4096, 32, 32, 128, 32, 32000, 11008)
    base = write_config_only(tmp / "llama", llama)
    mla_cfg = mla_config_for(base, rope_dim=8, d_kv=10)  # the method doc's 576-value Llama-2-7B
    ours = write_config_only(tmp / "mha2mla", mla_cfg)
    deepseek = write_config_only(tmp / "deepseek", {**mla_cfg, "architectures": ["DeepseekV2ForCausalLM"]})
    prompts = [torch.randint(3, 32000, (prompt_len,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(num_prompts)]
    results: dict = {"workload": {"num_prompts": num_prompts, "prompt_len": prompt_len, "output_len": out_len},
                     "runs": {}}
    for name, folder in (("mha2mla", ours), ("deepseek_v2", deepseek), ("llama_mha", base)):
        req = EngineRequest(model=str(folder), prompt_token_ids=prompts, max_tokens=out_len, dtype="bfloat16",
                            load_format="dummy", skip_tokenizer_init=True, max_model_len=2048,
                            timed_repeats=3, max_num_seqs=num_prompts, gpu_memory_utilization=0.9)
        t0 = time.time()
        run = run_engine_in_subprocess(req)
        results["runs"][name] = {k: run[k] for k in ("attention_backends", "kv_cache_tokens", "output_tokens_per_s",
                                                      "timed_runs", "init_seconds", "device", "vllm_version")}
        results["runs"][name]["wall_seconds"] = time.time() - t0
        out_file.write_text(json.dumps(results, indent=2))
        print(name, json.dumps(results["runs"][name]), flush=True)
    r = results["runs"]
    results["ratios"] = {
        "mha2mla_vs_deepseek_tokens_per_s": r["mha2mla"]["output_tokens_per_s"] / r["deepseek_v2"]["output_tokens_per_s"],
        "mha2mla_vs_llama_tokens_per_s": r["mha2mla"]["output_tokens_per_s"] / r["llama_mha"]["output_tokens_per_s"],
        "mha2mla_vs_llama_kv_capacity": r["mha2mla"]["kv_cache_tokens"] / r["llama_mha"]["kv_cache_tokens"],
    }
    out_file.write_text(json.dumps(results, indent=2))
    print(json.dumps(results["ratios"]), flush=True)
    return results


if __name__ == "__main__":
    mode, out = cli_args(__doc__, min_args=2)[:2]
    out = Path(out)
    if mode == "tp2":  # heads split over 2 GPUs, latent replicated
        parity(out, tensor_parallel_size=2, only=("gqa_d128", "mha_d64"))
    else:
        {"parity": parity, "throughput": throughput}[mode](out)

"""GPU checks of the vLLM plugin on native MLA shapes (issue: vLLM plugin).

  parity:     bf16 engines (CUDA graphs + torch.compile on) per MLA backend vs the float32
              reference model; fp8 KV cache. Random-weight models (no data on the GPU host).
  throughput: dummy-weight Llama-2-7B-shaped engines: our MHA2MLAForCausalLM vs vLLM's
              DeepseekV2ForCausalLM on the same MLA shapes vs the MHA original (LlamaForCausalLM).

Usage: python benchmarks/gpu_plugin.py {parity,throughput,tp2} OUT.json  (tp2: 2 GPUs)
Greedy decoding in bf16 flips near-tied tokens, so parity is judged teacher-forced: every
token vLLM chose must be within ``margin`` of the reference's best logit, and prompt
log-probabilities must be as close to float32 as vLLM's own bf16 Llama path is (2× + 0.02).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.synthetic import llama_config, mla_config_for, save_random_llama, write_config_only  # noqa: E402
from conversion import ConvertOptions, convert, load_reference  # noqa: E402
from vllm_mha2mla.runner import EngineRequest, run_engine_in_subprocess  # noqa: E402


def _prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (8 + 7 * i,), generator=g).tolist() for i in range(n)]


@torch.no_grad()
def _teacher_forced(model, prompts, outputs, device) -> dict:
    """Worst logit margin of vLLM's greedy tokens and worst prompt-logprob error."""
    margins, lp_errors, exact = [], [], 0
    for prompt, out in zip(prompts, outputs):
        seq = prompt + out["token_ids"]
        logits = model(torch.tensor([seq], device=device)).logits[0].float()
        gen = logits[len(prompt) - 1 : len(seq) - 1]
        chosen = gen.gather(1, torch.tensor(out["token_ids"], device=device)[:, None])[:, 0]
        margins.append(float((gen.max(-1).values - chosen).max()))
        exact += int(bool((gen.argmax(-1).cpu() == torch.tensor(out["token_ids"])).all()))
        if out.get("prompt_logprobs"):
            logp = logits.log_softmax(-1)
            want = [float(logp[t - 1, prompt[t]]) for t in range(1, len(prompt))]
            errors = [abs(a - b) for a, b in zip(want, out["prompt_logprobs"][1:])]
            worst = max(range(len(errors)), key=errors.__getitem__)
            lp_errors.append((errors[worst], 1 + worst))  # (error, index of that prompt token)
    max_error, worst_position = max(lp_errors) if lp_errors else (None, None)
    return {"max_margin": max(margins), "max_prompt_logprob_error": max_error,
            "worst_prompt_logprob_position": worst_position,
            "sequences_exactly_greedy": exact, "sequences": len(prompts)}


def score_runs(runs: dict, original, reference, device) -> dict:
    """Each engine run scored teacher-forced: ``baseline_llama`` against the original
    model, every other run against the MHA2MLA reference; failed runs kept as they are."""
    scored = {}
    for key, run in runs.items():
        if "error" in run:
            scored[key] = run
            continue
        model = original if key == "baseline_llama" else reference
        settings = {k: v for k, v in run["request"].items() if v is not None and k in
                    ("attention_backend", "kv_cache_dtype", "enable_prefix_caching", "max_num_batched_tokens")}
        scored[key] = {"backends": run["attention_backends"], "kv_cache_tokens": run["kv_cache_tokens"],
                       "settings": settings,
                       **_teacher_forced(model, [o["prompt_token_ids"] for o in run["outputs"]], run["outputs"],
                                         device)}
    return scored


PARITY_CASES = {
    # name: (llama config, rope_dim, d_kv); each fills a 576-value cache
    "gqa_d128": (llama_config(2048, 16, 4, 128, 4, 4096, 5632), 32, 112),
    "mha_d128": (llama_config(2048, 16, 16, 128, 4, 4096, 5632), 16, 20),
    "mha_d64": (llama_config(768, 12, 12, 64, 4, 4096, 2048), 8, 40),
}
PARITY_BACKENDS = {"gqa_d128": [None, "FLASHMLA", "FLASH_ATTN_MLA", "TRITON_MLA"]}


def parity(out_file: Path, tensor_parallel_size: int = 1, only: tuple[str, ...] | None = None) -> dict:
    tmp = Path(tempfile.mkdtemp())
    cases = {k: v for k, v in PARITY_CASES.items() if only is None or k in only}
    backends = PARITY_BACKENDS if tensor_parallel_size == 1 else {}
    prompts = _prompts(8, 4096)
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
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "tp2":  # heads split over 2 GPUs, latent replicated
        parity(out, tensor_parallel_size=2, only=("gqa_d128", "mha_d64"))
    else:
        {"parity": parity, "throughput": throughput}[mode](out)

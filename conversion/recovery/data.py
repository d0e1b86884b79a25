"""Training data for recovery: reading text, packing it into token windows, caching the tokens.

Recovery trains on fixed-length windows of token ids. Documents are tokenized without
special tokens, joined with one EOS after each document (so the model sees document
boundaries the way it did in pre-training) and cut into ``[n, seq_len]`` windows; the last
partial window is dropped rather than padded, so every position is a real training target.

Tokenizing millions of tokens is the slow part on a CPU, so the windows are cached as one
``.npy`` file per (tokenizer, text, seq_len, token budget) under ``<cache>/tokens/`` and read
back memory-mapped: a second run, or a second stage of the same run, starts at once and never
holds the whole array in RAM.

Held-out text is chosen by content hash (:func:`is_held_out`), the same rule as the default
corpus, so the split is reproducible and never depends on file order.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from conversion.calibration import default_cache_dir
from conversion.errors import ConversionError
from conversion.recovery.corpus import is_held_out, load_default_corpus
from conversion.text_data import split_text

__all__ = [
    "TEXT_SUFFIXES",
    "SCHEDULE_ORDERS",
    "ScheduledBatches",
    "TokenWindows",
    "build_token_windows",
    "collate_windows",
    "default_training_data",
    "is_held_out",
    "pack_documents",
    "read_documents",
    "split_documents",
    "step_lengths",
    "text_windows",
    "user_training_data",
]

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
DEFAULT_HELD_OUT_TOKENS = 262_144
_TOKENIZE_BATCH = 256  # documents per tokenizer call: large enough for the Rust batch path


# ----------------------------------------------------------------------------- reading text

def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConversionError(
            f"{path} is not UTF-8 text ({exc}); convert it to UTF-8 or leave it out of --data"
        ) from exc
    except OSError as exc:
        raise ConversionError(f"{path} could not be read ({exc})") from exc


def _jsonl_documents(path: Path) -> list[str]:
    docs: list[str] = []
    # split("\n"), not splitlines(): JSON strings may legally hold U+2028 and other separators.
    for lineno, line in enumerate(_read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise ConversionError(
                f"{path}:{lineno}: not valid JSON ({exc}); each line of a .jsonl file must be one JSON "
                'object with a "text" field'
            ) from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ConversionError(
                f'{path}:{lineno}: no "text" string field; each line of a .jsonl file must be one JSON '
                'object such as {"text": "..."}'
            )
        docs.append(obj["text"])
    return docs


def _files_in(folder: Path) -> list[Path]:
    """Supported files below ``folder`` in sorted order, skipping hidden files and folders."""
    files = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        hidden = any(part.startswith(".") for part in rel.parts)
        if path.is_file() and path.suffix.lower() in TEXT_SUFFIXES and not hidden:
            files.append(path)
    return sorted(files)


def read_documents(paths: Sequence[Path] | Path) -> list[str]:
    """Documents from ``.txt``/``.md`` files (one document per file), ``.jsonl`` files (one
    ``{"text": ...}`` object per line) and folders (searched recursively, files sorted).

    Empty (whitespace-only) documents are skipped; the text itself is kept unchanged.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise ConversionError("no training data given: pass --data with .txt/.md/.jsonl files or folders")
    suffixes = ", ".join(TEXT_SUFFIXES)
    docs: list[str] = []
    for path in paths:
        if not path.exists():
            raise ConversionError(f"{path} does not exist: --data takes {suffixes} files or folders of them")
        if path.is_dir():
            files = _files_in(path)
            if not files:
                raise ConversionError(f"no text found in {path}: the folder holds no {suffixes} files")
        elif path.suffix.lower() in TEXT_SUFFIXES:
            files = [path]
        else:
            raise ConversionError(
                f"{path}: unsupported file type {path.suffix!r}; --data takes {suffixes} files or folders"
            )
        for file in files:
            texts = _jsonl_documents(file) if file.suffix.lower() == ".jsonl" else [_read_utf8(file)]
            docs.extend(t for t in texts if t.strip())
    if not docs:
        raise ConversionError(f"no text found in {', '.join(map(str, paths))}: every document is empty")
    return docs


def split_documents(
    documents: Sequence[str], held_out_fraction: float = 0.05
) -> tuple[list[str], list[str]]:
    """(train, held_out) for user documents; deterministic and disjoint.

    Rule: a document is held out iff :func:`is_held_out` with modulus
    ``round(1 / held_out_fraction)`` (the corpus's content-hash rule). Hashing leaves one side
    empty when there are few documents; then the last ``max(1, round(n * fraction))``
    documents (at most ``n - 1``) are held out instead. A single document is cut by
    characters: its last ``held_out_fraction``, starting at a line break, is held out.
    """
    if not 0 < held_out_fraction < 1:
        raise ConversionError(
            f"held_out_fraction must be between 0 and 1 (exclusive), got {held_out_fraction}"
        )
    docs = list(documents)
    if not docs:
        raise ConversionError("no documents to split into training and held-out text")
    if len(docs) == 1:
        train, held = split_text(docs[0], held_out_fraction)
        return [train], [held]
    modulus = max(1, round(1 / held_out_fraction))
    flags = [is_held_out(d, modulus) for d in docs]
    train = [d for d, f in zip(docs, flags) if not f]
    held = [d for d, f in zip(docs, flags) if f]
    if not train or not held:
        k = min(len(docs) - 1, max(1, round(len(docs) * held_out_fraction)))
        train, held = docs[:-k], docs[-k:]
    return train, held


# ----------------------------------------------------------------------------- packing

def pack_documents(token_lists: Iterable[Sequence[int]], seq_len: int, eos_id: int) -> np.ndarray:
    """``[n, seq_len]`` int32 windows of the documents' tokens, ``eos_id`` after each document.

    The stream is cut without regard to document boundaries (windows may start mid-document,
    as in pre-training); the final ``len % seq_len`` tokens are dropped, never padded.
    """
    if seq_len < 1:
        raise ConversionError(f"seq_len must be >= 1, got {seq_len}")
    eos = np.array([eos_id], dtype=np.int32)
    parts: list[np.ndarray] = []
    for tokens in token_lists:
        parts.append(np.asarray(tokens, dtype=np.int32).reshape(-1))
        parts.append(eos)
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    n = len(stream) // seq_len
    return np.ascontiguousarray(stream[: n * seq_len].reshape(n, seq_len))


class TokenWindows(Dataset):
    """A memory-mapped ``[n, seq_len]`` array of token windows as a map-style dataset.

    Items are ``{"input_ids", "labels"}`` LongTensors of length ``seq_len`` with labels equal
    to the inputs: Hugging Face causal LMs shift the labels themselves.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._data = self._open()

    def _open(self) -> np.ndarray:
        data = np.load(self.path, mmap_mode="r")
        if data.ndim != 2 or not np.issubdtype(data.dtype, np.integer):
            raise ConversionError(
                f"{self.path} is not a [n, seq_len] integer token array (shape {data.shape}, {data.dtype}); "
                "delete it so it is rebuilt"
            )
        return data

    def __getstate__(self) -> dict:  # DataLoader workers re-open the memory map instead of copying it
        state = dict(self.__dict__)
        state.pop("_data")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._data = self._open()

    @property
    def seq_len(self) -> int:
        return int(self._data.shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self._data.shape[0] * self._data.shape[1])

    def __len__(self) -> int:
        return int(self._data.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.array(self._data[index], dtype=np.int64))
        return {"input_ids": ids, "labels": ids.clone()}

    def __repr__(self) -> str:
        return f"TokenWindows({len(self)} x {self.seq_len} tokens, {self.path})"


SCHEDULE_ORDERS = ("phases", "interleaved")


def step_lengths(steps: Sequence[int], order: str = "phases") -> list[int]:
    """Which phase each optimizer step trains on, given each phase's ``steps``: ``phases`` runs them
    one after the other; ``interleaved`` spreads them evenly, every step going to the phase furthest
    behind its share, so that any prefix of the run (one cut short by ``--max-minutes``) holds each
    phase within one step of its share."""
    if order not in SCHEDULE_ORDERS:
        raise ConversionError(f"schedule order must be one of {', '.join(SCHEDULE_ORDERS)}, got {order!r}")
    if order == "phases":
        return [k for k, n in enumerate(steps) for _ in range(n)]
    total, done, plan = sum(steps), [0] * len(steps), []
    for s in range(total):
        k = max((k for k in range(len(steps)) if done[k] < steps[k]),
                key=lambda k: (steps[k] * (s + 1) / total - done[k], -k))
        done[k] += 1
        plan.append(k)
    return plan


class ScheduledBatches(Dataset):
    """The micro-batches of a sequence-length schedule, in training order (one item per micro-step).

    Each of ``phases`` (:class:`conversion.recovery.global_stage.Phase`: ``seq_len``, ``steps``,
    ``batch``) trains ``steps`` optimizer steps on ``datasets[k]`` (windows of its length), read in a
    shuffle seeded by ``seed`` and the phase (cycled, reshuffled, when the phase needs more windows
    than there are) and cut into micro-batches of ``batch`` windows: ``{"input_ids", "labels"}`` of
    shape ``[batch, seq_len]``, ``tokens_per_micro_batch`` tokens every one. ``order`` places the
    phases' steps (:func:`step_lengths`). The order depends on nothing but the arguments, so a
    resumed run that skips the first k items sees what the uninterrupted run saw. Under ``torchrun``
    process r reads items r, r + world, ...: an optimizer step's ``grad_accum * world`` items are
    consecutive and of one phase.
    """

    def __init__(self, phases, datasets, grad_accum: int = 1, world: int = 1, seed: int = 0,
                 order: str = "phases"):
        if len(phases) != len(datasets):
            raise ValueError(f"{len(phases)} phases but {len(datasets)} datasets")
        self.phases, self.order = list(phases), order
        sizes = {p.batch * p.seq_len for p in self.phases}
        if len(sizes) != 1:
            raise ConversionError(f"the schedule's micro-batches differ in tokens ({sorted(sizes)})")
        self.tokens_per_micro_batch = sizes.pop()
        self.per_step = grad_accum * world
        self.seq_len = max(p.seq_len for p in self.phases)
        self.steps = step_lengths([p.steps for p in self.phases], order)
        self._datasets, self._orders = [], []
        for k, (phase, data) in enumerate(zip(self.phases, datasets)):
            need = phase.steps * self.per_step * phase.batch
            if need and (data is None or len(data) == 0):
                raise ConversionError(f"no training windows of {phase.seq_len} tokens for its phase")
            if need and data[0]["input_ids"].numel() != phase.seq_len:
                raise ValueError(f"phase {k}: windows of {data[0]['input_ids'].numel()} tokens, not {phase.seq_len}")
            rng = np.random.default_rng([seed, k])
            epochs = -(-need // len(data)) if need else 0
            order_k = [rng.permutation(len(data)) for _ in range(epochs)]
            self._datasets.append(data)
            self._orders.append(np.concatenate(order_k)[:need] if order_k else np.zeros(0, dtype=np.int64))
        # the phase-local micro-batch of every optimizer step's first item
        seen = [0] * len(self.phases)
        self._step_first = []
        for k in self.steps:
            self._step_first.append(seen[k])
            seen[k] += self.per_step

    @property
    def tokens_per_step(self) -> int:
        return self.tokens_per_micro_batch * self.per_step

    def phase_of(self, index: int) -> int:
        """Index of the phase that item ``index`` belongs to."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.steps[index // self.per_step]

    def seq_len_at_step(self, step: int) -> int:
        """Window length of optimizer step ``step`` (0-based)."""
        return self.phases[self.steps[step]].seq_len

    def tokens_by_seq_len(self, steps_done: int) -> dict[str, int]:
        """Tokens trained at each window length after the first ``steps_done`` optimizer steps."""
        out = {str(p.seq_len): 0 for p in self.phases}
        for k in self.steps[:steps_done]:
            out[str(self.phases[k].seq_len)] += self.tokens_per_step
        return out

    def repeats(self, phase: int) -> float:
        """How many times the phase reads its windows over (1.0: each once)."""
        return len(self._orders[phase]) / max(1, len(self._datasets[phase]))

    def __len__(self) -> int:
        return len(self.steps) * self.per_step

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        k = self.phase_of(index)
        batch = self.phases[k].batch
        j = self._step_first[index // self.per_step] + index % self.per_step
        rows = [self._datasets[k][int(i)]["input_ids"] for i in self._orders[k][j * batch: (j + 1) * batch]]
        ids = torch.stack(rows)
        return {"input_ids": ids, "labels": ids.clone()}


def collate_windows(items: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Batches ``{"input_ids", "labels"}`` items along the first dimension: single windows
    (``[seq_len]``) are stacked, whole micro-batches (``[b, seq_len]``, :class:`ScheduledBatches`)
    concatenated."""
    return {key: torch.cat([item[key] if item[key].dim() == 2 else item[key][None] for item in items])
            for key in items[0]}


# ----------------------------------------------------------------------------- tokenizing + cache

def tokenizer_identity(tokenizer) -> bytes:
    """What determines the token ids, independent of where the tokenizer was loaded from.

    A fast tokenizer is identified by its serialised pipeline (vocab, merges, normalizer,
    pre-tokenizer, added tokens) without its transient truncation/padding state, which
    tokenizer calls switch on and off; a slow one by its full vocabulary.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        ident = json.dumps(spec, sort_keys=True)
    else:
        ident = json.dumps(sorted(tokenizer.get_vocab().items()))
    return f"{len(tokenizer)}\n{ident}".encode()


def _cache_key(tokenizer, documents: Sequence[str], seq_len: int, max_tokens: int | None, eos_id: int) -> str:
    h = hashlib.sha256()
    h.update(tokenizer_identity(tokenizer))
    h.update(f"\nseq_len={seq_len} max_tokens={max_tokens} eos={eos_id} docs={len(documents)}\n".encode())
    for doc in documents:
        data = doc.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))  # length prefix: ["ab", "c"] != ["a", "bc"]
        h.update(data)
    return h.hexdigest()[:20]


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ConversionError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', '') or 'the model'} has no EOS token, "
            "which training needs between documents; set eos_token in its tokenizer_config.json"
        )
    return int(eos)


def _save_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build_token_windows(
    tokenizer,
    documents: Sequence[str],
    seq_len: int,
    cache_dir: Path | None = None,
    name: str = "data",
    max_tokens: int | None = None,
    show_progress: bool = True,
) -> TokenWindows:
    """Token windows of ``documents`` (see :func:`pack_documents`), cached on disk.

    Tokenizing stops once ``max_tokens`` tokens are available, so a small budget over a large
    corpus only tokenizes a prefix. The cache file ``<cache>/tokens/<name>-<key>.npy`` is keyed
    by the tokenizer's identity, the documents' text, ``seq_len``, ``max_tokens`` and the EOS
    id; with the same inputs a later call memory-maps it without tokenizing anything.
    """
    if seq_len < 2:
        raise ConversionError(f"seq_len must be at least 2 tokens to train on, got {seq_len}")
    if max_tokens is not None and max_tokens < 1:
        raise ConversionError(f"the token budget for {name} must be positive, got {max_tokens}")
    eos_id = _eos_id(tokenizer)
    key = _cache_key(tokenizer, documents, seq_len, max_tokens, eos_id)
    path = (cache_dir or default_cache_dir()) / "tokens" / f"{name}-{key}.npy"
    if path.is_file():
        return TokenWindows(path)

    arrays: list[np.ndarray] = []
    total = 0  # tokens including one EOS per document
    with tqdm(total=len(documents), unit="doc", desc=f"tokenizing {name}", disable=not show_progress) as bar:
        for start in range(0, len(documents), _TOKENIZE_BATCH):
            batch = list(documents[start: start + _TOKENIZE_BATCH])
            ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
            for tokens in ids:
                arrays.append(np.asarray(tokens, dtype=np.int32))
                total += len(tokens) + 1
            bar.update(len(batch))
            if max_tokens is not None and total >= max_tokens:
                break
    windows = pack_documents(arrays, seq_len, eos_id)
    if max_tokens is not None:
        windows = windows[: max_tokens // seq_len]
    if len(windows) == 0:
        budget = f" (budget {max_tokens} tokens)" if max_tokens is not None else ""
        raise ConversionError(
            f"{name}: {len(documents)} documents give {total} tokens including one EOS per document{budget}, "
            f"fewer than one window of seq_len={seq_len}; give more text or a shorter sequence length"
        )
    _save_atomic(path, windows)
    return TokenWindows(path)


def text_windows(tokenizer, text: str, seq_len: int, max_tokens: int | None = None) -> list[list[int]]:
    """One text cut into non-overlapping full windows of ``seq_len`` token ids (no EOS, no
    special tokens), at most ``max_tokens // seq_len`` of them; the remainder is dropped.

    Meant for perplexity on a long running text such as the out-of-domain essays.
    """
    if seq_len < 2:
        raise ConversionError(f"seq_len must be at least 2 tokens, got {seq_len}")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n = len(ids) // seq_len
    if max_tokens is not None:
        n = min(n, max_tokens // seq_len)
    if n == 0:
        raise ConversionError(
            f"the text gives {len(ids)} tokens, fewer than one window of seq_len={seq_len}"
            + (f" within max_tokens={max_tokens}" if max_tokens is not None else "")
            + "; give a longer text or a shorter sequence length"
        )
    return [list(ids[i * seq_len: (i + 1) * seq_len]) for i in range(n)]


# ----------------------------------------------------------------------------- entry points

def default_training_data(
    tokenizer,
    seq_len: int,
    cache_dir: Path | None = None,
    max_train_tokens: int | None = None,
    held_out_tokens: int | None = DEFAULT_HELD_OUT_TOKENS,
    show_progress: bool = True,
) -> tuple[TokenWindows, TokenWindows]:
    """(train, held_out) windows of the default corpus (downloaded on first use).

    The held-out windows are capped at ``held_out_tokens`` so evaluation cost stays fixed.
    """
    corpus = load_default_corpus(cache_dir)
    train = build_token_windows(tokenizer, corpus.train, seq_len, cache_dir, name="default-train",
                                max_tokens=max_train_tokens, show_progress=show_progress)
    held = build_token_windows(tokenizer, corpus.held_out, seq_len, cache_dir, name="default-held-out",
                               max_tokens=held_out_tokens, show_progress=show_progress)
    return train, held


def user_training_data(
    tokenizer,
    paths: Sequence[Path] | Path,
    seq_len: int,
    cache_dir: Path | None = None,
    max_train_tokens: int | None = None,
    held_out_fraction: float = 0.05,
    held_out_tokens: int | None = DEFAULT_HELD_OUT_TOKENS,
    show_progress: bool = True,
) -> tuple[TokenWindows, TokenWindows]:
    """(train, held_out) windows of the user's text (``--data``); split by :func:`split_documents`."""
    train_docs, held_docs = split_documents(read_documents(paths), held_out_fraction)
    train = build_token_windows(tokenizer, train_docs, seq_len, cache_dir, name="user-train",
                                max_tokens=max_train_tokens, show_progress=show_progress)
    held = build_token_windows(tokenizer, held_docs, seq_len, cache_dir, name="user-held-out",
                               max_tokens=held_out_tokens, show_progress=show_progress)
    return train, held

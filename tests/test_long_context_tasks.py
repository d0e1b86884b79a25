"""``mha2mla eval --tasks long``'s RULER-style tasks (niah_multikey, niah_multivalue, variable_tracking,
longqa) without an engine: each prompt fills its length with the fact at its depth, is the same for a
seed, scores a copying "model" 100% and a wrong one 0%; longqa shows only held-out text. And the
needle-attention study (``benchmarks/studies/needle_attention.py``): the attention mass it reads out
of the models' attention calls, and a run on a tiny original/converted pair."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from conversion import ConvertOptions, convert
from conversion.recovery.chat_data import load_training_questions
from conversion.recovery.corpus import ensure_default_corpus, is_held_out, load_default_corpus, split_key
from conversion.text_data import shared_text_path, split_text
from tests.helpers import TinySpec
from vllm_mha2mla.tools.evaluation import EvaluationError
from vllm_mha2mla.tools.evaluation import long_context as lc
from vllm_mha2mla.tools.evaluation import longqa
from vllm_mha2mla.tools.evaluation.tasks import GROUPS, TASKS, Settings, Tokenizer, resolve_tasks

LENGTHS, DEPTHS = (1024, 2048), (0.0, 0.25, 0.5, 0.75, 1.0)
NEW_TASKS = ("niah_multikey", "niah_multivalue", "variable_tracking", "longqa")
QA_LENGTHS = (2048, 4096)
"""The tiny models' tokenizer (512 tokens) spends ~2.5 tokens a word: a 1K prompt holds two or three
paragraphs besides the gold ones, too few to place them at a depth."""


@pytest.fixture(scope="module")
def tok(tiny_model_factory):
    from transformers import AutoTokenizer

    return Tokenizer(AutoTokenizer.from_pretrained(str(tiny_model_factory(TinySpec()))))


@pytest.fixture(scope="module")
def corpus(corpus_cache):
    return load_default_corpus(corpus_cache)


@pytest.fixture(scope="module")
def questions(corpus_cache):
    return longqa.load_questions(ensure_default_corpus(corpus_cache))


@pytest.fixture(scope="module")
def haystack(corpus):
    """The essays' first 4,000 sentences (~100K tokens): tokenizing all 30,000 takes seconds per build."""
    return lc.essay_sentences(corpus.out_of_domain[0])[:4000]


def _build(name, tok, haystack, questions, corpus, depths=DEPTHS, per_cell=1, seed=0):
    if name == "variable_tracking":
        return lc.variable_tracking_items(tok.encode, LENGTHS, depths, per_cell, seed)
    if name == "longqa":
        return longqa.longqa_items(tok.encode, questions, corpus.held_out, QA_LENGTHS, depths, per_cell, seed)
    lengths = LENGTHS
    build = {"niah_multikey": lc.niah_multikey_items, "niah_multivalue": lc.niah_multivalue_items}[name]
    return build(tok.encode, haystack, lengths, depths, per_cell, seed)


@pytest.fixture(scope="module")
def built(tok, haystack, questions, corpus):
    tok.warm([" " + s for s in haystack] + [longqa.unit_text(d) for d in corpus.held_out])  # as the tasks do
    yield {name: _build(name, tok, haystack, questions, corpus) for name in NEW_TASKS}
    tok.forget()


_OTHER_NEEDLES = {  # the needles other than the fact, removed before the fact's depth is measured
    "niah_multikey": r"One of the special magic numbers for [a-z-]+ is: \d+\.",
    "niah_multivalue": r"One of the special magic numbers for [a-z-]+ is: \d+\.",
    "variable_tracking": r"VAR [A-Z]{5} = (?:VAR [A-Z]{5}|\d+)\.",
}


def _body(name: str, text: str) -> tuple[int, int]:
    """Characters of the haystack (filler and needles) between the prompt's instructions and its question."""
    if name == "longqa":
        start = text.index("The following are given documents.\n\n") + len("The following are given documents.\n\n")
        return start, text.rindex(f"\n\n{longqa.INSTRUCTION}")
    return text.index("\n") + 1, text.rindex("\n")


# --- the prompts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NEW_TASKS)
def test_prompts_fill_the_length_with_the_fact_at_the_depth(name, built, tok, haystack):
    items = built[name]
    assert [(i.length, i.depth) for i in items] == [(n, d) for n in (QA_LENGTHS if name == "longqa" else LENGTHS)
                                                    for d in DEPTHS]
    errors = []
    for item in items:
        size, room = len(item.request.token_ids), item.request.max_tokens
        text = tok.decode(item.request.token_ids)
        assert text.count(item.fact) == 1, name
        # the depth: the fact's token position within the haystack, the other needles taken out
        if name in _OTHER_NEEDLES:
            text = re.sub(" ?" + _OTHER_NEEDLES[name], lambda m: m.group(0) if item.fact in m.group(0) else "", text)
        start, end = _body(name, text)
        at = text.index(item.fact)
        position = len(tok.encode(text[start:at]))
        hay = len(tok.encode(text[start:end])) - len(tok.encode(item.fact))
        # the fact goes between two filler units (sentences, paragraphs): within one unit of its depth
        fillers = text[start:end].replace(item.fact, "")
        units = (re.split(r"\n\nDocument \d+:\n", fillers) if name == "longqa" else [lc.PASSKEY_FILLER]
                 if name == "variable_tracking" else lc.essay_sentences(fillers))
        unit = max(len(tok.encode(u)) for u in units)
        # the length: prompt + answer room fills it, short by less than the next filler unit (the essays'
        # next sentence; longqa scans every paragraph for one that still fits)
        following = haystack[haystack.index(units[-1]) + 1] if name.startswith("niah") else ""
        slack = max(80, len(tok.encode(" " + following)))
        assert item.length - room - slack <= size <= item.length - room, (name, item.length, size, slack)
        errors.append(abs(position / hay - item.depth))
        assert errors[-1] <= unit / hay + 0.01, (name, item.length, item.depth, position / hay, unit / hay)
    assert sum(errors) / len(errors) < 0.05, errors  # and on average much closer


@pytest.mark.parametrize("name", NEW_TASKS)
def test_prompts_are_the_same_for_a_seed(name, built, tok, haystack, questions, corpus):
    again = _build(name, tok, haystack, questions, corpus)
    assert [i.request for i in again] == [i.request for i in built[name]]
    other = _build(name, tok, haystack, questions, corpus, seed=1)
    assert [i.request for i in other] != [i.request for i in built[name]]
    assert len({i.answer for i in built[name]}) >= len(built[name]) // 2  # the values vary between prompts


def test_multi_needle_prompts_hold_every_needle(built, tok):
    for item in built["niah_multikey"]:
        text = tok.decode(item.request.token_ids)
        assert len(item.distractors) == lc.MULTIKEY_NEEDLES - 1 and item.answer not in item.distractors
        assert all(text.count(f"is: {v}.") == 1 for v in (item.answer, *item.distractors))
        asked = re.search(r"special magic number for ([a-z-]+) mentioned", text).group(1)
        assert f"for {asked} is: {item.answer}." in text and text.count(f"for {asked} is:") == 1
    for item in built["niah_multivalue"]:
        text = tok.decode(item.request.token_ids)
        values = [v for (v,) in item.facts]
        assert len(set(values)) == lc.MULTIVALUE_VALUES and all(text.count(f"is: {v}.") == 1 for v in values)
    for item in built["variable_tracking"]:
        text = tok.decode(item.request.token_ids)
        names = [v for (v,) in item.facts]
        assert len(names) == lc.VT_HOPS + 1 and len(re.findall(r"VAR [A-Z]{5} = ", text)) == lc.VT_CHAINS * len(names)
        value = re.search(r"VAR " + names[0] + r" = (\d+)\.", text).group(1)
        assert f"assigned the value {value} in the text above" in text
        # the chain in order: each hop after the variable it copies
        places = [text.index(f"VAR {n} = ") for n in names]
        assert places == sorted(places)
        assert all(f"VAR {b} = VAR {a}." in text for a, b in zip(names, names[1:]))


# --- scoring --------------------------------------------------------------------------------------

def _right(name: str, item: lc.Item) -> str:
    if name == "longqa":
        return f" The {item.answer.upper()}.\nQuestion: something else"  # case, articles, punctuation: normalised
    return " " + ", ".join(forms[0] for forms in item.facts) + ".\n"


@pytest.mark.parametrize("name", NEW_TASKS)
def test_a_copying_model_scores_100_and_a_wrong_one_0(name, built):
    items = built[name]
    metrics, records = lc.score_items(items, [_right(name, i) for i in items])
    assert metrics["acc"] == 1.0 and all(g["acc"] == 1.0 for g in metrics["grid"]) and metrics["n"] == len(items)
    assert all(r["correct"] for r in records)
    wrong = [f" {i.distractors[0]}" if i.distractors else " 1234 and nothing else" for i in items]
    metrics, records = lc.score_items(items, wrong)
    assert metrics["acc"] == 0.0 and not any(r["correct"] for r in records)
    if name in ("niah_multivalue", "variable_tracking"):
        assert metrics["recall"] == 0.0
        half = [" " + ", ".join(f[0] for f in i.facts[:2]) for i in items]  # 2 of 4 values, 2 of 5 variables
        metrics, records = lc.score_items(items, half)
        assert metrics["acc"] == 0.0 and metrics["recall"] == pytest.approx(2 / len(items[0].facts))
        assert records[0]["found"] == [True, True] + [False] * (len(items[0].facts) - 2)
    if name == "niah_multikey":
        assert metrics["wrong_needle"] == 1.0 and all(r["wrong_needle"] for r in records)
        metrics, _ = lc.score_items(items, [f" {i.answer} or {i.distractors[0]}" for i in items])
        assert metrics["acc"] == 1.0 and metrics["wrong_needle"] == 0.0  # RULER's rule: the asked value present


def test_longqa_matching_is_normalised_whole_words_in_the_whole_answer():
    item = lc.Item(1024, 0.5, "the Battle of Gettysburg", None, expected=(("the Battle of Gettysburg", "Gettysburg"),),
                   normalise=True)
    assert lc.found(item, " Gettysburg!") == [True]
    assert lc.found(item, "\n  battle of gettysburg, in 1863") == [True]
    assert lc.found(item, " The answer to the question is:\n\nGettysburg") == [True]  # a chat model's preamble
    assert lc.found(item, " I do not know.") == [False]
    assert lc.found(item, " Gettysburgh") == [False]  # whole words
    yes = lc.Item(1024, 0.5, "yes", None, expected=(("yes",),), normalise=True)
    assert lc.found(yes, " Yes.") == [True] and lc.found(yes, " yesterday") == [False]


# --- longqa: held-out text only -------------------------------------------------------------------

def test_longqa_uses_only_held_out_questions_and_paragraphs(questions, corpus, corpus_cache, tok):
    training = load_training_questions(corpus_cache)
    trained_questions = {q.question for q in training}
    trained_paragraphs = {p for q in training for p in q.paragraphs} | set(corpus.train)
    held = set(corpus.held_out)
    assert len(questions) >= 100 and {q.source for q in questions} == {"hotpotqa", "squad"}
    for q in questions:
        assert q.question not in trained_questions
        assert all(is_held_out(split_key(g)) and g in held and g not in trained_paragraphs for g in q.gold), q.question
    # the task as `mha2mla eval` builds it: every question asked and every document shown is held out
    settings = Settings(max_model_len=4096, lengths=QA_LENGTHS, per_cell=4, cache_dir=corpus_cache)
    prepared = TASKS["longqa"].prepare(tok, settings)
    assert len(prepared.requests) == 2 * len(DEPTHS) * 4
    asked = set()
    by_question = {q.question: q for q in questions}
    for request in prepared.requests:
        text = tok.decode(request.token_ids)
        question = text[text.rindex("Question: ") + len("Question: "):text.rindex(" Answer:")]
        assert question in by_question and question not in trained_questions
        asked.add(question)
        body = text[text.index("The following are given documents.\n\n"):text.rindex(f"\n\n{longqa.INSTRUCTION}")]
        documents = re.split(r"(?:^|\n\n)Document \d+:\n", body)[1:]
        assert len(documents) >= 3 and all(d in held and d not in trained_paragraphs for d in documents)
        assert all(g in documents for g in by_question[question].gold)
    assert len(asked) == len(DEPTHS) * 4  # the same questions at every length, different ones by depth


def test_longqa_reads_a_chat_models_prompt_in_its_chat_template(tiny_model_factory, corpus_cache):
    """A tokenizer with a chat template gets the RULER text as its user turn (an instruct model given the bare
    base template ends its turn at once), the template's tokens counted against the length; the same
    questions as the base form, and the notes say which form was used."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_model_factory(TinySpec())))
    hf.chat_template = ("{% for m in messages %}<|turn|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|turn|>assistant\n{% endif %}")
    settings = Settings(max_model_len=4096, lengths=QA_LENGTHS, per_cell=1, cache_dir=corpus_cache)
    chat = TASKS["longqa"].prepare(Tokenizer(hf), settings)
    hf.chat_template = None
    base = TASKS["longqa"].prepare(Tokenizer(hf), settings)
    assert any("chat template" in n for n in chat.notes) and any("base template" in n for n in base.notes)
    assert len(chat.requests) == len(base.requests) == len(QA_LENGTHS) * len(DEPTHS)
    for c, b, length in zip(chat.requests, base.requests, [n for n in QA_LENGTHS for _ in DEPTHS]):
        text, plain = hf.decode(c.token_ids), hf.decode(b.token_ids)
        assert text.startswith("<|turn|>user\n" + longqa.INSTRUCTION) and text.endswith(" Answer:<|end|>\n<|turn|>assistant\n")
        assert not plain.startswith("<|turn|>")
        question = lambda t: t[t.rindex("Question: "):t.rindex(" Answer:")]  # noqa: E731
        assert question(text) == question(plain)
        assert len(c.token_ids) + c.max_tokens <= length and len(b.token_ids) + b.max_tokens <= length


# --- the task table -------------------------------------------------------------------------------

def test_long_group_holds_the_new_tasks_and_all_is_unchanged():
    assert GROUPS["long"] == ["passkey", "niah", *NEW_TASKS]
    assert GROUPS["all"] == GROUPS["mc"] + GROUPS["ppl"] + GROUPS["long"]
    assert [t.name for t in resolve_tasks("long")] == GROUPS["long"]
    assert all(TASKS[n].kind == "long_context" for n in NEW_TASKS)


@pytest.mark.parametrize("name", ["niah_multikey", "niah_multivalue", "variable_tracking"])
def test_prepare_respects_lengths_limit_and_scores_decoded_answers(name, tok, corpus_cache, haystack, monkeypatch):
    from vllm_mha2mla.tools.evaluation import tasks

    monkeypatch.setattr(tasks, "_haystack", lambda settings: haystack)
    settings = Settings(max_model_len=1024, lengths=(512, 1024, 2048), per_cell=3, cache_dir=corpus_cache, seed=2)
    prepared = TASKS[name].prepare(tok, settings)
    assert len(prepared.requests) == 2 * len(DEPTHS) * 3 and any("skipped" in n for n in prepared.notes)
    assert all(len(r.token_ids) + r.max_tokens <= 1024 for r in prepared.requests)
    limited = TASKS[name].prepare(tok, Settings(max_model_len=1024, lengths=(512, 1024), limit=10,
                                                cache_dir=corpus_cache, seed=2))
    assert len(limited.requests) == 10  # one prompt per cell
    with pytest.raises(EvaluationError, match=f"{name}: lengths \\[128\\] cannot hold"):
        TASKS[name].prepare(tok, Settings(max_model_len=1024, lengths=(128,), per_cell=1, cache_dir=corpus_cache))
    again = TASKS[name].prepare(tok, settings)
    assert again.requests == prepared.requests
    # the answers come back as token ids and are decoded before scoring
    texts = [tok.decode(r.token_ids) for r in prepared.requests]
    if name == "variable_tracking":
        answers = [re.findall(r"VAR ([A-Z]{5}) = ", t) for t in texts]
        value = [re.search(r"assigned the value (\d+) in", t).group(1) for t in texts]
        chains = [[n for n in a if _chain_value(t, n) == v] for a, t, v in zip(answers, texts, value)]
        outputs = [tok.encode(" " + ", ".join(c)) for c in chains]
    else:
        keys = [re.search(r"special magic numbers? for ([a-z-]+) mentioned", t).group(1) for t in texts]
        outputs = [tok.encode(" " + ", ".join(re.findall(f"for {k} is: (\\d+)", t))) for k, t in zip(keys, texts)]
    metrics, _ = prepared.score(outputs)
    assert metrics["acc"] == 1.0 and metrics["n"] == len(prepared.requests)


def _chain_value(text: str, name: str) -> str:
    """The value a variable holds, following its chain of assignments back."""
    while True:
        rhs = re.search(f"VAR {name} = (VAR ([A-Z]{{5}})|\\d+)\\.", text)
        if rhs.group(2) is None:
            return rhs.group(1)
        name = rhs.group(2)


def test_report_shows_the_new_metrics_and_draws_every_long_task(tmp_path):
    from vllm_mha2mla.tools.evaluation import report

    def result(acc, wrong):
        grid = [{"length": n, "depth": d, "acc": acc, "n": 1} for n in (1024, 2048) for d in (0.0, 1.0)]
        tasks = {"niah_multikey": {"acc": acc, "wrong_needle": wrong, "n": 4, "grid": grid},
                 "longqa": {"acc": acc, "n": 4, "grid": grid}}
        return {"tasks": tasks, "throughput": {"items": 8, "seconds": 1.0, "items_per_s": 8.0,
                                               "items_per_s_per_engine": 8.0, "prompt_tokens_per_s": 1000.0},
                "engine": {"num_replicas": 1, "replicas": [{"device": "cpu"}]}}

    summary = {"models": ["original", "converted"],
               "tasks": {"niah_multikey": {"kind": "long_context", "metrics": ["acc", "wrong_needle"]},
                         "longqa": {"kind": "long_context", "metrics": ["acc"]}},
               "results": {"original": result(0.75, 0.0), "converted": result(0.25, 0.5)}}
    table = report.markdown_table(summary)
    assert "| niah_multikey | wrong_needle (%) ↓ | 4 | 0.0 | 50.0 (+50.0) |" in table
    assert "| longqa | acc (%) | 4 | 75.0 | 25.0 (-50.0) |" in table
    pytest.importorskip("matplotlib")
    assert report._plot_heat(summary, tmp_path / "long_context.png") and (tmp_path / "long_context.png").stat().st_size


# --- the needle-attention study -------------------------------------------------------------------

def test_attention_rows_read_a_hand_made_attention_matrix():
    """Keys one-hot and queries log(p) / scale give attention rows equal to p; the captured mass on a
    span is then p summed over the span, through SDPA's causal mask, a boolean mask and grouped keys."""
    from benchmarks.studies.needle_attention import attention_rows, capture, span_mass

    seq, scale = 6, 0.5
    p = torch.tensor([[0.05, 0.10, 0.40, 0.25, 0.15, 0.05],  # row 5: every key visible
                      [0.10, 0.20, 0.30, 0.40, 0.00, 0.00]])  # row 3: keys 0..3
    key = torch.eye(seq)[None, None].expand(1, 2, seq, seq)  # 2 kv-heads
    query = torch.full((1, 4, seq, seq), -30.0)  # 4 query heads: grouped
    query[0, :, 5] = torch.log(p[0]) / scale
    query[0, :, 3, :4] = torch.log(p[1, :4]) / scale
    query[0, 1, 5] = torch.log(torch.full((seq,), 1 / seq)) / scale  # head 1 attends evenly
    value = torch.randn(1, 2, seq, 3)
    probs = attention_rows(query, key, [5, 3], is_causal=True, scale=scale)
    assert torch.allclose(probs[0, 0], p, atol=1e-5)
    assert torch.allclose(probs[0, 1, 0], torch.full((seq,), 1 / seq), atol=1e-5)
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()
    assert torch.allclose(attention_rows(query, key, [5, 3], attn_mask=mask, scale=scale), probs, atol=1e-6)
    assert torch.allclose(span_mass(probs[0, 0], [(2, 4)]), torch.tensor([[0.65], [0.70]]))
    with capture([5, 3], [(2, 4), (0, 1)]) as calls:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=True)
    assert F.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"  # restored
    assert torch.allclose(out, F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                                              enable_gqa=True))
    assert len(calls) == 1 and calls[0].shape == (4, 2, 2)
    assert torch.allclose(calls[0][0], torch.tensor([[0.65, 0.05], [0.70, 0.10]]), atol=1e-5)
    assert torch.allclose(calls[0][1, 0], torch.tensor([2 / seq, 1 / seq]), atol=1e-5)


@pytest.mark.parametrize("mask", ["causal", "bool", "float"])
def test_attention_in_query_chunks_equals_one_call(mask, monkeypatch):
    from benchmarks.studies import needle_attention

    monkeypatch.setattr(needle_attention, "QUERY_CHUNK", 3)
    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 4, 10, 8, generator=g), torch.randn(1, 2, 10, 8, generator=g),
                         torch.randn(1, 2, 10, 5, generator=g))
    tril = torch.ones(10, 10, dtype=torch.bool).tril()
    kw = {"causal": {"is_causal": True}, "bool": {"attn_mask": tril[None, None]},
          "float": {"attn_mask": torch.zeros(1, 1, 10, 10).masked_fill(~tril, float("-inf"))}}[mask]
    want = F.scaled_dot_product_attention(query, key, value, enable_gqa=True, **kw)
    got = needle_attention.chunked_sdpa(F.scaled_dot_product_attention, query, key, value, enable_gqa=True, **kw)
    assert torch.allclose(got, want, atol=1e-6)


def test_captured_mass_equals_eager_output_attentions(tiny_model_factory, monkeypatch):
    """On a real (tiny, grouped-query) Llama: the rows captured from its SDPA calls are those of the
    full attention matrices that eager attention returns, and the model computes what it does
    without the capture (its attention run in query chunks)."""
    from transformers import AutoModelForCausalLM

    from benchmarks.studies import needle_attention
    from benchmarks.studies.needle_attention import capture

    monkeypatch.setattr(needle_attention, "QUERY_CHUNK", 16)

    src = tiny_model_factory(TinySpec())
    ids = torch.randint(2, 500, (1, 40), generator=torch.Generator().manual_seed(0))
    eager = AutoModelForCausalLM.from_pretrained(str(src), attn_implementation="eager").eval()
    with torch.no_grad():
        full = eager(ids, output_attentions=True).attentions  # per layer [1, heads, 40, 40]
    sdpa = AutoModelForCausalLM.from_pretrained(str(src), attn_implementation="sdpa").eval()
    with torch.no_grad(), capture([39, 20], [(5, 12), (0, 40)]) as calls:
        hidden = sdpa.model(input_ids=ids).last_hidden_state
    with torch.no_grad():
        assert torch.allclose(hidden, sdpa.model(input_ids=ids).last_hidden_state, atol=1e-5)
    assert len(calls) == len(full) == TinySpec().num_layers
    for layer, attn in enumerate(full):
        want = torch.stack([attn[0, :, [39, 20], 5:12].sum(-1), attn[0, :, [39, 20], :].sum(-1)], dim=-1)
        assert torch.allclose(calls[layer], want, atol=1e-5), layer


@pytest.mark.slow
def test_needle_attention_script_runs_on_a_tiny_pair(tiny_model_factory, tmp_path, capsys):
    from benchmarks.studies import needle_attention

    src = tiny_model_factory(TinySpec())
    convert(src, tmp_path / "mla", ConvertOptions(rope_dim=16, strategy="uniform", d_kv=32, dtype="float32",
                                                  layout="exact"), show_progress=False)
    text = tmp_path / "haystack.txt"
    text.write_text(split_text(shared_text_path().read_text())[0][:200_000])
    out = tmp_path / "out"
    assert needle_attention.main([str(src), str(tmp_path / "mla"), "--lengths", "256,512", "--depths", "0.2,0.8",
                                  "--text", str(text), "--output", str(out), "--top", "5"]) == 0
    summary = json.loads((out / "needle_attention.json").read_text())
    spec = TinySpec()
    assert summary["shape"] == {m: {"layers": spec.num_layers, "heads": spec.num_heads} for m in ("original", "converted")}
    assert len(summary["prompts"]) == 4
    for prompt in summary["prompts"]:
        start, end = prompt["spans"]["needle"]
        v_start, v_end = prompt["spans"]["value"]
        assert 0 < start <= v_start < v_end <= end < prompt["tokens"]
        assert all(math.isfinite(prompt["models"][m]["answer_logprob"]) for m in ("original", "converted"))
    for model in ("original", "converted"):
        for length in ("256", "512"):
            for query in ("last_prompt", "first_answer"):
                mass = torch.tensor(summary["mass"][model][length][query]["needle"])
                assert mass.shape == (spec.num_layers, spec.num_heads) and (mass >= 0).all() and (mass <= 1).all()
                assert (torch.tensor(summary["mass"][model][length][query]["value"]) <= mass + 1e-6).all()
    losses = [r["lost"] for r in summary["top_losses"]]
    assert losses == sorted(losses, reverse=True)
    assert len(losses) == min(needle_attention.TOP_KEPT, 2 * 2 * spec.num_layers * spec.num_heads)  # lengths × queries
    assert (out / "needle_attention.png").stat().st_size > 0
    assert "heads that lose the most attention mass" in capsys.readouterr().out


# --- through `mha2mla eval` (engines faked) -------------------------------------------------------

class _Oracle:
    """Answers like an engine: reads each prompt and names what it hides (``longqa``: the question's gold
    answer); ``forget_after`` tokens: answers 'no idea' to longer prompts (a model that breaks there)."""

    def __init__(self, tok: Tokenizer, questions, forget_after: int | None = None):
        self.tok, self.forget_after = tok, forget_after
        self.gold = {q.question: q.answers[0] for q in questions}
        self.replicas = [{"device": "cpu", "attention_backends": []}]

    def answer(self, text: str) -> str:
        if "Find all variables" in text:
            value = re.search(r"assigned the value (\d+) in", text).group(1)
            return " " + ", ".join(n for n in re.findall(r"VAR ([A-Z]{5}) = ", text) if _chain_value(text, n) == value)
        if longqa.INSTRUCTION in text:  # the RULER text, in the tokenizer's chat template if it has one
            return " " + self.gold[text[text.rindex("Question: ") + len("Question: "):text.rindex(" Answer:")]]
        if "What is the pass key?" in text:
            return " " + re.search(r"The pass key is (\d+)\.", text).group(1)
        key = re.search(r"special magic numbers? for ([a-z-]+) mentioned", text).group(1)
        return " " + ", ".join(re.findall(f"for {key} is: (\\d+)", text))

    def run(self, requests, chunk_size, progress):
        progress(len(requests))
        return [tuple(self.tok.encode(" no idea" if self.forget_after and len(r.token_ids) > self.forget_after
                                      else self.answer(self.tok.decode(r.token_ids)))) for r in requests]

    def close(self):
        pass


def test_eval_long_scores_reports_and_draws_every_long_task(tiny_model_factory, tok, questions, corpus_cache,
                                                            tmp_path, monkeypatch):
    """``--tasks long`` through ``evaluate``: a model that reads every prompt right scores 100% on all six
    tasks, one that fails past 600 tokens 100% at 512 and 0% at 1024; results.md has the new metrics' rows,
    the item files the facts found, long_context.png a row per task."""
    import shutil

    from vllm_mha2mla.tools.evaluation import evaluate as ev
    from vllm_mha2mla.tools.evaluation.evaluate import EvalOptions

    src = tiny_model_factory(TinySpec())  # 1,024 positions
    for name in ("original", "converted"):
        shutil.copytree(src, tmp_path / name)
    monkeypatch.setenv("MHA2MLA_CACHE", str(corpus_cache))
    monkeypatch.setattr(ev, "start_executor", lambda model, *a, **k: _Oracle(
        tok, questions, 600 if model.endswith("converted") else None))
    out = tmp_path / "out"
    summary = ev.evaluate([f"original={tmp_path / 'original'}", f"converted={tmp_path / 'converted'}"], out,
                          EvalOptions(tasks="long", lengths=(512, 1024), per_cell=1, dtype="float32"))
    assert list(summary["tasks"]) == GROUPS["long"]
    for task in GROUPS["long"]:
        original = summary["results"]["original"]["tasks"][task]
        converted = summary["results"]["converted"]["tasks"][task]
        assert original["acc"] == 1.0 and original["n"] == 2 * len(DEPTHS), task
        assert converted["acc_by_length"] == {"512": 1.0, "1024": 0.0}, task
    assert summary["results"]["converted"]["tasks"]["niah_multivalue"]["recall"] == 0.5
    table = (out / "results.md").read_text()
    for row in ["| niah_multikey | wrong_needle (%) ↓ | 10 | 0.0 ± 0.0 | 0.0 (+0.0) |",
                "| niah_multivalue | recall (%) | 10 | 100.0 ± 0.0 | 50.0 (-50.0) |",
                "| variable_tracking | acc (%) | 10 | 100.0 ± 0.0 | 50.0 (-50.0) |",
                "| longqa | acc (%) | 10 | 100.0 ± 0.0 | 50.0 (-50.0) |"]:
        assert row in table, row
    records = [json.loads(ln) for ln in (out / "items" / "converted" / "niah_multivalue.jsonl").read_text().splitlines()]
    assert [r["found"] for r in records[-1:]] == [[False] * lc.MULTIVALUE_VALUES]
    pytest.importorskip("matplotlib")
    assert (out / "results.png").stat().st_size and (out / "long_context.png").stat().st_size

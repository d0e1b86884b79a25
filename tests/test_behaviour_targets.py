"""`benchmarks.studies.behaviour_targets`: issue 31's target figures read off a merged `mha2mla eval` results.json.

The figures people quote (the 8-task MC mean, tasks below the conversion, agreement, perplexity ratios) come from
this script, so its arithmetic and its refusals are checked on results of the shape `mha2mla eval` writes."""

from __future__ import annotations

import json
import random

import pytest

from benchmarks.studies import behaviour_targets as bt


def _tasks(rng: random.Random) -> dict:
    """One model's task entries, as `mha2mla eval` writes them (fractions, not percent)."""
    tasks = {t: {"acc": rng.uniform(0.2, 0.8), "acc_norm": rng.uniform(0.2, 0.8), "n": 100} for t in bt.MC_TASKS}
    tasks["triviaqa"] = {"exact_match": rng.uniform(0, 0.1)}
    tasks["nq_open"] = {"exact_match": rng.uniform(0, 0.05)}
    tasks["agreement"] = {"first_sentence_match": rng.uniform(0, 1), "rouge_l_f1": rng.uniform(0, 1),
                          "non_empty": rng.uniform(0.5, 1), "echoes_system_prompt": 0.0}
    tasks["wikipedia"] = {"token_perplexity": rng.uniform(15, 80)}
    tasks["essays"] = {"token_perplexity": rng.uniform(15, 80)}
    return tasks


def test_target_row_against_the_original_and_the_conversion():
    rng = random.Random(0)
    original, converted, model = _tasks(rng), _tasks(rng), _tasks(rng)
    row = bt.target_row(model, original, converted)
    mean = 100 * sum(model[t]["acc"] for t in bt.MC_TASKS) / 8
    assert row["mc_mean"] == pytest.approx(mean)
    assert row["mc_gap"] == pytest.approx(bt.mc_mean(original) - mean)
    assert row["mc_below_converted"] == [t for t in bt.MC_TASKS if model[t]["acc"] < converted[t]["acc"]]
    assert row["triviaqa_gap"] == pytest.approx(100 * (original["triviaqa"]["exact_match"]
                                                       - model["triviaqa"]["exact_match"]))
    assert row["essays_ppl_ratio"] == pytest.approx(model["essays"]["token_perplexity"]
                                                    / original["essays"]["token_perplexity"])
    assert row["first_sentence_match"] == pytest.approx(100 * model["agreement"]["first_sentence_match"])
    same = bt.target_row(original, original, original)  # the original against itself: no gap anywhere
    assert same["mc_gap"] == 0 and same["mc_below_converted"] == [] and same["wikipedia_ppl_ratio"] == 1


def test_a_missing_multiple_choice_task_is_named_not_averaged_away():
    tasks = _tasks(random.Random(1))
    del tasks["sciq"]
    with pytest.raises(ValueError, match="sciq"):
        bt.mc_mean(tasks)


def test_global_tokens_from_a_report():
    assert bt.global_tokens({"global": {"tokens_per_s": 1000.0, "seconds": 2.5}}) == 2500
    assert bt.global_tokens({"stage": "local"}) is None


def test_cli_writes_the_table_and_refuses_an_unknown_original(tmp_path, capsys):
    rng = random.Random(2)
    results = {label: {"path": f"/x/{label}", "tasks": _tasks(rng)} for label in ("original", "converted", "recovered")}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"models": list(results), "results": results}))
    (tmp_path / "recovered-finetune_report.json").write_text(json.dumps({"global": {"tokens_per_s": 2e4, "seconds": 100}}))
    bt.main([str(path), "--reports", str(tmp_path)])
    written = json.loads((tmp_path / "targets.json").read_text())
    assert written["original_mc_mean"] == pytest.approx(bt.mc_mean(results["original"]["tasks"]))
    assert written["models"]["recovered"]["train_tokens"] == 2_000_000
    assert "mc_below_converted" not in written["models"]["converted"]  # the conversion is not judged against itself
    table = (tmp_path / "targets.md").read_text()
    assert "| recovered | 2.0M |" in table and table in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no model labelled 'base'"):
        bt.main([str(path), "--original", "base"])
    with pytest.raises(SystemExit, match="no results file"):
        bt.main([str(tmp_path / "missing.json")])

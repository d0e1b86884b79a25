"""`benchmarks.studies.long_context_targets`: issue 32's per-length gaps read off a `mha2mla eval --tasks long`
results.json. The figures the results README quotes come from it, so its arithmetic (gap sign, which cells carry a
target) and its refusals are checked on results of the shape `mha2mla eval` writes."""

from __future__ import annotations

import json

import pytest

from benchmarks.studies import long_context_targets as lct


def _task(accs: dict[int, float]) -> dict:
    return {"acc": sum(accs.values()) / len(accs), "n": 5 * len(accs),
            "acc_by_length": {str(n): a for n, a in accs.items()}}


def test_gaps_by_length_and_the_targets_they_meet():
    original = {"passkey": _task({1024: 1.0, 4096: 0.8, 8192: 0.4}), "niah_multikey": _task({1024: 0.7, 8192: 0.5})}
    model = {"passkey": _task({1024: 0.96, 4096: 0.6, 8192: 0.32}), "niah_multikey": _task({1024: 0.3, 8192: 0.5})}
    rows = lct.gap_rows(model, original)
    assert rows["passkey"][1024] == pytest.approx({"acc": 96, "original": 100, "gap": 4, "allowed_gap": 5, "met": True})
    assert rows["passkey"][4096]["gap"] == pytest.approx(20) and rows["passkey"][4096]["met"] is False
    assert rows["passkey"][8192]["gap"] == pytest.approx(8) and rows["passkey"][8192]["met"] is True  # 10 at 8K
    assert "met" not in rows["niah_multikey"][1024]  # no target for the other long tasks
    table = lct.markdown({"recovered": rows}, "original")
    assert "| recovered | 96 (-4) | **60 (-20)** | 32 (-8) |" in table
    assert "| original | 100 | 80 | 40 |" in table


def test_a_length_or_task_the_original_lacks_is_an_error():
    original = {"passkey": _task({1024: 1.0})}
    with pytest.raises(ValueError, match="not evaluated at 2048"):
        lct.gap_rows({"passkey": _task({1024: 1.0, 2048: 1.0})}, original)
    with pytest.raises(ValueError, match="no 'niah'"):
        lct.gap_rows({"niah": _task({1024: 1.0})}, original)


def test_main_writes_targets_with_training_tokens_by_window(tmp_path):
    results = {"results": {"original": {"tasks": {"niah": _task({1024: 1.0, 8192: 0.5})}},
                           "long": {"tasks": {"niah": _task({1024: 1.0, 8192: 0.3})}}}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "long-finetune_report.json").write_text(json.dumps(
        {"global": {"tokens_seen": 300, "tokens_by_seq_len": {"2048": 200, "8192": 100}}}))
    lct.main([str(tmp_path / "results.json"), "--reports", str(tmp_path)])
    written = json.loads((tmp_path / "targets.json").read_text())
    assert written["models"]["long"]["niah"]["8192"]["met"] is False
    assert written["train_tokens_by_seq_len"] == {"long": {"2048": 200, "8192": 100}}
    with pytest.raises(SystemExit, match="no model labelled 'base'"):
        lct.main([str(tmp_path / "results.json"), "--original", "base"])

"""The demo end to end on the real default model (SmolLM2-135M-Instruct from PyPI), short text."""

import json

import pytest
from rich.console import Console

from conversion.default_model import ensure_default_model
from conversion.text_data import shared_text_path
from vllm_mha2mla.demo import DemoOptions, run_demo

pytestmark = pytest.mark.vllm


def test_default_model_is_the_real_smollm2():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_default_model()
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == ("llama", 9, 3)
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_demo_pipeline_writes_summary_table_and_chart(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text(shared_text_path().read_text()[:40_000])
    opts = DemoOptions(out_dir=tmp_path / "demo", text=text, calib_tokens=1024, ppl_tokens=512, ppl_seq_len=256,
                       max_tokens=8, num_prompts=2, enforce_eager=True, kv_cache_memory_bytes=64 << 20)
    out = run_demo(opts, console=Console(quiet=True))
    summary = json.loads((out / "summary.json").read_text())
    orig, conv, ratios = summary["original"], summary["converted"], summary["ratios"]
    assert orig["kv_values_per_token_per_layer"] == 384  # 2 × 3 kv-heads × 64
    assert conv["kv_values_per_token_per_layer"] == 3 * (32 + 32)
    assert ratios["kv_reduction_pct"] == pytest.approx(50.0)
    assert ratios["kv_capacity"] == pytest.approx(ratios["kv_capacity_expected"], rel=0.05)
    assert "CUSTOM" in conv["attention_backends"]  # 192 values: the plugin's backend
    for side in (orig, conv):
        assert side["perplexity"] > 1 and side["output_tokens_per_s"] > 0
    assert orig["perplexity"] < 200  # the real model predicts Shakespeare far better than chance
    assert len(summary["samples"]) == 2 and all(s["original"] for s in summary["samples"])
    assert (out / "chart.png").stat().st_size > 10_000
    assert "| held-out perplexity |" in (out / "summary.md").read_text()

"""The demo end to end on the real default model (SmolLM2-135M-Instruct from PyPI), short text."""

import json
import os

import pytest
from rich.console import Console

from conversion.default_model import ensure_default_model
from conversion.text_data import shared_text_path
from vllm_mha2mla.tools.demo import DemoOptions, default_engine_dtype, run_demo

pytestmark = pytest.mark.vllm


def test_default_model_is_the_real_smollm2(default_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_default_model()
    assert folder == default_model  # found in the cache, not fetched again
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == ("llama", 9, 3)
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_demo_pipeline_writes_summary_table_and_chart(tmp_path, default_model):
    import torch

    text = tmp_path / "short.txt"
    text.write_text(shared_text_path().read_text()[:40_000])
    # The demo's own dtype choice: bf16 checkpoints, engines in float32 on CPUs without native bf16 (where vLLM
    # emulates bf16, ~30 prompt tokens/s for this model on 2 cores) with twice the 64 MiB of KV memory; the bf16
    # engine path has its own tests (test_vllm_plugin's bf16 runs).
    opts = DemoOptions(out_dir=tmp_path / "demo", text=text, calib_tokens=1024, ppl_tokens=512, ppl_seq_len=256,
                       max_tokens=8, num_prompts=2, kv_cache_memory_bytes=64 << 20,
                       local_tokens=2048, local_steps=2, local_seconds=600,  # budget never binding
                       synthesize=1500, synthesis_max_tokens=16,  # a few teacher chats join the local stage
                       finetune_tokens=0)  # the global stage (default 40K tokens, ~6.5 min here): test_recovery's
    out = run_demo(opts, console=Console(quiet=True))
    summary = json.loads((out / "summary.json").read_text())
    orig, conv, rec, ratios = summary["original"], summary["converted"], summary["recovered"], summary["ratios"]
    engine_dtype = default_engine_dtype("bfloat16")
    assert summary["engine_dtype"] == engine_dtype and {orig["dtype"], conv["dtype"], rec["dtype"]} == {engine_dtype}
    assert summary["engine_kv_cache_memory_bytes"] == (128 << 20 if engine_dtype == "float32" else 64 << 20)
    assert summary["engine_enforce_eager"] == (not torch.cuda.is_available())  # eager on a CPU
    assert orig["kv_values_per_token_per_layer"] == 384  # 2 × 3 kv-heads × 64
    assert conv["kv_values_per_token_per_layer"] == rec["kv_values_per_token_per_layer"] == 3 * (32 + 32)
    assert ratios["kv_reduction_pct"] == pytest.approx(50.0)
    assert ratios["kv_capacity"] == pytest.approx(ratios["kv_capacity_expected"], rel=0.05)
    assert rec["kv_cache_tokens"] == conv["kv_cache_tokens"]
    assert "CUSTOM" in conv["attention_backends"] and "CUSTOM" in rec["attention_backends"]
    for side in (orig, conv, rec):
        assert side["perplexity"] > 1 and side["output_tokens_per_s"] > 0
    assert orig["perplexity"] < 200  # the real model predicts Shakespeare far better than chance
    assert rec["perplexity"] < conv["perplexity"]  # even two steps per layer of the local stage help
    assert summary["recovery"]["local"]["steps_per_layer"] == [2] * 30
    assert summary["recovery"]["synthesis"]["kind"] == "chat" and summary["recovery"]["synthesis"]["conversations"] > 0
    assert orig["agrees_with_original"] == sum(1 for s in summary["samples"] if s["original"])
    assert len(summary["samples"]) == 2 and all(s["original"] for s in summary["samples"])
    assert (out / "chart.png").stat().st_size > 10_000
    assert "| held-out perplexity |" in (out / "summary.md").read_text()
    assert (out / "mha2mla-recovered" / "finetune_report.json").is_file()


def test_agreement_counts_samples_that_start_like_the_reference():
    from vllm_mha2mla.tools.demo import agreement

    ref = [[1, 2, 3, 4], [5, 6], []]
    assert agreement(ref, [[1, 2, 3, 9], [5, 6], []], tokens=3) == 2  # an empty reference never counts
    assert agreement(ref, [[1, 2, 9], [5, 6, 7], [1]], tokens=3) == 0  # going on where the reference ended differs


def test_engine_dtype_follows_native_bf16_and_reaches_auto_engines(monkeypatch):
    """float32 engines for bf16 checkpoints where bf16 is emulated, with twice the KV memory (the same tokens);
    engines that ask for ``auto`` (the recovery's teacher chats) get the demo's choice through the environment."""
    import torch

    from vllm_mha2mla.tools import demo
    from vllm_mha2mla.tools.runner import AUTO_DTYPE_ENV, EngineRequest, _engine_kwargs

    for native, want in ((True, ("bfloat16", 256 << 20)), (False, ("float32", 512 << 20))):
        monkeypatch.setattr(demo, "native_bf16", lambda: native)
        assert demo.engine_settings(DemoOptions())[:2] == want
        assert demo.engine_settings(DemoOptions(dtype="float32")).dtype == "float32"
    assert demo.engine_settings(DemoOptions(engine_dtype="bfloat16"))[:2] == ("bfloat16", 256 << 20)
    assert demo.engine_settings(DemoOptions()).enforce_eager == (not torch.cuda.is_available())  # as bench, eval
    assert not demo.engine_settings(DemoOptions(enforce_eager=False)).enforce_eager
    monkeypatch.delenv(AUTO_DTYPE_ENV, raising=False)
    assert _engine_kwargs(EngineRequest(model="m"))["dtype"] == "auto"
    with demo._auto_dtype("float32"):
        assert _engine_kwargs(EngineRequest(model="m"))["dtype"] == "float32"
        assert _engine_kwargs(EngineRequest(model="m", dtype="bfloat16"))["dtype"] == "bfloat16"
    assert AUTO_DTYPE_ENV not in os.environ

"""`mha2mla bench` rows of a low-bit latent cache (issue 33, item 3): the bytes a token's row takes per layer —
codes, scales and minima, per-layer widths averaged — are what the plugin's backend sizes its pages by, and the
expected KV capacity against the original follows those bytes, not values × a nominal bytes-per-value."""

from __future__ import annotations

import json

import pytest

from conversion.mla_format.cache_quant import CacheQuant
from conversion.mla_format.cache_rows import RowLayout
from vllm_mha2mla.tools.bench.folders import low_bit_row_bytes, mla_config_for
from vllm_mha2mla.tools.bench.summary import markdown, row_bytes, with_ratios
from tests.helpers import TinySpec


def test_low_bit_rows_count_their_true_bytes(tiny_model_factory):
    src = tiny_model_factory(TinySpec())
    uniform = mla_config_for(src, rope_dim=8, d_kv=16, cache_size=None)
    kv_heads = json.loads((src / "config.json").read_text())["num_key_value_heads"]  # the original's
    want = RowLayout(CacheQuant(4, 8, 64), kv_heads * 16, kv_heads * 8).row_bytes
    assert low_bit_row_bytes(uniform, "int4_per_token_head") == want
    assert low_bit_row_bytes(uniform, "auto") is None and low_bit_row_bytes(uniform, "fp8") is None
    assert low_bit_row_bytes({"num_hidden_layers": 2}, "int4_per_token_head") is None  # an original
    layers = uniform["num_hidden_layers"]
    widths = [kv_heads * 24 if i % 2 else kv_heads * 8 for i in range(layers)]
    per_layer = mla_config_for(src, rope_dim=8, d_kv=16, cache_size=None, layer_latent=widths)
    assert low_bit_row_bytes(per_layer, "int4_per_token_head") == pytest.approx(
        sum(RowLayout(CacheQuant(4, 8, 64), w, kv_heads * 8).row_bytes for w in widths) / layers)


def test_expected_capacity_and_table_follow_the_row_bytes():
    base = {"device": "CPU", "vllm_version": "0.32.0", "shape": "m", "input_len": 2000, "output_len": 16,
            "num_prompts": 1, "attention_backend": "X", "dtype": "bfloat16"}
    mha = dict(base, variant="mha", cache_values=384, kv_cache_dtype="auto", output_tokens_per_s=10.0,
               kv_capacity_tokens=1000)
    bf16 = dict(base, variant="r32-d32", cache_values=192, kv_cache_dtype="auto", output_tokens_per_s=9.0,
                kv_capacity_tokens=2000)
    int4 = dict(base, variant="r32-d32", cache_values=192, kv_cache_dtype="int4_per_token_head",
                kv_bytes_per_token_layer=148.0, output_tokens_per_s=8.0, kv_capacity_tokens=5100)
    assert row_bytes(mha) == 768 and row_bytes(bf16) == 384 and row_bytes(int4) == 148.0
    by = {r["kv_cache_dtype"]: r for r in with_ratios([mha, bf16, int4]) if r["variant"] != "mha"}
    assert by["int4_per_token_head"]["expected_capacity"] == pytest.approx(768 / 148)
    assert by["int4_per_token_head"]["capacity_vs_mha"] == pytest.approx(5.1)  # against the original, any dtype
    table = markdown({"rows": [mha, bf16, int4], "serving": []})
    assert "| int4_per_token_head | 148 |" in table and "| auto | 384 |" in table

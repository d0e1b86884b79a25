"""A converted folder whose tensors disagree with its config is refused before anything loads,
with the tensor or field named — by the checker and by a vLLM engine starting on it."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from conversion import ConvertOptions, convert
from conversion.errors import ConversionError
from conversion.validate import check_checkpoint
from tests.helpers import TinySpec
from vllm_mha2mla.tools.runner import EngineRequest, run_engine_in_subprocess

LAYER0_KV_A = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"


@pytest.fixture(scope="module")
def good(tiny_model_factory, tmp_path_factory):
    dst = tmp_path_factory.mktemp("validate") / "mla"
    convert(tiny_model_factory(TinySpec()), dst, ConvertOptions(rope_dim=16, d_kv=32, strategy="high",
                                                                dtype="float32"), show_progress=False)
    return dst


def _copy(good, tmp_path, edit_weights=None, edit_config=None):
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    if edit_weights:
        weights = load_file(str(bad / "model.safetensors"))
        edit_weights(weights)
        save_file(weights, str(bad / "model.safetensors"))
    if edit_config:
        config = json.loads((bad / "config.json").read_text())
        edit_config(config)
        (bad / "config.json").write_text(json.dumps(config))
    return bad


def test_a_converted_checkpoint_passes(good):
    check_checkpoint(good)


@pytest.mark.parametrize("edit_weights, edit_config, message", [
    (lambda w: w.pop(LAYER0_KV_A), None, f"missing tensor {LAYER0_KV_A}"),
    (lambda w: w.update({LAYER0_KV_A: w[LAYER0_KV_A][:-1]}), None, f"tensor {LAYER0_KV_A} has shape"),
    (lambda w: w.update({"model.layers.0.self_attn.k_proj.weight": w[LAYER0_KV_A].clone()}), None,
     "unexpected tensor model.layers.0.self_attn.k_proj.weight"),
    (None, lambda c: c.update({"kv_lora_rank": c["kv_lora_rank"] + 8}), "kv_lora_rank is"),
    (None, lambda c: c["mha2mla"]["rope_pairs"].pop(), "rope_pairs has 1 layers"),
    (None, lambda c: c.pop("mha2mla"), "'mha2mla' section is unusable"),
])
def test_disagreements_are_named(good, tmp_path, edit_weights, edit_config, message):
    with pytest.raises(ConversionError, match=message.replace("[", r"\[").replace(".", r"\.")):
        check_checkpoint(_copy(good, tmp_path, edit_weights, edit_config))


def test_a_corrupt_safetensors_file_is_named(good, tmp_path):
    bad = _copy(good, tmp_path)
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ConversionError, match="model.safetensors is not a readable safetensors file"):
        check_checkpoint(bad)


@pytest.mark.vllm
def test_vllm_refuses_a_mis_shaped_checkpoint_at_start(good, tmp_path):
    bad = _copy(good, tmp_path, lambda w: w.update({LAYER0_KV_A: w[LAYER0_KV_A][:-1]}))
    with pytest.raises(RuntimeError, match=f"(?s)MHA2MLA checkpoint check failed.*{LAYER0_KV_A} has shape"):
        run_engine_in_subprocess(EngineRequest(model=str(bad), prompt_token_ids=[[1, 2, 3]], max_tokens=2,
                                               dtype="float32", enforce_eager=True, kv_cache_memory_bytes=32 << 20),
                                 timeout=600)

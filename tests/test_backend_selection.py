"""Which attention backend the model class asks vLLM for (no engine needed)."""

from types import SimpleNamespace

import pytest

from conversion.mla_format.layout import plan_exact_layout, plan_native_layout
from vllm_mha2mla import model as plugin_model


def _config(backend=None):
    return SimpleNamespace(attention_config=SimpleNamespace(backend=backend))


def test_native_shapes_keep_vllm_kernels_unless_asked():
    native = plan_native_layout(8, 8, 64, 16, 56, 576)
    assert plugin_model.select_attention_backend(native, _config()) is None
    chosen = plugin_model.select_attention_backend(native, _config(SimpleNamespace(name="CUSTOM")))
    assert chosen is not None and chosen.get_name() == "CUSTOM"


def test_other_shapes_get_the_plugin_backend():
    exact = plan_exact_layout(9, 3, 64, 8, 32)
    assert plugin_model.select_attention_backend(exact, _config()).get_name() == "CUSTOM"


def test_without_a_plugin_backend_other_shapes_are_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(plugin_model, "plugin_backend_class_path", lambda: None)
    with pytest.raises(ValueError, match=r"--kv-budget 576"):
        plugin_model.select_attention_backend(plan_exact_layout(9, 3, 64, 8, 32), _config())

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


def _cached(dtype, backend=None):
    config = _config(backend)
    config.cache_config = SimpleNamespace(cache_dtype=dtype)
    return config


def test_the_4bit_cache_is_served_by_the_plugin_backend_with_its_row_layout():
    """--kv-cache-dtype int4_per_token_head means the plugin's grouped format for an MLA latent: int4 latent in
    groups of 64, int8 rotary keys; the split sits at the SVD latent wherever it falls in vLLM's row."""
    from conversion.mla_format.cache_quant import CacheQuant
    from vllm_mha2mla.backend_selection import cache_row_layout

    exact = plan_exact_layout(9, 3, 64, 8, 32)  # latent 96 + rope 24
    chosen = plugin_model.select_attention_backend(exact, _cached("int4_per_token_head"))
    assert chosen.get_name() == "CUSTOM" and "int4_per_token_head" in chosen.supported_kv_cache_dtypes
    row = cache_row_layout(exact, "int4_per_token_head")
    assert (row.fmt, row.latent, row.rope) == (CacheQuant(4, 8, 64), 96, 24)
    assert row.row_bytes == 48 + 2 * 4 + 24 + 4  # 96 int4 codes + 2 groups, 24 int8 codes + 1 group
    native = plan_native_layout(8, 8, 64, 16, 56, 576)  # rotary keys overflow into kv_c, then padding
    row = cache_row_layout(native, "int4_per_token_head")
    assert (row.latent, row.latent + row.rope) == (native.latent_width, 576)
    assert cache_row_layout(exact, "auto") is None and cache_row_layout(exact, "fp8") is None


def test_cache_dtypes_a_backend_cannot_serve_are_refused_naming_dtype_shape_and_fix(monkeypatch):
    native = plan_native_layout(8, 8, 64, 16, 56, 576)
    exact = plan_exact_layout(9, 3, 64, 8, 32)
    # vLLM's own MLA kernels (a native shape, no --attention-backend) have no grouped 4-bit latent cache
    with pytest.raises(ValueError, match=r"int4_per_token_head.*576-value cache row.*native.*--attention-backend CUSTOM"):
        plugin_model.select_attention_backend(native, _cached("int4_per_token_head"))
    # ... which the plugin's backend serves for the same shape when asked
    chosen = plugin_model.select_attention_backend(native, _cached("int4_per_token_head", SimpleNamespace(name="CUSTOM")))
    assert chosen.get_name() == "CUSTOM"
    # a dtype the plugin's CPU backend does not list is refused, not stored as something else
    with pytest.raises(ValueError, match=r"--kv-cache-dtype fp8: .*120-value cache row.*exact.*serves auto, float16, "
                                         r"bfloat16, int4_per_token_head"):
        plugin_model.select_attention_backend(exact, _cached("fp8"))


def _on_gpu(monkeypatch):
    """Selection as on a CUDA machine (vLLM 0.26): the plugin's backend is the Triton one."""
    from vllm_mha2mla import backend_selection

    monkeypatch.setattr(plugin_model, "plugin_backend_class_path", lambda: backend_selection.GPU_BACKEND_PATH)
    monkeypatch.setattr(backend_selection, "plugin_backend_class_path", lambda: backend_selection.GPU_BACKEND_PATH)


def test_the_gpu_backend_serves_the_4bit_cache_where_the_values_are_the_latent(monkeypatch):
    """On a GPU the plugin's Triton backend serves int4_per_token_head (its Triton write and decode read a row's
    values from the latent segment): exact layouts, and a native row whose latent fills kv_c when asked for with
    --attention-backend CUSTOM; other dtypes it does not list stay refused, naming what it serves."""
    _on_gpu(monkeypatch)
    exact = plan_exact_layout(9, 3, 64, 8, 32)
    chosen = plugin_model.select_attention_backend(exact, _cached("int4_per_token_head"))
    assert chosen.__name__ == "MHA2MLATritonBackend" and chosen.get_name() == "CUSTOM"
    assert chosen.low_bit_values_from_latent
    assert plugin_model.select_attention_backend(exact, _cached("fp8")) is chosen
    full = plan_native_layout(8, 8, 64, 8, 64, 576)  # latent 512 = kv_lora_rank, 64 rotary keys in k_pe
    assert (full.latent_width, full.kv_lora_rank, full.is_native) == (512, 512, True)
    custom = SimpleNamespace(name="CUSTOM")
    assert plugin_model.select_attention_backend(full, _cached("int4_per_token_head", custom)) is chosen
    with pytest.raises(ValueError, match=r"int4_per_token_head: this checkpoint's 576-value cache row .*native layout.*"
                                         r"vLLM's own MLA kernels.*add --attention-backend CUSTOM: the plugin's GPU "
                                         r"backend serves it"):
        plugin_model.select_attention_backend(full, _cached("int4_per_token_head"))
    with pytest.raises(ValueError, match=r"--kv-cache-dtype fp8_e5m2: the plugin's MHA2MLATritonBackend .*120-value.*"
                                         r"serves auto, float16, bfloat16, fp8, fp8_e4m3, int4_per_token_head"):
        plugin_model.select_attention_backend(exact, _cached("fp8_e5m2"))


def test_the_gpu_backend_refuses_the_4bit_cache_where_kv_c_holds_more_than_the_latent(monkeypatch):
    """A native row whose kv_c also holds rotary keys and padding after the latent: the GPU kernels read values from
    the latent segment only, so it is refused on vLLM's kernels and on the plugin's backend alike, naming the
    dtype, the shape, the reason and what would work (an exact conversion, the CPU backend, another dtype)."""
    _on_gpu(monkeypatch)
    native = plan_native_layout(8, 8, 64, 16, 56, 576)  # latent 448, 64 rotary keys overflow into kv_c
    assert native.kv_lora_rank - native.latent_width == 64
    fix = r"convert the checkpoint with --layout exact.*on CPU with --attention-backend CUSTOM.*auto or fp8"
    with pytest.raises(ValueError, match=r"int4_per_token_head: this checkpoint's 576-value cache row .*native layout.*"
                                         r"vLLM's own MLA kernels.*the plugin's GPU backend cannot either \(its kv_c "
                                         r"holds 64 columns of rotary keys or padding after the 448-column latent.*"
                                         + fix):
        plugin_model.select_attention_backend(native, _cached("int4_per_token_head"))
    with pytest.raises(ValueError, match=r"int4_per_token_head: the plugin's MHA2MLATritonBackend cannot serve this "
                                         r"checkpoint's 576-value cache row .*native layout.*holds 64 columns.*"
                                         r"latent segment only\. Convert the checkpoint with --layout exact"):
        plugin_model.select_attention_backend(native, _cached("int4_per_token_head", SimpleNamespace(name="CUSTOM")))


def test_without_a_plugin_backend_the_4bit_cache_is_refused(monkeypatch):
    from vllm_mha2mla import backend_selection

    monkeypatch.setattr(backend_selection, "plugin_backend_class_path", lambda: None)
    with pytest.raises(ValueError, match=r"no grouped low-bit latent cache; the 4-bit latent cache runs on the "
                                         r"plugin's CPU and CUDA backends only"):
        plugin_model.select_attention_backend(plan_native_layout(8, 8, 64, 16, 56, 576), _cached("int4_per_token_head"))

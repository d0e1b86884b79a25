"""Which attention backend serves an MHA2MLA checkpoint, and the plugin's backends in vLLM's registry.

vLLM's own MLA kernels serve the native shapes (:data:`NATIVE_HEAD_SIZES`; CPU: 576 only); the
plugin's any-shape backend (``vllm_mha2mla.attention``) serves every other shape, per-layer
widths, and whatever the user selects with ``--attention-backend CUSTOM``.

Cache dtypes: :data:`LOW_BIT_CACHE_FORMATS` gives vLLM's ``--kv-cache-dtype`` names the plugin's
grouped low-bit meaning for MLA latents; :func:`check_cache_dtype` refuses, at model construction,
a cache dtype the chosen backend cannot serve for the checkpoint's shape on this platform.
"""

from __future__ import annotations

import importlib

from conversion.mla_format.cache_quant import CacheQuant
from conversion.mla_format.cache_rows import RowLayout
from conversion.mla_format.layout import CPU_NATIVE_HEAD_SIZES, NATIVE_HEAD_SIZES, MLALayout
from conversion.mla_format.spec import MHA2MLASpec
from vllm_mha2mla import compat
from vllm_mha2mla.attention.backend_name import BACKEND_NAME

LOW_BIT_CACHE_FORMATS: dict[str, CacheQuant] = {
    "int4_per_token_head": CacheQuant(latent_bits=4, rope_bits=8, group=64),
}
"""vLLM ``--kv-cache-dtype`` names the plugin's backends serve as a grouped low-bit latent row (issue 33).
vLLM's own ``int4_per_token_head`` is one scale a row for non-MLA backends; for an MHA2MLA latent the plugin
stores the SVD latent in int4 groups of 64 columns (float16 scale and minimum each) and the rotary keys in int8
(the format ``benchmarks/results/2026-12-07-cpu-cache-quant`` chose; :mod:`conversion.mla_format.cache_rows`)."""

CPU_BACKEND_PATH = "vllm_mha2mla.attention.cpu_backend.MHA2MLACPUBackend"
GPU_BACKEND_PATH = "vllm_mha2mla.attention.gpu_backend.MHA2MLATritonBackend"
PREFILL_BACKEND_PATH = "vllm_mha2mla.attention.prefill.MHA2MLAPrefillBackend"
CPU_PREFILL_BACKEND_PATH = "vllm_mha2mla.attention.prefill.MHA2MLACPUPrefillBackend"


def native_cache_sizes() -> tuple[int, ...]:
    """MLA head sizes the stock kernels of this platform accept (CPU backends: 576 only)."""
    from vllm.platforms import current_platform

    return CPU_NATIVE_HEAD_SIZES if current_platform.is_cpu() else NATIVE_HEAD_SIZES


def plugin_backend_class_path() -> str | None:
    """Dotted path of the plugin's any-shape MLA backend for this platform (None: none here)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return CPU_BACKEND_PATH
    if current_platform.is_cuda():
        return GPU_BACKEND_PATH
    return None


def _uses_plugin_prefill() -> bool:
    """GPU: vLLM's MLA prefill kernels take three head shapes, so the plugin brings its own.
    CPU: vLLM's SDPA prefill takes any shape (the plugin only makes it faster, see
    :func:`plugin_prefill_kwargs`)."""
    from vllm.platforms import current_platform

    return current_platform.is_cuda()


def _plugin_prefill_path() -> str | None:
    """The plugin's prefill backend for this platform: the any-shape one on GPUs; on CPUs the
    fused-flash variant of vLLM's SDPA prefill, where this vLLM has that backend."""
    if _uses_plugin_prefill():
        return PREFILL_BACKEND_PATH
    return CPU_PREFILL_BACKEND_PATH if compat.cpu_sdpa_prefill_backend() is not None else None


def register_attention_backend() -> None:
    """Registers the plugin backend in vLLM's registry under ``CUSTOM`` (the slot both
    0.26 and 0.32 have; 0.32 also takes free-form names), so ``--attention-backend CUSTOM``
    selects it explicitly; on GPU also the prefill backend under the MLA prefill ``CUSTOM``."""
    path = plugin_backend_class_path()
    if path is None:
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, path)
    if _uses_plugin_prefill():
        from vllm.v1.attention.backends.mla.prefill.registry import (
            MLAPrefillBackendEnum,
            register_mla_prefill_backend,
        )

        register_mla_prefill_backend(MLAPrefillBackendEnum.CUSTOM, PREFILL_BACKEND_PATH)


def plugin_prefill_kwargs(vllm_config) -> dict:
    """Makes the next ``MLAAttention`` use the plugin's prefill backend; returns the extra
    keyword arguments that takes.

    vLLM 0.32 takes the class as ``MLAAttention(prefill_backend_cls=...)``; 0.26 picks the
    prefill backend from ``attention_config.mla_prefill_backend``, so it is set to the
    registered ``CUSTOM`` entry (the model's layers are all MHA2MLA layers).
    """
    path = _plugin_prefill_path()
    if path is None:
        return {}
    if compat.mla_attention_takes_prefill_backend_cls():
        return {"prefill_backend_cls": load_class(path)}
    if not _uses_plugin_prefill():
        return {}  # a CPU vLLM that picks prefill backends only from its registry: keep its own
    register_attention_backend()  # this process may not have run the plugin hook yet
    compat.choose_registered_prefill_backend(vllm_config)
    return {}


def requested_backend_name(vllm_config) -> str | None:
    """The attention backend the user named (``--attention-backend``), if any."""
    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    return None if backend is None else getattr(backend, "name", str(backend))


def plugin_backend_wanted(layout, vllm_config, per_layer: bool = False) -> bool:
    """Whether the plugin's backend serves this :class:`MLALayout`: vLLM's kernels on this
    platform refuse its shape, the user asked for it (``--attention-backend CUSTOM``), or the
    layers have different widths (one backend for all of them, whatever each one's shape)."""
    native = layout.is_native and layout.cache_values in native_cache_sizes()
    return per_layer or not native or requested_backend_name(vllm_config) == BACKEND_NAME


def served_by_plugin_backend(vllm_config) -> bool:
    """Whether the model ``vllm_config`` serves is an MHA2MLA checkpoint on the plugin's backend."""
    spec = mha2mla_spec(vllm_config)
    return spec is not None and plugin_backend_wanted(spec.layout, vllm_config, spec.per_layer)


def mha2mla_spec(vllm_config) -> MHA2MLASpec | None:
    """The :class:`MHA2MLASpec` of the model ``vllm_config`` serves; None when it is not an
    MHA2MLA checkpoint (its config.json has no ``mha2mla`` section)."""
    hf_config = getattr(getattr(vllm_config, "model_config", None), "hf_config", None)
    if hf_config is None or not hasattr(hf_config, "mha2mla"):
        return None
    return MHA2MLASpec.from_config(hf_config)


def load_class(dotted: str) -> type:
    """The class a dotted ``module.Class`` path names."""
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def requested_cache_dtype(vllm_config) -> str:
    """The ``--kv-cache-dtype`` the engine runs with (``auto`` when none is set)."""
    return getattr(getattr(vllm_config, "cache_config", None), "cache_dtype", None) or "auto"


def cache_row_layout(layout: MLALayout, kv_cache_dtype: str) -> RowLayout | None:
    """The byte layout of one layer's cache row under a low-bit ``kv_cache_dtype`` (None: not a plugin format).
    The latent segment is the SVD latent (``latent_width`` columns); everything after it in vLLM's
    ``[kv_c | k_pe]`` row — rotary keys overflowing into ``kv_c``, padding, ``k_pe`` — is the rotary segment, the
    split the reference model's ``set_cache_quant`` quantises."""
    fmt = LOW_BIT_CACHE_FORMATS.get(kv_cache_dtype)
    if fmt is None:
        return None
    row = layout.kv_lora_rank + layout.qk_rope_head_dim
    return RowLayout(fmt, layout.latent_width, row - layout.latent_width)


def low_bit_values_refusal(layout: MLALayout) -> str | None:
    """Why a kernel that reads a low-bit row's values from its latent segment only (the plugin's GPU kernels,
    :mod:`~vllm_mha2mla.attention.triton_low_bit_decode`) cannot serve this layer (None: it can). The absorbed
    value projection reads vLLM's whole ``kv_c`` (``kv_lora_rank`` columns); a native layout's ``kv_c`` also holds
    rotary keys that overflow the ``k_pe`` slot, and padding, after the latent, which a low-bit row stores in its
    rotary segment. (The CPU backend's PyTorch decode reads values across both segments.)"""
    if layout.kv_lora_rank == layout.latent_width:
        return None
    return (f"its kv_c holds {layout.kv_lora_rank - layout.latent_width} columns of rotary keys or padding after the "
            f"{layout.latent_width}-column latent, and the GPU kernels read a low-bit row's values from its latent "
            "segment only")


def check_cache_dtype(layout: MLALayout, backend: type | None, vllm_config) -> None:
    """Refuses a ``--kv-cache-dtype`` that ``backend`` (None: vLLM's own MLA kernels) cannot serve for this
    checkpoint's shape on this platform, naming the dtype, the shape and what would work: never a silent
    fallback to another cache format. A backend whose ``low_bit_values_from_latent`` is set (the GPU backend)
    serves the low-bit formats only where the row's values are its latent segment (:func:`low_bit_values_refusal`)."""
    dtype = requested_cache_dtype(vllm_config)
    shape = (f"{layout.cache_values}-value cache row (kv_lora_rank {layout.kv_lora_rank} + qk_rope_head_dim "
             f"{layout.qk_rope_head_dim}, {'native' if layout.is_native else 'exact'} layout)")
    low_bit = dtype in LOW_BIT_CACHE_FORMATS
    if backend is None:
        if low_bit:
            raise ValueError(f"--kv-cache-dtype {dtype}: this checkpoint's {shape} is served by vLLM's own MLA "
                             f"kernels, which have no grouped low-bit latent cache; {_low_bit_fix(layout)}")
        return
    supported = list(getattr(backend, "supported_kv_cache_dtypes", ["auto"]))
    if dtype in supported:
        why = low_bit_values_refusal(layout) if low_bit and getattr(backend, "low_bit_values_from_latent", False) \
            else None
        if why is None:
            return
        raise ValueError(f"--kv-cache-dtype {dtype}: the plugin's {backend.__name__} cannot serve this checkpoint's "
                         f"{shape}: {why}. {_LOW_BIT_EXACT_FIX[0].upper()}{_LOW_BIT_EXACT_FIX[1:]}")
    fix = _NO_LOW_BIT_KERNEL_FIX if low_bit else f"use --kv-cache-dtype {' or '.join(supported)}"
    raise ValueError(f"--kv-cache-dtype {dtype}: the plugin's {backend.__name__} (serving this checkpoint's {shape}) "
                     f"does not serve it; it serves {', '.join(supported)}. {fix[0].upper()}{fix[1:]}")


def _low_bit_fix(layout: MLALayout) -> str:
    """What serves a low-bit cache for a shape vLLM's own kernels took: the plugin's backend on this platform."""
    path = plugin_backend_class_path()
    if path == CPU_BACKEND_PATH:
        return "add --attention-backend CUSTOM: the plugin's CPU backend serves it for any shape"
    if path == GPU_BACKEND_PATH:
        why = low_bit_values_refusal(layout)
        if why is None:
            return "add --attention-backend CUSTOM: the plugin's GPU backend serves it for this shape"
        return f"the plugin's GPU backend cannot either ({why}): {_LOW_BIT_EXACT_FIX}"
    return _NO_LOW_BIT_KERNEL_FIX


_LOW_BIT_EXACT_FIX = ("convert the checkpoint with --layout exact (the GPU backend serves exact layouts), serve this "
                      "one on CPU with --attention-backend CUSTOM, or use --kv-cache-dtype auto or fp8 here")
_NO_LOW_BIT_KERNEL_FIX = ("the 4-bit latent cache runs on the plugin's CPU and CUDA backends only (issue 33): serve "
                          "there, or use --kv-cache-dtype auto or fp8 here")

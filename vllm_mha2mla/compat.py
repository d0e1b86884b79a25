"""Everything that differs between the vLLM releases this plugin supports (0.26 CUDA, 0.32 CPU).

Keep version checks here, and nowhere else, so supporting a new release is a one-file change.
"""

from __future__ import annotations

import torch

from conversion.mla_format.layout import CPU_NATIVE_HEAD_SIZES, NATIVE_HEAD_SIZES


def native_cache_sizes() -> tuple[int, ...]:
    """MLA head sizes the stock kernels of this platform accept (CPU backends: 576 only)."""
    from vllm.platforms import current_platform

    return CPU_NATIVE_HEAD_SIZES if current_platform.is_cpu() else NATIVE_HEAD_SIZES


def default_device() -> torch.device:
    """The device tensors are created on right now (vLLM builds models under a device
    context manager, and buffers must live where the weights will)."""
    return torch.empty(0).device


def plugin_backend_class_path() -> str | None:
    """Dotted path of the plugin's any-shape MLA backend for this platform (None: none here)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return "vllm_mha2mla.attention.cpu_backend.MHA2MLACPUBackend"
    if current_platform.is_cuda():
        return "vllm_mha2mla.attention.gpu_backend.MHA2MLATritonBackend"
    return None


PREFILL_BACKEND_PATH = "vllm_mha2mla.attention.prefill.MHA2MLAPrefillBackend"
CPU_PREFILL_BACKEND_PATH = "vllm_mha2mla.attention.prefill.MHA2MLACPUPrefillBackend"


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
    from vllm_mha2mla.attention.prefill import CPUSDPAMLAPrefillBackend

    return CPU_PREFILL_BACKEND_PATH if CPUSDPAMLAPrefillBackend is not None else None


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
    import inspect

    from vllm.model_executor.layers.attention import MLAAttention

    if "prefill_backend_cls" in inspect.signature(MLAAttention.__init__).parameters:
        return {"prefill_backend_cls": load_class(path)}
    if not _uses_plugin_prefill():
        return {}  # a CPU vLLM that picks prefill backends only from its registry: keep its own
    from vllm.v1.attention.backends.mla.prefill.registry import MLAPrefillBackendEnum

    register_attention_backend()  # this process may not have run the plugin hook yet
    vllm_config.attention_config.mla_prefill_backend = MLAPrefillBackendEnum.CUSTOM
    return {}


VLLM_GATHER_WIDTHS = (min(NATIVE_HEAD_SIZES), max(NATIVE_HEAD_SIZES))
"""Row widths vLLM's ``gather_and_maybe_dequant_cache`` CUDA kernel is compiled for (320 and 576)."""


def extend_cache_gather_to_any_width() -> None:
    """Routes ``vllm._custom_ops.gather_and_maybe_dequant_cache`` (called by vLLM's MLA
    chunked-context prefill) to :func:`gather_cache_rows` for row widths its kernel lacks;
    native widths keep vLLM's kernel. Idempotent; same signature in 0.26 and 0.32."""
    from vllm import _custom_ops as ops

    original = ops.gather_and_maybe_dequant_cache
    if getattr(original, "mha2mla_any_width", False):
        return
    from vllm_mha2mla.attention.cache_gather import gather_cache_rows

    def gather_and_maybe_dequant_cache(src_cache, dst, block_table, cu_seq_lens, token_to_seq, num_tokens,
                                       kv_cache_dtype, scale, seq_starts=None):
        fn = original if dst.shape[-1] in VLLM_GATHER_WIDTHS else gather_cache_rows
        return fn(src_cache, dst, block_table, cu_seq_lens, token_to_seq, num_tokens, kv_cache_dtype, scale,
                  seq_starts)

    gather_and_maybe_dequant_cache.mha2mla_any_width = True  # type: ignore[attr-defined]
    ops.gather_and_maybe_dequant_cache = gather_and_maybe_dequant_cache


def keep_layer_widths_apart() -> None:
    """Makes vLLM give layers of different cache widths a KV cache tensor each, of its own width.

    vLLM's KV cache manager first tries to merge every layer's spec into one
    (``is_kv_cache_spec_uniform``); only if that fails does it group them as
    ``UniformTypeKVCacheSpecs`` (one block table, per-layer tensors and page sizes). vLLM 0.32's
    ``MLAAttentionSpec.merge`` refuses specs whose head sizes differ; 0.26's copies the first
    layer's head size without comparing, which would size every layer's cache by the first
    layer's width, silently. Where merge does not compare (a feature test, not a version
    check), it is wrapped to refuse differing head sizes, as 0.32 does. Runs in every vLLM
    process through the plugin hook (the merge happens in the engine core). Idempotent.
    """
    from vllm.v1 import kv_cache_interface as kv

    if not per_layer_kv_cache_supported() or merge_refuses_different_widths():
        return
    original = kv.MLAAttentionSpec.__dict__["merge"].__func__

    def merge(cls, specs):
        assert len({spec.head_size for spec in specs}) == 1, (
            "MLA layers with different head sizes cannot share one KV cache spec")
        return original(cls, specs)

    kv.MLAAttentionSpec.merge = classmethod(merge)  # type: ignore[method-assign,assignment]


def merge_refuses_different_widths() -> bool:
    """Whether ``MLAAttentionSpec.merge`` raises for two layers of different head sizes."""
    from vllm.v1 import kv_cache_interface as kv

    probe = [kv.MLAAttentionSpec(block_size=16, num_kv_heads=1, head_size=size, dtype=torch.bfloat16)
             for size in (64, 80)]
    try:
        kv.MLAAttentionSpec.merge(probe)
    except AssertionError:
        return True
    return False


def require_per_layer_kv_cache() -> None:
    """Refuses, at model construction, a checkpoint with per-layer latent widths on a vLLM whose
    KV cache manager would not give each layer a cache of its own width: never a mis-sized cache."""
    import vllm

    if not per_layer_kv_cache_supported():
        raise ValueError(f"this checkpoint's layers cache latents of different widths, and vLLM {vllm.__version__} has "
                         "no per-layer KV cache specs (UniformTypeKVCacheSpecs); convert it with --allocate uniform")
    keep_layer_widths_apart()
    if not merge_refuses_different_widths():
        raise ValueError(f"vLLM {vllm.__version__} merges MLA layers of different widths into one KV cache spec, which "
                         "would size every layer by the first one's width; convert it with --allocate uniform")


def per_layer_kv_cache_supported() -> bool:
    """Whether this vLLM's KV cache manager can hold layers of different widths in one group
    (``UniformTypeKVCacheSpecs``, vLLM PR #25101)."""
    from vllm.v1 import kv_cache_interface as kv

    return hasattr(kv, "UniformTypeKVCacheSpecs")


def requested_backend_name(vllm_config) -> str | None:
    """The attention backend the user named (``--attention-backend``), if any."""
    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    return None if backend is None else getattr(backend, "name", str(backend))


def plugin_backend_wanted(layout, vllm_config, per_layer: bool = False) -> bool:
    """Whether the plugin's backend serves this :class:`MLALayout`: vLLM's kernels on this
    platform refuse its shape, the user asked for it (``--attention-backend CUSTOM``), or the
    layers have different widths (one backend for all of them, whatever each one's shape)."""
    from vllm_mha2mla.attention.backend_name import BACKEND_NAME

    native = layout.is_native and layout.cache_values in native_cache_sizes()
    return per_layer or not native or requested_backend_name(vllm_config) == BACKEND_NAME


def keep_chunked_prefill_on_cpu() -> None:
    """Lets the plugin's CPU backend run with chunked prefill and prefix caching.

    vLLM's CPU platform turns both off for every MLA model (its reference ``CPU_MLA``
    backend has no context path), though vLLM 0.32's MLA scaffolding does have a CPU one:
    a context-cache gather (``gather_mla_context_cache_cpu``), SDPA context prefill and a
    PyTorch state merge. For checkpoints the plugin's backend serves, the settings the
    user (or vLLM's defaults) chose are put back after the platform's check; models on
    vLLM's own CPU kernels keep vLLM's behaviour. Idempotent; no-op off CPU.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    platform_cls = type(current_platform)
    original = platform_cls.check_and_update_config
    if getattr(original, "mha2mla_keeps_chunked_prefill", False):
        return

    def check_and_update_config(vllm_config) -> None:
        scheduler, cache = vllm_config.scheduler_config, vllm_config.cache_config
        chosen = (scheduler.enable_chunked_prefill, scheduler.max_num_batched_tokens,
                  cache.enable_prefix_caching)
        original(vllm_config)
        if _served_by_plugin_backend(vllm_config):
            (scheduler.enable_chunked_prefill, scheduler.max_num_batched_tokens,
             cache.enable_prefix_caching) = chosen

    check_and_update_config.mha2mla_keeps_chunked_prefill = True  # type: ignore[attr-defined]
    platform_cls.check_and_update_config = staticmethod(check_and_update_config)


def _served_by_plugin_backend(vllm_config) -> bool:
    spec = mha2mla_spec(vllm_config)
    return spec is not None and plugin_backend_wanted(spec.layout, vllm_config, spec.per_layer)


def mha2mla_spec(vllm_config):
    """The :class:`MHA2MLASpec` of the model ``vllm_config`` serves; None when it is not an
    MHA2MLA checkpoint (its config.json has no ``mha2mla`` section)."""
    hf_config = getattr(getattr(vllm_config, "model_config", None), "hf_config", None)
    if hf_config is None or not hasattr(hf_config, "mha2mla"):
        return None
    from conversion.mla_format.spec import MHA2MLASpec

    return MHA2MLASpec.from_config(hf_config)


def load_class(dotted: str) -> type:
    import importlib

    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)

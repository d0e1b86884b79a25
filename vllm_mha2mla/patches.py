"""What the plugin changes in vLLM at run time (idempotent monkeypatches, each behind a feature test).

- :func:`extend_cache_gather_to_any_width`: vLLM's chunked-context cache gather for any row width;
- :func:`keep_layer_widths_apart`: a KV cache spec per layer width, where vLLM would merge them;
- :func:`keep_chunked_prefill_on_cpu`: chunked prefill and prefix caching kept on for checkpoints
  the plugin's CPU backend serves.

The plugin hook (:func:`vllm_mha2mla.register`) applies the last two in every vLLM process.
"""

from __future__ import annotations

from conversion.mla_format.layout import NATIVE_HEAD_SIZES
from vllm_mha2mla.attention.cache_gather import gather_cache_rows
from vllm_mha2mla.backend_selection import served_by_plugin_backend
from vllm_mha2mla.compat import merge_refuses_different_widths, per_layer_kv_cache_supported

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
        if served_by_plugin_backend(vllm_config):
            (scheduler.enable_chunked_prefill, scheduler.max_num_batched_tokens,
             cache.enable_prefix_caching) = chosen

    check_and_update_config.mha2mla_keeps_chunked_prefill = True  # type: ignore[attr-defined]
    platform_cls.check_and_update_config = staticmethod(check_and_update_config)

"""What the plugin changes in vLLM at run time (idempotent monkeypatches, each behind a feature test).

- :func:`extend_cache_gather_to_any_width`: vLLM's chunked-context cache gather (CUDA) for any row width and for
  a low-bit cache's rows;
- :func:`keep_layer_widths_apart`: a KV cache spec per layer width, where vLLM would merge them;
- :func:`keep_chunked_prefill_on_cpu`: chunked prefill and prefix caching kept on for checkpoints
  the plugin's CPU backend serves;
- :func:`size_low_bit_cache_pages` / :func:`read_low_bit_context_on_cpu`: a low-bit latent cache's pages sized
  by its rows' true bytes, and vLLM's CPU context gather decoding its rows.

The plugin hook (:func:`vllm_mha2mla.register`) applies ``keep_layer_widths_apart`` and
``keep_chunked_prefill_on_cpu`` in every vLLM process; the backends apply the others when they need them.
"""

from __future__ import annotations

from conversion.mla_format.layout import NATIVE_HEAD_SIZES
from vllm_mha2mla.attention.cache_gather import gather_cache_rows
from vllm_mha2mla.backend_selection import served_by_plugin_backend
from vllm_mha2mla.compat import merge_refuses_different_widths, per_layer_kv_cache_supported, spec_with_row_bytes

VLLM_GATHER_WIDTHS = (min(NATIVE_HEAD_SIZES), max(NATIVE_HEAD_SIZES))
"""Row widths vLLM's ``gather_and_maybe_dequant_cache`` CUDA kernel is compiled for (320 and 576)."""


def extend_cache_gather_to_any_width() -> None:
    """Routes ``vllm._custom_ops.gather_and_maybe_dequant_cache`` (called by vLLM's MLA
    chunked-context prefill) to :func:`gather_cache_rows` for row widths its kernel lacks, and to
    :meth:`~vllm_mha2mla.attention.quantized_cache.LowBitCache.gather_tokens` when its source is a
    :class:`LowBitCache` (the plugin's GPU backend passes one for a low-bit cache, as its CPU backend does to
    :func:`read_low_bit_context_on_cpu`: the workspace gets the decoded rows, in the model's dtype); native
    widths keep vLLM's kernel. vLLM 0.26 calls it with keywords from ``MLACommonBaseImpl._compute_prefill_context``
    (and its DCP variant, for quantized caches; mla_attention.py 2185-2195, 2317-2328); one wrapper for both
    routes, so the order the backends apply patches in does not matter. Idempotent; same signature in 0.26 and
    0.32."""
    from vllm import _custom_ops as ops

    from vllm_mha2mla.attention.quantized_cache import LowBitCache

    original = ops.gather_and_maybe_dequant_cache
    if getattr(original, "mha2mla_any_width", False):
        return

    def gather_and_maybe_dequant_cache(src_cache, dst, block_table, cu_seq_lens, token_to_seq, num_tokens,
                                       kv_cache_dtype, scale, seq_starts=None):
        if isinstance(src_cache, LowBitCache):
            return src_cache.gather_tokens(dst, block_table, cu_seq_lens, token_to_seq, num_tokens, seq_starts)
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


def size_low_bit_cache_pages() -> None:
    """Makes vLLM's MLA layer give a layer whose impl stores low-bit rows (``impl.row_layout``, a
    :class:`~conversion.mla_format.cache_rows.RowLayout`) a KV cache spec of that row's bytes, uint8.

    vLLM 0.32's ``MLAAttention.get_kv_cache_spec`` sets ``state_content_bytes`` only for its own packed formats
    (``fp8_ds_mla`` 656, ``nvfp4_ds_mla`` 352), and its MLA backends' ``customize_spec`` sizes
    ``int4_per_token_head`` as one int4 row with two float32 scales; this follows the ds_mla precedent with the
    plugin's row bytes, per layer (per-layer latent widths have rows of their own size), so the page size, the
    KV capacity and the allocated ``[blocks, block_size, row_bytes]`` view are the true ones. Other layers keep
    vLLM's spec. Idempotent."""
    from vllm.model_executor.layers.attention.mla_attention import MLAAttention

    original = MLAAttention.get_kv_cache_spec
    if getattr(original, "mha2mla_row_bytes", False):
        return

    def get_kv_cache_spec(self, vllm_config):
        spec = original(self, vllm_config)
        layout = getattr(getattr(self, "impl", None), "row_layout", None)
        return spec if layout is None or spec is None else spec_with_row_bytes(spec, layout.row_bytes)

    get_kv_cache_spec.mha2mla_row_bytes = True  # type: ignore[attr-defined]
    MLAAttention.get_kv_cache_spec = get_kv_cache_spec  # type: ignore[method-assign]


def read_low_bit_context_on_cpu() -> None:
    """Routes ``vllm._custom_ops.gather_mla_context_cache_cpu`` (vLLM's CPU chunked-context gather, called by
    the MLA prefill for context already in the cache: chunked prefill, prefix-cache hits) to
    :meth:`~vllm_mha2mla.attention.quantized_cache.LowBitCache.gather` when its source is a
    :class:`LowBitCache`, which the plugin's CPU backend passes for a low-bit cache: the workspace gets the
    decoded rows. Any other source keeps vLLM's copy. Idempotent; the same keyword signature in vLLM 0.32."""
    from vllm import _custom_ops as ops

    from vllm_mha2mla.attention.quantized_cache import LowBitCache

    original = ops.gather_mla_context_cache_cpu
    if getattr(original, "mha2mla_low_bit", False):
        return

    def gather_mla_context_cache_cpu(*, src_cache, dst, block_table, starts, cu_seq_lens):
        if isinstance(src_cache, LowBitCache):
            return src_cache.gather(dst, block_table, cu_seq_lens, starts)
        return original(src_cache=src_cache, dst=dst, block_table=block_table, starts=starts, cu_seq_lens=cu_seq_lens)

    gather_mla_context_cache_cpu.mha2mla_low_bit = True  # type: ignore[attr-defined]
    ops.gather_mla_context_cache_cpu = gather_mla_context_cache_cpu

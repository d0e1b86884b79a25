"""Everything that differs between the vLLM releases this plugin supports (0.26 CUDA, 0.32 CPU).

Keep version checks and feature probes here, and nowhere else, so supporting a new release is a
one-file change. Which backend serves a checkpoint is :mod:`vllm_mha2mla.backend_selection`;
what the plugin changes in vLLM at run time is :mod:`vllm_mha2mla.patches`. vLLM is imported
inside the probes: the plugin hook imports this module in every vLLM process, early.
"""

from __future__ import annotations

import dataclasses

import torch


def mla_prefill_backend_base() -> type:
    """vLLM's ``MLAPrefillBackend`` base class; ``object`` on releases before the prefill-backend
    registry."""
    try:
        from vllm.v1.attention.backends.mla.prefill.base import MLAPrefillBackend
    except ImportError:  # pragma: no cover - vLLM releases before the prefill-backend registry
        return object
    return MLAPrefillBackend


def cpu_sdpa_prefill_backend() -> type | None:
    """vLLM's CPU SDPA MLA prefill backend; None on releases without it (the GPU bundle's 0.26)."""
    try:
        from vllm.v1.attention.backends.mla.prefill.cpu_sdpa import CPUSDPAMLAPrefillBackend
    except ImportError:  # vLLM releases without the CPU SDPA prefill backend (the GPU bundle's 0.26)
        return None
    return CPUSDPAMLAPrefillBackend


def mla_attention_takes_prefill_backend_cls() -> bool:
    """Whether ``MLAAttention`` takes its prefill backend as ``prefill_backend_cls=`` (vLLM 0.32);
    0.26 picks it from ``attention_config.mla_prefill_backend`` (:func:`choose_registered_prefill_backend`)."""
    import inspect

    from vllm.model_executor.layers.attention import MLAAttention

    return "prefill_backend_cls" in inspect.signature(MLAAttention.__init__).parameters


def choose_registered_prefill_backend(vllm_config) -> None:
    """vLLM 0.26: makes the MLA prefill backend the one registered under ``CUSTOM``."""
    from vllm.v1.attention.backends.mla.prefill.registry import MLAPrefillBackendEnum

    vllm_config.attention_config.mla_prefill_backend = MLAPrefillBackendEnum.CUSTOM


def per_layer_kv_cache_supported() -> bool:
    """Whether this vLLM's KV cache manager can hold layers of different widths in one group
    (``UniformTypeKVCacheSpecs``, vLLM PR #25101)."""
    from vllm.v1 import kv_cache_interface as kv

    return hasattr(kv, "UniformTypeKVCacheSpecs")


def merge_refuses_different_widths() -> bool:
    """Whether ``MLAAttentionSpec.merge`` raises for two layers of different head sizes (0.32 does;
    0.26 copies the first layer's head size without comparing)."""
    from vllm.v1 import kv_cache_interface as kv

    probe = [kv.MLAAttentionSpec(block_size=16, num_kv_heads=1, head_size=size, dtype=torch.bfloat16)
             for size in (64, 80)]
    try:
        kv.MLAAttentionSpec.merge(probe)
    except AssertionError:
        return True
    return False


def context_workspace(builder) -> torch.Tensor | None:
    """The chunked-context prefill workspace of vLLM's MLA metadata builder (None where this
    vLLM's builder has none)."""
    return getattr(builder, "chunked_prefill_workspace", None)


def dcp_world_size(builder) -> int:
    """Decode-context-parallel ranks of vLLM's MLA metadata builder (1 where this vLLM has no DCP)."""
    return getattr(builder, "dcp_world_size", 1)


def spec_with_row_bytes(spec, row_bytes: int):
    """``spec`` (an MLA layer's KV cache spec) with each token's row stored as ``row_bytes`` opaque bytes, uint8, so
    that the page size, the KV capacity and the allocated ``[blocks, block_size, row_bytes]`` view are the true ones.

    vLLM 0.32: ``AttentionSpec.state_content_bytes``, which its own packed MLA formats (``fp8_ds_mla``) set the same
    way; ``head_size`` keeps counting values.

    vLLM 0.26 has no such field: its page is ``block_size × num_kv_heads × head_size × dtype size``
    (``AttentionSpec.real_page_size_bytes`` / ``MLAAttentionSpec.real_page_size_bytes``, vllm/v1/kv_cache_interface.py
    lines 203-218 and 397-416), ``int4_per_token_head`` halves ``head_size`` there and adds two float32 scales per
    token (``unpadded_page_size_bytes``, lines 184-194, through ``kv_quant_mode``); the model runner shapes the
    tensor with the backend's ``get_kv_cache_shape(blocks, block_size, num_kv_heads, spec.head_size,
    cache_dtype_str)`` — ``(blocks, block_size, head_size)`` for MLA (mla_attention.py 1301-1308) — in
    ``spec.dtype``, passing ``"auto"`` as the cache dtype where ``kv_quant_mode`` is ``NONE``
    (gpu_model_runner.py 7349-7364; attn_utils.py 200-253 views the raw bytes). So the row's bytes become the head
    size, in uint8, with no quantisation mode (no per-token scales budgeted, no halving): ``head_size`` then counts
    bytes (:func:`head_size_counts_bytes`), which MLA specs only use for the page size, the shape and merging
    (``MLAAttentionSpec.merge``, the plugin's :func:`~vllm_mha2mla.patches.keep_layer_widths_apart`: layers whose
    rows have the same bytes may share a spec, their caches are alike). The context workspace, which needs the
    row's values, is sized from the model (``model_config.get_head_size()``), not the spec."""
    names = {f.name for f in dataclasses.fields(spec)}
    if "state_content_bytes" in names:
        return dataclasses.replace(spec, state_content_bytes=row_bytes, dtype=torch.uint8)
    if "head_size" not in names or getattr(spec, "num_kv_heads", 1) != 1:
        import vllm

        raise NotImplementedError(f"vLLM {vllm.__version__}'s {type(spec).__name__} cannot size a page by its row "
                                  "bytes (neither AttentionSpec.state_content_bytes nor one MLA head of head_size)")
    changes: dict = {"head_size": row_bytes, "dtype": torch.uint8}
    if "head_size_v" in names:
        changes["head_size_v"] = row_bytes
    if "kv_quant_mode" in names:
        changes["kv_quant_mode"] = type(spec.kv_quant_mode)(0)  # KVQuantMode.NONE
    return dataclasses.replace(spec, **changes)


def head_size_counts_bytes(spec) -> bool:
    """Whether ``spec.head_size`` counts a low-bit row's bytes (:func:`spec_with_row_bytes` on a vLLM without
    ``state_content_bytes``) rather than the row's values: a uint8 spec with no quantisation mode (vLLM's own uint8
    cache formats, ``int4_per_token_head`` and ``fp8_ds_mla``, carry theirs)."""
    names = {f.name for f in dataclasses.fields(spec)}
    return ("state_content_bytes" not in names and getattr(spec, "dtype", None) == torch.uint8
            and int(getattr(spec, "kv_quant_mode", 0)) == 0)

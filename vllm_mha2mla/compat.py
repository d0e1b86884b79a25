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
    """``spec`` (an MLA layer's KV cache spec) with each token's row stored as ``row_bytes`` opaque bytes, uint8:
    vLLM 0.32's ``AttentionSpec.state_content_bytes``, which its own packed MLA formats (``fp8_ds_mla``) set the
    same way; the page size, the capacity and the allocated ``[blocks, block_size, row_bytes]`` view follow it.
    Raises where this vLLM's specs have no such field (0.26 sizes pages from ``head_size`` and the dtype)."""
    if "state_content_bytes" not in {f.name for f in dataclasses.fields(spec)}:
        import vllm

        raise NotImplementedError(f"vLLM {vllm.__version__}'s KV cache specs cannot size a page by its row bytes "
                                  "(no AttentionSpec.state_content_bytes): a low-bit latent cache needs vLLM 0.32")
    return dataclasses.replace(spec, state_content_bytes=row_bytes, dtype=torch.uint8)

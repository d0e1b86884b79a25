"""Everything that differs between the vLLM releases this plugin supports (0.26 CUDA, 0.32 CPU).

Keep version checks here, and nowhere else, so supporting a new release is a one-file change.
"""

from __future__ import annotations

import torch


def native_cache_sizes() -> tuple[int, ...]:
    """MLA head sizes the stock kernels of this platform accept (CPU backends: 576 only)."""
    from vllm.platforms import current_platform

    return (576,) if current_platform.is_cpu() else (576, 512, 320)


def default_device() -> torch.device:
    """The device tensors are created on right now (vLLM builds models under a device
    context manager, and buffers must live where the weights will)."""
    return torch.empty(0).device


def plugin_backend_class_path() -> str | None:
    """Dotted path of the plugin's any-shape MLA backend for this platform, or None where
    the plugin has none yet (GPU: native shapes only in this release)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return "vllm_mha2mla.backend.MHA2MLACPUBackend"
    return None


def register_attention_backend() -> None:
    """Registers the plugin backend in vLLM's registry under ``CUSTOM`` (the slot both
    0.26 and 0.32 have; 0.32 also takes free-form names), so ``--attention-backend CUSTOM``
    selects it explicitly."""
    path = plugin_backend_class_path()
    if path is None:
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, path)


def requested_backend_name(vllm_config) -> str | None:
    """The attention backend the user named (``--attention-backend``), if any."""
    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    return None if backend is None else getattr(backend, "name", str(backend))


def load_class(dotted: str) -> type:
    import importlib

    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)

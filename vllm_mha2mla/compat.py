"""Everything that differs between the vLLM releases this plugin supports (0.26 CUDA, 0.32 CPU).

Keep version checks here, and nowhere else, so supporting a new release is a one-file change.
"""

from __future__ import annotations

import torch
import vllm
from packaging.version import Version

VLLM_VERSION = Version(vllm.__version__.split("+")[0])


def native_cache_sizes() -> tuple[int, ...]:
    """MLA head sizes the stock kernels of this platform accept (CPU backends: 576 only)."""
    from vllm.platforms import current_platform

    return (576,) if current_platform.is_cpu() else (576, 512, 320)


def default_device() -> torch.device:
    """The device tensors are created on right now (vLLM builds models under a device
    context manager, and buffers must live where the weights will)."""
    return torch.empty(0).device

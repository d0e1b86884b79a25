"""MHA/GQA → MLA conversion (partial RoPE + low-rank joint key/value latent).

Public entry points: :func:`convert` (checkpoint folder → MLA checkpoint folder) and
:func:`load_reference` (the PyTorch reference model of a converted folder).
"""

from conversion.convert import ConvertOptions, convert
from conversion.errors import ConversionError


def load_reference(path, dtype=None):
    """Loads a converted checkpoint as the PyTorch reference model (lazy import of torch
    modelling code keeps ``mha2mla --help`` fast)."""
    import torch

    from conversion.reference_model import load_reference as _load  # inside: ~6 s of modelling code

    return _load(path, dtype=dtype or torch.float32)


__all__ = ["ConversionError", "ConvertOptions", "convert", "load_reference"]

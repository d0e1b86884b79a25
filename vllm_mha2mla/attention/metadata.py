"""MLA metadata for the plugin's backends: vLLM's own, minus its native-head-size check.

vLLM's ``MLACommonMetadata.__post_init__`` refuses cache rows other than 320/576 values even
where a backend can serve them; everything else about the metadata (decode block tables and
sequence lengths, prefill chunking, the prefill backend) is reused as is.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.model_executor.layers.attention.mla_attention import MLACommonMetadata, MLACommonMetadataBuilder
from vllm.v1.attention.backend import AttentionCGSupport

from vllm_mha2mla.attention.backend_name import BACKEND_NAME
from vllm_mha2mla.backend_selection import mha2mla_spec
from vllm_mha2mla.compat import context_workspace, dcp_world_size, head_size_counts_bytes


class AnyShapeBackend:
    """What the plugin's backends (CPU and GPU) share: any cache width, one registry name.
    Mixed in before vLLM's backend class so these override its native-size lists."""

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # any cache width

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size > 0

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME


@dataclass
class MHA2MLAMetadata(MLACommonMetadata):
    """vLLM's MLA metadata without its check that the head size is a native one."""

    def __post_init__(self) -> None:
        pass


def layer_width_view(workspace: torch.Tensor, width: int) -> torch.Tensor:
    """``[rows, width]`` over the storage of a contiguous ``[rows, ≥ width]`` workspace.

    A row-major view, not a column slice: vLLM's context gather writes ``dst[:tokens]`` as
    whole rows and then splits them at ``kv_lora_rank``, so each row must be exactly one
    cached row of the layer's width."""
    rows, widest = workspace.shape
    if width > widest or not workspace.is_contiguous():
        raise ValueError(f"a [{rows}, {widest}] workspace cannot hold rows of {width} values")
    return workspace.view(-1)[: rows * width].view(rows, width)


@contextmanager
def layer_context_width(attn_metadata, width: int):
    """Within the block, the chunked-context workspace of ``attn_metadata``'s prefill (if any) is a view of
    ``width`` values a row over the same memory (:func:`layer_width_view`), then the workspace it was: for a layer
    whose builder may serve layers of other widths (a low-bit cache on vLLM 0.26, :class:`MHA2MLAMetadataBuilder`).
    Layers run one after another, so one layer's view never meets another's."""
    context = getattr(getattr(attn_metadata, "prefill", None), "chunked_context", None)
    if context is None or context.workspace.shape[-1] == width:
        yield
        return
    workspace = context.workspace
    context.workspace = layer_width_view(workspace, width)
    try:
        yield
    finally:
        context.workspace = workspace


class MHA2MLAMetadataBuilder(MLACommonMetadataBuilder):
    """vLLM's MLA metadata builder, producing :class:`MHA2MLAMetadata`.

    With per-layer latent widths, vLLM builds one builder per width (its attention groups are
    keyed by the layer's KV spec). Each builder's chunked-context workspace must have its
    layers' row width (vLLM 0.26 sizes it by ``config.kv_lora_rank``, the widest; 0.32 by its
    first layer), and one buffer serves them all: layers run one after another, so builders
    share the widest workspace through views instead of holding one each.

    A low-bit cache's spec on vLLM 0.26 counts bytes in ``head_size``
    (:func:`~vllm_mha2mla.compat.spec_with_row_bytes`), and layers of different widths whose rows
    have the same bytes share a spec, hence a builder: there the builder keeps the widest
    workspace and each layer views it at its own width while it reads its context
    (:func:`layer_context_width`).
    """

    _context_workspaces: ClassVar[weakref.WeakValueDictionary] = weakref.WeakValueDictionary()

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device, *args, **kwargs):
        if not args:
            kwargs.setdefault("metadata_cls", MHA2MLAMetadata)
        super().__init__(kv_cache_spec, layer_names, vllm_config, device, *args, **kwargs)
        self._fit_context_workspace(kv_cache_spec, vllm_config)

    def _fit_context_workspace(self, kv_cache_spec, vllm_config) -> None:
        workspace = context_workspace(self)
        spec = mha2mla_spec(vllm_config)
        if workspace is None or spec is None or not spec.per_layer or dcp_world_size(self) > 1:
            return
        width = getattr(kv_cache_spec, "head_size", None)
        if width is None:
            raise ValueError(f"vLLM grouped MHA2MLA layers of different widths under {type(kv_cache_spec).__name__}, "
                             "which names no single width; this vLLM cannot serve per-layer latent widths")
        widest = spec.layout.kv_lora_rank + spec.layout.qk_rope_head_dim
        if head_size_counts_bytes(kv_cache_spec):
            width = widest  # a low-bit row's bytes: each layer views the workspace at its width
        key = (str(workspace.device), workspace.dtype, workspace.shape[0], widest)
        shared = self._context_workspaces.get(key)
        if shared is None:
            shared = workspace if workspace.shape[-1] == widest else workspace.new_empty(workspace.shape[0], widest)
            self._context_workspaces[key] = shared
        self.chunked_prefill_workspace = layer_width_view(shared, width)


class MHA2MLAGraphMetadataBuilder(MHA2MLAMetadataBuilder):
    """For kernels whose launch depends only on the batch (decode-only batches run as full
    CUDA graphs, as with vLLM's Triton MLA)."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

"""MLA metadata for the plugin's backends: vLLM's own, minus its native-head-size check.

vLLM's ``MLACommonMetadata.__post_init__`` refuses cache rows other than 320/576 values even
where a backend can serve them; everything else about the metadata (decode block tables and
sequence lengths, prefill chunking, the prefill backend) is reused as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vllm.model_executor.layers.attention.mla_attention import MLACommonMetadata, MLACommonMetadataBuilder
from vllm.v1.attention.backend import AttentionCGSupport

from vllm_mha2mla.backend_name import BACKEND_NAME


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


class MHA2MLAMetadataBuilder(MLACommonMetadataBuilder):
    """vLLM's MLA metadata builder, producing :class:`MHA2MLAMetadata`."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device, *args, **kwargs):
        if not args:
            kwargs.setdefault("metadata_cls", MHA2MLAMetadata)
        super().__init__(kv_cache_spec, layer_names, vllm_config, device, *args, **kwargs)


class MHA2MLAGraphMetadataBuilder(MHA2MLAMetadataBuilder):
    """For kernels whose launch depends only on the batch (decode-only batches run as full
    CUDA graphs, as with vLLM's Triton MLA)."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

"""The plugin's MLA attention backend for shapes vLLM's own kernels refuse.

Stock vLLM MLA accepts cache rows of 576/512/320 values (CPU: 576). MHA2MLA checkpoints
written with their true sizes (say 120 or 1024 values) keep vLLM's paged ``[latent | k_pe]``
layout, its metadata builder, absorbed decode and up-projected prefill; it replaces only the
decode kernel (by :func:`paged_latent_decode`, any width) and the metadata class, whose
``__post_init__`` refuses non-native head sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.model_executor.layers.attention.mla_attention import MLACommonMetadata, MLACommonMetadataBuilder
from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend, CPUMLAImpl

from vllm_mha2mla.paged_attention import paged_latent_decode

from vllm_mha2mla.backend_name import BACKEND_NAME

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


class MHA2MLACPUImpl(CPUMLAImpl):
    """CPU MLA with a decode path for any (kv_lora_rank, qk_rope_head_dim)."""

    def forward_mqa(self, q, kv_c_and_k_pe_cache, attn_metadata, layer):
        assert attn_metadata.decode is not None
        if isinstance(q, tuple):
            q = torch.cat(q, dim=-1)
        out = paged_latent_decode(
            q,
            kv_c_and_k_pe_cache,
            attn_metadata.decode.block_table,
            attn_metadata.decode.seq_lens,
            self.scale,
            self.kv_lora_rank,
        )
        return out, None


class MHA2MLACPUBackend(CPUMLABackend):
    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # any cache width

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size > 0

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[MHA2MLACPUImpl]:
        return MHA2MLACPUImpl

    @staticmethod
    def get_builder_cls() -> type[MHA2MLAMetadataBuilder]:
        return MHA2MLAMetadataBuilder

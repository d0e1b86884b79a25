"""The plugin's CPU MLA attention backend for shapes vLLM's own kernels refuse.

Stock vLLM MLA accepts cache rows of 576/512/320 values (CPU: 576). MHA2MLA checkpoints
written with their true sizes (say 120 or 1024 values) keep vLLM's paged ``[latent | k_pe]``
layout, its metadata builder, absorbed decode and up-projected prefill; it replaces only the
decode kernel (by :func:`paged_latent_decode`, any width) and the metadata class, whose
``__post_init__`` refuses non-native head sizes.
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend, CPUMLAImpl

from vllm_mha2mla.metadata import AnyShapeBackend, MHA2MLAMetadataBuilder
from vllm_mha2mla.paged_attention import paged_latent_decode


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


class MHA2MLACPUBackend(AnyShapeBackend, CPUMLABackend):
    @staticmethod
    def get_impl_cls() -> type[MHA2MLACPUImpl]:
        return MHA2MLACPUImpl

    @staticmethod
    def get_builder_cls() -> type[MHA2MLAMetadataBuilder]:
        return MHA2MLAMetadataBuilder

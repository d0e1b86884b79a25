"""The plugin's CPU MLA attention backend for shapes vLLM's own kernels refuse.

Stock vLLM MLA accepts cache rows of 576/512/320 values (CPU: 576). MHA2MLA checkpoints
written with their true sizes (say 120 or 1024 values) keep vLLM's paged ``[latent | k_pe]``
layout, its metadata builder, absorbed decode and up-projected prefill; it replaces only the
decode kernel and the metadata class, whose ``__post_init__`` refuses non-native head sizes.

Decode: the compiled kernel (:mod:`vllm_mha2mla.attention.cpu_decode_kernel`; AVX-512, bf16 query and
cache read in place) where it runs, else :func:`paged_latent_decode` (PyTorch, any dtype). The
cache write goes through the same extension when it is there (one pass, no host sync).
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend, CPUMLAImpl

from vllm_mha2mla.attention.cpu_decode_kernel import cpu_kernels, kernel_name
from vllm_mha2mla.attention.metadata import AnyShapeBackend, MHA2MLAMetadataBuilder
from vllm_mha2mla.attention.paged_attention import paged_latent_decode


class MHA2MLACPUImpl(CPUMLAImpl):
    """CPU MLA with a decode path for any (kv_lora_rank, qk_rope_head_dim)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kernels = cpu_kernels()  # built here (once per machine), not in the first decode
        self.decode_kernel_name = kernel_name(self.kernels)  # reported by the runner
        self._absorbed_weights_contiguous = False

    @staticmethod
    def _make_absorbed_weights_contiguous(layer) -> None:
        """vLLM keeps W_UK_T and W_UV as transposed views of kv_b_proj's weight, and the CPU bmm of
        its absorbed decode copies such a weight on every call (measured: 39 → 28 µs per W_UK
        product at batch 16). Contiguous copies, once; a weight reload copies into them in place."""
        for name in ("W_UK_T", "W_UV"):
            weight = getattr(layer, name, None)
            if isinstance(weight, torch.Tensor) and not weight.is_contiguous():
                weight.data = weight.data.contiguous()

    def forward_mqa(self, q, kv_c_and_k_pe_cache, attn_metadata, layer):
        assert attn_metadata.decode is not None
        if not self._absorbed_weights_contiguous:  # the weights exist once vLLM has processed them
            self._make_absorbed_weights_contiguous(layer)
            self._absorbed_weights_contiguous = True
        decode = attn_metadata.decode
        q_latent, q_pe = q if isinstance(q, tuple) else (q, None)
        if (self.kernels is not None and q_latent.dtype == torch.bfloat16
                and kv_c_and_k_pe_cache.dtype == torch.bfloat16):
            out = self.kernels.latent_decode(q_latent, q_pe, kv_c_and_k_pe_cache, decode.block_table,
                                             decode.seq_lens, self.scale, self.kv_lora_rank)
        else:
            out = paged_latent_decode(q_latent if q_pe is None else torch.cat((q_latent, q_pe), dim=-1),
                                      kv_c_and_k_pe_cache, decode.block_table, decode.seq_lens, self.scale,
                                      self.kv_lora_rank)
        return out, None

    def do_kv_cache_update(self, kv_c_normed, k_pe, kv_cache, slot_mapping, kv_cache_dtype, k_scale) -> None:
        if (self.kernels is not None and kv_cache_dtype == "auto" and kv_cache.numel() > 0
                and kv_cache.is_contiguous() and kv_c_normed.dtype == k_pe.dtype == kv_cache.dtype
                and kv_c_normed.stride(-1) == 1 and k_pe.stride(-1) == 1):
            self.kernels.write_latent_rows(kv_c_normed, k_pe, kv_cache, slot_mapping)
            return
        super().do_kv_cache_update(kv_c_normed, k_pe, kv_cache, slot_mapping, kv_cache_dtype, k_scale)


class MHA2MLACPUBackend(AnyShapeBackend, CPUMLABackend):
    @staticmethod
    def get_impl_cls() -> type[MHA2MLACPUImpl]:
        return MHA2MLACPUImpl

    @staticmethod
    def get_builder_cls() -> type[MHA2MLAMetadataBuilder]:
        return MHA2MLAMetadataBuilder

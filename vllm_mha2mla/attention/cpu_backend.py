"""The plugin's CPU MLA attention backend for shapes vLLM's own kernels refuse.

Stock vLLM MLA accepts cache rows of 576/512/320 values (CPU: 576). MHA2MLA checkpoints
written with their true sizes (say 120 or 1024 values) keep vLLM's paged ``[latent | k_pe]``
layout, its metadata builder, absorbed decode and up-projected prefill; it replaces only the
decode kernel and the metadata class, whose ``__post_init__`` refuses non-native head sizes.

Decode: the compiled kernel (:mod:`vllm_mha2mla.attention.cpu_decode_kernel`; AVX-512, bf16 query and
cache read in place) where it runs, else :func:`paged_latent_decode` (PyTorch, any dtype). The
cache write goes through the same extension when it is there (one pass, no host sync).

A low-bit cache (``--kv-cache-dtype int4_per_token_head``, the plugin's grouped format:
:data:`~vllm_mha2mla.backend_selection.LOW_BIT_CACHE_FORMATS`) stores uint8 rows of ``row_layout.row_bytes``
(the model hands the impl its layer's :class:`RowLayout`): written with :func:`quantized_cache.write_rows`,
decoded with :func:`quantized_cache.paged_decode`, context rows decoded by vLLM's CPU gather
(:func:`~vllm_mha2mla.patches.read_low_bit_context_on_cpu`); a prefill attends over its own tokens as the
cache returns them (:func:`quantized_cache.as_cached`), so every read of a token sees the same values.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend, CPUMLAImpl

from conversion.mla_format.cache_rows import RowLayout
from vllm_mha2mla.attention import quantized_cache
from vllm_mha2mla.attention.cpu_decode_kernel import cpu_kernels, kernel_name
from vllm_mha2mla.attention.metadata import AnyShapeBackend, MHA2MLAMetadataBuilder
from vllm_mha2mla.attention.paged_attention import paged_latent_decode
from vllm_mha2mla.backend_selection import LOW_BIT_CACHE_FORMATS
from vllm_mha2mla.patches import read_low_bit_context_on_cpu, size_low_bit_cache_pages


class MHA2MLACPUImpl(CPUMLAImpl):
    """CPU MLA with a decode path for any (kv_lora_rank, qk_rope_head_dim)."""

    def __init__(self, *args, cache_row_layout: RowLayout | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # vLLM may keep some layers at "auto" (kv_cache_dtype_skip_layers): those store plain rows
        self.row_layout = cache_row_layout if self.kv_cache_dtype in LOW_BIT_CACHE_FORMATS else None
        self._absorbed_weights_contiguous = False
        if self.row_layout is not None:
            self.kernels = None  # the compiled kernels read bf16 rows; low-bit rows decode in PyTorch
            self.decode_kernel_name = f"torch({self.kv_cache_dtype}, {self.row_layout.row_bytes} B/row)"
            size_low_bit_cache_pages()  # the layer's KV cache spec: this row's bytes
            read_low_bit_context_on_cpu()
            # vLLM's context path picks its gather by this attribute, and its CPU branch refuses quantized caches
            # (it copies rows as stored); the plugin's gather decodes them, so the path reads model-dtype rows.
            self.kv_cache_dtype = "auto"
            return
        self.kernels = cpu_kernels()  # built here (once per machine), not in the first decode
        self.decode_kernel_name = kernel_name(self.kernels)  # reported by the runner

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
        if self.row_layout is not None:
            out = quantized_cache.paged_decode(q_latent if q_pe is None else torch.cat((q_latent, q_pe), dim=-1),
                                               kv_c_and_k_pe_cache.view(torch.uint8), decode.block_table,
                                               decode.seq_lens, self.scale, self.row_layout, self.kv_lora_rank)
        elif (self.kernels is not None and q_latent.dtype == torch.bfloat16
                and kv_c_and_k_pe_cache.dtype == torch.bfloat16):
            out = self.kernels.latent_decode(q_latent, q_pe, kv_c_and_k_pe_cache, decode.block_table,
                                             decode.seq_lens, self.scale, self.kv_lora_rank)
        else:
            out = paged_latent_decode(q_latent if q_pe is None else torch.cat((q_latent, q_pe), dim=-1),
                                      kv_c_and_k_pe_cache, decode.block_table, decode.seq_lens, self.scale,
                                      self.kv_lora_rank)
        return out, None

    def forward_mha(self, q, kv_c_normed, k_pe, kv_c_and_k_pe_cache, attn_metadata, k_scale, output,
                    output_scale=None):
        if self.row_layout is not None:
            kv_c_normed, k_pe = quantized_cache.as_cached(kv_c_normed, k_pe, self.row_layout)
            kv_c_and_k_pe_cache = quantized_cache.LowBitCache(kv_c_and_k_pe_cache.view(torch.uint8), self.row_layout)
        return super().forward_mha(q, kv_c_normed, k_pe, kv_c_and_k_pe_cache, attn_metadata, k_scale, output,
                                   output_scale)

    def do_kv_cache_update(self, kv_c_normed, k_pe, kv_cache, slot_mapping, kv_cache_dtype, k_scale) -> None:
        if self.row_layout is not None:
            if kv_cache.numel() > 0:
                latent = self.row_layout.latent
                row = torch.cat([kv_c_normed, k_pe.reshape(k_pe.shape[0], -1)], dim=-1)
                quantized_cache.write_rows(row[:, :latent], row[:, latent:], kv_cache.view(torch.uint8),
                                           slot_mapping.flatten(), self.row_layout)
            return
        if (self.kernels is not None and kv_cache_dtype == "auto" and kv_cache.numel() > 0
                and kv_cache.is_contiguous() and kv_c_normed.dtype == k_pe.dtype == kv_cache.dtype
                and kv_c_normed.stride(-1) == 1 and k_pe.stride(-1) == 1):
            self.kernels.write_latent_rows(kv_c_normed, k_pe, kv_cache, slot_mapping)
            return
        super().do_kv_cache_update(kv_c_normed, k_pe, kv_cache, slot_mapping, kv_cache_dtype, k_scale)


class MHA2MLACPUBackend(AnyShapeBackend, CPUMLABackend):
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16", *LOW_BIT_CACHE_FORMATS]

    @staticmethod
    def get_impl_cls() -> type[MHA2MLACPUImpl]:
        return MHA2MLACPUImpl

    @staticmethod
    def get_builder_cls() -> type[MHA2MLAMetadataBuilder]:
        return MHA2MLAMetadataBuilder

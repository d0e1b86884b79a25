"""The plugin's GPU MLA backend for shapes vLLM's own kernels refuse.

Same structure as vLLM's ``TRITON_MLA``: vLLM's MLA layer, metadata builder, absorbed
decode and up-projected prefill, with this project's pieces where the shapes differ —
:func:`mla_paged_decode` (Triton, any latent and rope width, fp8 cache), the metadata class
without the native-size check, :class:`MHA2MLAPrefillBackend` (installed by the model
through :mod:`vllm_mha2mla.backend_selection`) and :func:`gather_cache_rows` for context chunks.
Decode-only batches run as full CUDA graphs.

A low-bit cache (``--kv-cache-dtype int4_per_token_head``, the plugin's grouped format:
:data:`~vllm_mha2mla.backend_selection.LOW_BIT_CACHE_FORMATS`; vLLM 0.26 has no MLA kernel for its own meaning of
the name) stores uint8 rows of ``row_layout.row_bytes`` (the model hands the impl its layer's :class:`RowLayout`, as
on CPU), pages sized by those bytes (:func:`~vllm_mha2mla.patches.size_low_bit_cache_pages`,
:func:`~vllm_mha2mla.compat.spec_with_row_bytes`). Written by the Triton write kernel
(:func:`~vllm_mha2mla.attention.triton_low_bit_write.write_low_bit_rows`: no host sync, padding slots skipped on the
device, so the write captured in a decode step's full CUDA graph replays correctly); decoded by
:func:`~vllm_mha2mla.attention.triton_low_bit_decode.low_bit_paged_decode` (rows dequantised in registers); a
prefill attends over its own tokens as the cache returns them (:func:`quantized_cache.as_cached`) and over context
already in the cache (chunked prefill, prefix-cache hits) through vLLM's gather, which the plugin routes to
:meth:`quantized_cache.LowBitCache.gather_tokens` (:func:`~vllm_mha2mla.patches.extend_cache_gather_to_any_width`):
every read of a token sees the same values, those the reference model's ``set_cache_quant`` attends over.
vLLM's MLA layer treats the name as a quantized cache (``is_quantized_kv_cache``): it views the cache as fp8 (the
impl views it back as bytes) and would quantise decode queries to fp8 (``supports_quant_query_input`` is off).
The reasons, with vLLM 0.26's source lines: docs/serving.md, "A 4-bit latent cache".
"""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.model_executor.layers.attention.mla_attention import MLACommonBackend, MLACommonImpl
from vllm.v1.attention.backend import MultipleOf

from conversion.mla_format.cache_rows import RowLayout
from vllm_mha2mla.attention import quantized_cache
from vllm_mha2mla.attention.head_compaction import HeadCompaction, compact_keys, head_compaction
from vllm_mha2mla.attention.metadata import AnyShapeBackend, MHA2MLAGraphMetadataBuilder, layer_context_width
from vllm_mha2mla.attention.prefill import MHA2MLAPrefillBackend, checkpoint_heads, layer_layout_for_dims
from vllm_mha2mla.attention.triton_decode import device_shared_memory, mla_paged_decode, plan_launch
from vllm_mha2mla.attention.triton_low_bit_decode import low_bit_paged_decode, plan_low_bit_launch
from vllm_mha2mla.attention.triton_low_bit_write import check_writable, write_low_bit_rows
from vllm_mha2mla.attention.triton_two_pass_decode import gpu_decode_kernel, plan_two_pass, two_pass_paged_decode
from vllm_mha2mla.backend_selection import LOW_BIT_CACHE_FORMATS
from vllm_mha2mla.patches import extend_cache_gather_to_any_width, size_low_bit_cache_pages


def _is_quantized(kv_cache_dtype: str) -> bool:
    return kv_cache_dtype.startswith("fp8")


class MHA2MLATritonImpl(MLACommonImpl):
    """Absorbed decode through this project's paged Triton kernel."""

    can_return_lse_for_decode: bool = True

    def __init__(self, *args, cache_row_layout: RowLayout | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # vLLM may keep some layers at "auto" (kv_cache_dtype_skip_layers): those store plain rows
        self.row_layout = cache_row_layout if self.kv_cache_dtype in LOW_BIT_CACHE_FORMATS else None
        if self.row_layout is not None:
            self._init_low_bit()
        if _is_quantized(self.kv_cache_dtype) or self.row_layout is not None:
            # Queries stay in the model dtype: the fp8 kernel converts them and the cache to float16, the low-bit
            # one dequantises rows to the queries' dtype (vLLM would quantise them to fp8 for any quantized cache).
            self.supports_quant_query_input = False
        device = torch.cuda.current_device()
        self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        self._shared_memory = device_shared_memory(device)
        from vllm.config import get_current_vllm_config

        self._max_model_len = get_current_vllm_config().model_config.max_model_len
        # The two-pass decode where MHA2MLA_GPU_DECODE asks for it (bf16/fp8 caches; docs/kernels.md).
        self._two_pass = self.row_layout is None and gpu_decode_kernel() == "two-pass"
        # Rows too wide for this GPU's shared memory are refused now, with the sizes, not at the first decode.
        if self.row_layout is not None:
            plan_low_bit_launch(1, self.num_heads, self.row_layout, self._max_model_len, self._num_sms,
                                self._shared_memory)
        elif self._two_pass:
            plan_two_pass(1, self.num_heads, self.kv_lora_rank, self.qk_rope_head_dim, self._max_model_len,
                          self._num_sms, self._shared_memory)
            self.decode_kernel_name = "triton_two_pass"  # the runner's
        else:
            plan_launch(1, self.num_heads, self.kv_lora_rank, self.qk_rope_head_dim, self._max_model_len,
                        self._num_sms, self._shared_memory, fp8_cache=_is_quantized(self.kv_cache_dtype))
        extend_cache_gather_to_any_width()  # chunked-context prefill reads rows of this width
        self._prefill_heads = self._compact_prefill_keys(get_current_vllm_config())

    def _init_low_bit(self) -> None:
        """Checks this layer's low-bit rows against what the GPU kernels read and write (refused now, not at the
        first step) and applies the page-size patch; the context-gather patch is applied with the any-width one."""
        layout = self.row_layout
        if (layout.latent, layout.latent + layout.rope) != (self.kv_lora_rank,
                                                            self.kv_lora_rank + self.qk_rope_head_dim):
            raise ValueError(f"a low-bit row of {layout.latent} latent + {layout.rope} rotary columns: the GPU "
                             f"kernels read the values (kv_lora_rank {self.kv_lora_rank}) from the latent segment "
                             "only (backend_selection.low_bit_values_refusal)")
        check_writable(layout)
        size_low_bit_cache_pages()  # the layer's KV cache spec: this row's bytes
        self.decode_kernel_name = f"triton_low_bit({self.kv_cache_dtype}, {layout.row_bytes} B/row)"  # the runner's

    def _compact_prefill_keys(self, vllm_config) -> HeadCompaction | None:
        """This layer's prefill key geometry where keys are built compact: MHA2MLA checkpoints only
        (the model gives those the plugin's prefill backend, which takes such keys) and only where
        compact is narrower than vLLM's key (else the backend compacts vLLM's own)."""
        shard = checkpoint_heads(vllm_config, self.num_heads)
        if shard is None:
            return None
        layout, first_head = shard
        heads = head_compaction(layer_layout_for_dims(layout, self.qk_nope_head_dim, self.qk_rope_head_dim),
                                first_head, self.num_heads, self.v_head_dim, MHA2MLAPrefillBackend.PAD_TO)
        return heads if heads.narrows_keys else None

    def _concat_k_nope_k_pe(self, k_nope: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        """Prefill keys (new tokens and context chunks): only the columns attention needs
        (:func:`compact_keys`), instead of every head's nope dims beside the whole repeated rope
        slot — for the native 576 layout 128 of 192 dims, for the paper's 1024 values 128 of 624."""
        if self._prefill_heads is None:
            return super()._concat_k_nope_k_pe(k_nope, k_pe)
        return compact_keys(k_nope, k_pe, self._prefill_heads)

    def forward_mqa(self, q, kv_c_and_k_pe_cache, attn_metadata, layer):
        assert attn_metadata.decode is not None
        if isinstance(q, tuple):
            q = torch.cat(q, dim=-1)
        # A captured CUDA graph keeps its split count for every later length: plan for the longest.
        capturing = torch.cuda.is_current_stream_capturing()
        max_seq_len = self._max_model_len if capturing else int(getattr(attn_metadata, "max_seq_len", self._max_model_len))
        if self.row_layout is not None:
            return low_bit_paged_decode(q, kv_c_and_k_pe_cache.view(torch.uint8), attn_metadata.decode.block_table,
                                        attn_metadata.decode.seq_lens, self.scale, self.row_layout, max_seq_len,
                                        kv_lora_rank=self.kv_lora_rank, num_sms=self._num_sms,
                                        shared_memory=self._shared_memory)
        k_scale = layer._k_scale if _is_quantized(self.kv_cache_dtype) else None
        if self._two_pass:  # its probabilities' scratch is batch x heads x max_seq_len (CUDA graphs: max_model_len)
            plan = plan_two_pass(q.shape[0], self.num_heads, self.kv_lora_rank, self.qk_rope_head_dim, max_seq_len,
                                 self._num_sms, self._shared_memory)
            return two_pass_paged_decode(q, kv_c_and_k_pe_cache, attn_metadata.decode.block_table,
                                         attn_metadata.decode.seq_lens, self.scale, self.kv_lora_rank, max_seq_len,
                                         plan, k_scale=k_scale)
        return mla_paged_decode(
            q,
            kv_c_and_k_pe_cache,
            attn_metadata.decode.block_table,
            attn_metadata.decode.seq_lens,
            self.scale,
            self.kv_lora_rank,
            max_seq_len,
            k_scale=k_scale,
            num_sms=self._num_sms,
            shared_memory=self._shared_memory,
        )

    def forward_mha(self, q, kv_c_normed, k_pe, kv_c_and_k_pe_cache, attn_metadata, k_scale, output,
                    output_scale=None):
        if self.row_layout is None:
            return super().forward_mha(q, kv_c_normed, k_pe, kv_c_and_k_pe_cache, attn_metadata, k_scale, output,
                                       output_scale)
        kv_c_normed, k_pe = quantized_cache.as_cached(kv_c_normed, k_pe, self.row_layout)
        cache = quantized_cache.LowBitCache(kv_c_and_k_pe_cache.view(torch.uint8), self.row_layout)
        with layer_context_width(attn_metadata, self.kv_lora_rank + self.qk_rope_head_dim):
            return super().forward_mha(q, kv_c_normed, k_pe, cache, attn_metadata, k_scale, output, output_scale)

    def do_kv_cache_update(self, kv_c_normed, k_pe, kv_cache, slot_mapping, kv_cache_dtype, k_scale) -> None:
        if self.row_layout is None:
            return super().do_kv_cache_update(kv_c_normed, k_pe, kv_cache, slot_mapping, kv_cache_dtype, k_scale)
        if kv_cache.numel() > 0:
            write_low_bit_rows(kv_c_normed, k_pe, kv_cache.view(torch.uint8), slot_mapping.flatten(),
                               self.row_layout)


class MHA2MLATritonBackend(AnyShapeBackend, MLACommonBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16", "fp8", "fp8_e4m3",
                                                      *LOW_BIT_CACHE_FORMATS]
    low_bit_values_from_latent: ClassVar[bool] = True
    """Its low-bit kernels read a row's values from the latent segment (``backend_selection.check_cache_dtype``)."""

    @staticmethod
    def get_supported_kernel_block_sizes() -> list:
        return [MultipleOf(16)]

    @classmethod
    def supports_block_size(cls, block_size: int | None) -> bool:
        return block_size is None or block_size % 16 == 0

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return True

    @staticmethod
    def get_impl_cls() -> type[MHA2MLATritonImpl]:
        return MHA2MLATritonImpl

    @staticmethod
    def get_builder_cls() -> type[MHA2MLAGraphMetadataBuilder]:
        return MHA2MLAGraphMetadataBuilder

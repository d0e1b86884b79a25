"""The plugin's GPU MLA backend for shapes vLLM's own kernels refuse.

Same structure as vLLM's ``TRITON_MLA``: vLLM's MLA layer, metadata builder, absorbed
decode and up-projected prefill, with this project's pieces where the shapes differ —
:func:`mla_paged_decode` (Triton, any latent and rope width, fp8 cache), the metadata class
without the native-size check, :class:`MHA2MLAPrefillBackend` (installed by the model
through :mod:`vllm_mha2mla.backend_selection`) and :func:`gather_cache_rows` for context chunks.
Decode-only batches run as full CUDA graphs.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.model_executor.layers.attention.mla_attention import MLACommonBackend, MLACommonImpl
from vllm.v1.attention.backend import MultipleOf

from vllm_mha2mla.attention.head_compaction import HeadCompaction, compact_keys, head_compaction
from vllm_mha2mla.attention.metadata import AnyShapeBackend, MHA2MLAGraphMetadataBuilder
from vllm_mha2mla.attention.prefill import MHA2MLAPrefillBackend, checkpoint_heads, layer_layout_for_dims
from vllm_mha2mla.attention.triton_decode import device_shared_memory, mla_paged_decode, plan_launch
from vllm_mha2mla.patches import extend_cache_gather_to_any_width


def _is_quantized(kv_cache_dtype: str) -> bool:
    return kv_cache_dtype.startswith("fp8")


class MHA2MLATritonImpl(MLACommonImpl):
    """Absorbed decode through this project's paged Triton kernel."""

    can_return_lse_for_decode: bool = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if _is_quantized(self.kv_cache_dtype):
            # Queries stay in the model dtype; the kernel converts them and the fp8 cache to float16.
            self.supports_quant_query_input = False
        device = torch.cuda.current_device()
        self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        self._shared_memory = device_shared_memory(device)
        from vllm.config import get_current_vllm_config

        self._max_model_len = get_current_vllm_config().model_config.max_model_len
        # Rows too wide for this GPU's shared memory are refused now, with the sizes, not at the first decode.
        plan_launch(1, self.num_heads, self.kv_lora_rank, self.qk_rope_head_dim, self._max_model_len,
                    self._num_sms, self._shared_memory, fp8_cache=_is_quantized(self.kv_cache_dtype))
        extend_cache_gather_to_any_width()  # chunked-context prefill reads rows of this width
        self._prefill_heads = self._compact_prefill_keys(get_current_vllm_config())

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
        k_scale = layer._k_scale if _is_quantized(self.kv_cache_dtype) else None
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


class MHA2MLATritonBackend(AnyShapeBackend, MLACommonBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16", "fp8", "fp8_e4m3"]

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

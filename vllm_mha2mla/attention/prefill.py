"""MLA prefill for any ``(qk_nope, qk_rope, v)``: the plugin's prefill backend.

vLLM's MLA prefill kernels accept three head shapes. MHA2MLA's exact layout has
``qk_nope = d - rope_dim``, ``qk_rope = g·rope_dim`` (every kv-head's rotated keys share the
slot) and ``v = d``: for Llama-2-7B at the paper's 1024-value config that is (112, 512, 128),
a 624-dim query·key product no FlashAttention kernel takes. But each query head is zero on
every column except its nope dims and its own kv-head's slot columns, so attention over those
alone (``d`` = 128 dims here, and for the native 576 layout too) is exactly the same attention
(:mod:`vllm_mha2mla.attention.head_compaction`). This backend gathers those columns, zero-pads the head
dims to a multiple of 8 where they are not one (zeros change no dot product), runs
FlashAttention varlen and slices the value dims back. Without FlashAttention, or past its
256-dim limit, a PyTorch path computes the same thing (also the reference the tests hold the
fast path to).
"""

from __future__ import annotations

import weakref

import torch

from conversion.mla_format.layout import MLALayout
from vllm_mha2mla import compat
from vllm_mha2mla.attention.head_compaction import HeadCompaction, compact_heads, head_compaction, pad_last, padded_heads
from vllm_mha2mla.backend_selection import mha2mla_spec

MLAPrefillBackend = compat.mla_prefill_backend_base()
CPUSDPAMLAPrefillBackend = compat.cpu_sdpa_prefill_backend()

FLASH_ATTN_MAX_HEAD_DIM = 256


def _per_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                  attend) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs ``attend(q_i, k_i, v_i) -> (out_i [Tq, H, Dv], lse_i [H, Tq])`` on each sequence of a
    ragged batch and lays the results out as FlashAttention does (``[Tq, H, Dv]``, ``[H, Tq]``)."""
    out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    for i in range(len(cu_q) - 1):
        qs, qe, ks, ke = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        if qe > qs:
            out[qs:qe], lse[:, qs:qe] = attend(q[qs:qe], k[ks:ke], v[ks:ke])
    return out, lse


def varlen_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
    scale: float, causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence attention in float32: ``out`` ``[Tq, H, Dv]`` and ``lse`` ``[H, Tq]``
    (FlashAttention's layouts). Causal masks align the query to the end of its keys."""

    def attend(qi, ki, vi):
        scores = torch.einsum("qhd,khd->hqk", qi.float(), ki.float()) * scale
        if causal:
            rows = torch.arange(qi.shape[0], device=q.device)[:, None] + (ki.shape[0] - qi.shape[0])
            scores = scores.masked_fill(torch.arange(ki.shape[0], device=q.device)[None, :] > rows, float("-inf"))
        return torch.einsum("hqk,khd->qhd", scores.softmax(-1), vi.float()).to(q.dtype), scores.logsumexp(-1)

    return _per_sequence(q, k, v, cu_q, cu_k, attend)


def checkpoint_heads(vllm_config, num_heads: int) -> tuple[MLALayout, int] | None:
    """(layout, first head of this rank) when the model is an MHA2MLA checkpoint, else None."""
    spec = mha2mla_spec(vllm_config)
    if spec is None:
        return None
    from vllm.distributed import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
    return spec.layout, rank * num_heads


def layer_layout_for_width(layout: MLALayout, qk_width: int) -> MLALayout:
    """The layout of a layer whose query/key heads are ``qk_width`` wide.

    vLLM builds one prefill backend per group of layers and calls it with every layer's q and
    k, so a checkpoint whose layers keep different rotary dims (exact layouts: ``qk_nope = d -
    r``, ``qk_rope = g·r``, width ``d + (g-1)·r``) tells each layer apart by that width alone."""
    if qk_width == layout.qk_nope_head_dim + layout.qk_rope_head_dim or layout.num_kv_heads == 1:
        return layout
    rope_dim, rest = divmod(qk_width - layout.head_dim, layout.num_kv_heads - 1)
    if rest or rope_dim <= 0:
        raise ValueError(f"a query head of {qk_width} dims fits no rotary width of this checkpoint's layout")
    return layout.with_rope(rope_dim)


def layer_layout_for_dims(layout: MLALayout, qk_nope: int, qk_rope: int) -> MLALayout:
    """The layout of a layer whose heads are ``qk_nope`` + ``qk_rope`` wide (each attention
    implementation knows both; the width alone leaves one kv-head's rotary dims open)."""
    if (qk_nope, qk_rope) == (layout.qk_nope_head_dim, layout.qk_rope_head_dim):
        return layout
    rope_dim, rest = divmod(qk_rope, layout.num_kv_heads)
    lay = None if rest or rope_dim <= 0 else layout.with_rope(rope_dim)
    if lay is None or lay.qk_nope_head_dim != qk_nope:
        raise ValueError(f"heads of {qk_nope} nope + {qk_rope} rope dims fit no rotary width of this checkpoint's layout")
    return lay


class _CompactedHeads:
    """What the GPU and CPU prefill backends share: each query/key head reduced to the columns
    it attends over (:mod:`vllm_mha2mla.attention.head_compaction`), all three of q, k and v zero-padded
    to one head size (a multiple of ``PAD_TO``), values sliced back after. Layers with their own
    rotary dims are told apart by their query width. Keys may arrive already compact (the GPU
    implementation builds them so: :meth:`MHA2MLATritonImpl._concat_k_nope_k_pe`); a key as
    wide as its query is vLLM's full one.

    vLLM hands one layer's query unchanged to the new-token call and to each of its context
    chunks; a query that will be seen again is compacted once (:meth:`_compact_query`)."""

    PAD_TO = 1

    def __init__(self, num_heads, scale, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim,
                 vllm_config) -> None:
        super().__init__(num_heads=num_heads, scale=scale, kv_lora_rank=kv_lora_rank,
                         qk_nope_head_dim=qk_nope_head_dim, qk_rope_head_dim=qk_rope_head_dim,
                         v_head_dim=v_head_dim, vllm_config=vllm_config)
        self._shard = checkpoint_heads(vllm_config, num_heads)
        self._compaction_by_width: dict[int, HeadCompaction] = {}
        self._query_memo: tuple[weakref.ref, int | None, torch.Tensor] | None = None
        self.padded_dim = self.head_geometry(qk_nope_head_dim + qk_rope_head_dim).padded_dim

    def head_geometry(self, qk_width: int) -> HeadCompaction:
        """The compaction of a layer whose query heads are ``qk_width`` wide."""
        found = self._compaction_by_width.get(qk_width)
        if found is None:
            if self._shard is None:
                found = padded_heads(self.num_heads, self.qk_nope_head_dim, qk_width - self.qk_nope_head_dim,
                                     self.v_head_dim, self.PAD_TO)
            else:
                layout, first_head = self._shard
                found = head_compaction(layer_layout_for_width(layout, qk_width), first_head, self.num_heads,
                                        self.v_head_dim, self.PAD_TO)
            self._compaction_by_width[qk_width] = found
        return found

    def _compacted(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   query_seen_again: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        heads = self.head_geometry(q.shape[-1])
        if k.shape[-1] != q.shape[-1] and k.shape[-1] != heads.padded_dim:
            raise ValueError(f"keys {k.shape[-1]} wide fit neither the queries ({q.shape[-1]}) nor their "
                             f"compact heads ({heads.padded_dim})")
        k = compact_heads(k, heads) if k.shape[-1] == q.shape[-1] else k
        return self._compact_query(q, heads, query_seen_again), k, pad_last(v, heads.padded_dim)

    def _compact_query(self, q: torch.Tensor, heads: HeadCompaction, seen_again: bool) -> torch.Tensor:
        """``q`` compacted, reusing the last call's result when it was this very query, unchanged
        (same object, same version counter). Kept only while ``seen_again`` (more context chunks of
        this layer follow), so no compact query outlives its layer's attention: vLLM's memory
        profile, taken on the same calls, sees at most one at a time, as without the memo."""
        version = None if q.is_inference() else q._version  # inference tensors keep no version counter
        memo = self._query_memo
        if memo is not None and memo[0]() is q and memo[1] == version:
            compact = memo[2]
        else:
            compact = compact_heads(q, heads)
        self._query_memo = (weakref.ref(q), version, compact) if seen_again else None
        return compact

    def _value_dims(self, out: torch.Tensor) -> torch.Tensor:
        # contiguous: vLLM merges context and new-token outputs and needs equal strides
        return out if out.shape[-1] == self.v_head_dim else out[..., : self.v_head_dim].contiguous()


class MHA2MLAPrefillBackend(_CompactedHeads, MLAPrefillBackend):
    """FlashAttention varlen on compacted, zero-padded heads; PyTorch where FA cannot run."""

    PAD_TO = 8

    @staticmethod
    def get_name() -> str:
        return "MHA2MLA_PREFILL"

    @classmethod
    def supports_mla_dimensions(cls, mla_dimensions) -> bool:
        return True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.flash_attn = self._load_flash_attn() if self.padded_dim <= FLASH_ATTN_MAX_HEAD_DIM else None

    def _load_flash_attn(self):
        try:
            from vllm.v1.attention.backends.fa_utils import (
                flash_attn_varlen_func,
                get_flash_attn_version,
                is_flash_attn_varlen_func_available,
            )
        except ImportError:
            return None
        if not is_flash_attn_varlen_func_available():
            return None
        import functools

        version = get_flash_attn_version(head_size=self.padded_dim, head_size_v=self.padded_dim)
        return functools.partial(flash_attn_varlen_func, fa_version=version) if version else flash_attn_varlen_func

    @property
    def kernel_name(self) -> str:
        return "flash_attn_varlen" if self.flash_attn is not None else "torch"

    def _attend(self, q, k, v, cu_q, cu_k, max_q, max_k, causal: bool, query_seen_again: bool):
        q, k, v = self._compacted(q, k, v, query_seen_again)
        if self.flash_attn is None:
            out, lse = varlen_attention_reference(q, k, v, cu_q, cu_k, self.scale, causal)
        else:
            out, lse = self.flash_attn(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                                       max_seqlen_k=max_k, softmax_scale=self.scale, causal=causal,
                                       return_softmax_lse=True)
        return self._value_dims(out), lse

    def run_prefill_new_tokens(self, q, k, v, return_softmax_lse, out=None, output_scale=None):
        if output_scale is not None:
            raise NotImplementedError("the MHA2MLA prefill backend does not write quantized output")
        meta = self._prefill_metadata
        result, lse = self._attend(q, k, v, meta.query_start_loc, meta.query_start_loc,
                                   meta.max_query_len, meta.max_query_len, causal=True,
                                   query_seen_again=meta.chunked_context is not None)
        if out is not None:
            out.copy_(result)
            result = out
        return (result, lse) if return_softmax_lse else result

    def run_prefill_context_chunk(self, chunk_idx, q, k, v):
        meta = self._prefill_metadata
        chunk = meta.chunked_context
        return self._attend(q, k, v, meta.query_start_loc, chunk.cu_seq_lens[chunk_idx], meta.max_query_len,
                            chunk.max_seq_lens[chunk_idx], causal=False,
                            query_seen_again=chunk_idx + 1 < len(chunk.max_seq_lens))


def cpu_flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                     scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`varlen_attention_reference` with PyTorch's fused CPU flash attention, one sequence
    at a time (q, k and v of one head size). Causal sequences here have as many queries as keys
    (new tokens attend to themselves; context chunks are never causal)."""

    def attend(qi, ki, vi):
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qi.transpose(0, 1)[None], ki.transpose(0, 1)[None], vi.transpose(0, 1)[None], 0.0, causal,
            attn_mask=None, scale=scale)
        return o[0].transpose(0, 1), lse[0]

    return _per_sequence(q, k, v, cu_q, cu_k, attend)


if CPUSDPAMLAPrefillBackend is not None:

    class MHA2MLACPUPrefillBackend(_CompactedHeads, CPUSDPAMLAPrefillBackend):
        """vLLM's CPU MLA prefill with its per-request dense attention (float32 ``[H, S, S]``
        scores, an explicit mask and softmax: most of a scoring run's attention time on the CPU)
        replaced by PyTorch's fused CPU flash attention on the same compacted, zero-padded
        heads as the GPU backend (that kernel needs one head size for q, k and v)."""

        kernel_name = "torch_cpu_flash"

        @staticmethod
        def get_name() -> str:
            return "MHA2MLA_CPU_PREFILL"

        def _ragged_sdpa(self, q, k, v, q_cu_seq_lens, kv_cu_seq_lens, causal, return_softmax_lse):
            out, lse = cpu_flash_varlen(*self._compacted(q, k, v), q_cu_seq_lens, kv_cu_seq_lens, self.scale, causal)
            out = self._value_dims(out)
            return (out, lse) if return_softmax_lse else out

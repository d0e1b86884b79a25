"""A low-bit latent cache in vLLM's paged layout, in PyTorch: the write, the decode read and the prefill-context
gather over rows of :class:`~conversion.mla_format.cache_rows.RowLayout` bytes (issue 33).

The cache is uint8 ``[num_blocks, block_size, row_bytes]``: one row of bytes per token, a page per block, so
vLLM's block tables, slot mappings and prefix caching address it exactly as a bfloat16 latent cache (only the
row's width differs, and KV capacity follows ``row_bytes``). A token's row is quantised once, when written, and
never changes — what chunked prefill and prefix caching need. These are the reference path (any device, any
width); a fused kernel (dequantising in registers) is tested against them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from conversion.mla_format.cache_rows import RowLayout, decode_rows, encode_rows
from vllm_mha2mla.attention.cache_gather import context_rows
from vllm_mha2mla.attention.paged_attention import paged_latent_decode


def write_rows(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
               layout: RowLayout) -> None:
    """Quantise tokens' rows and store them at their slots (``block * block_size + offset``); a negative slot
    (vLLM's padding tokens) is skipped. ``kv_c`` ``[T, latent]``, ``k_pe`` ``[T, rope]`` (or ``[T, 1, rope]``)."""
    if kv_cache.dtype != torch.uint8 or kv_cache.shape[-1] != layout.row_bytes:
        raise ValueError(f"a low-bit cache is uint8 [blocks, block_size, {layout.row_bytes}], not "
                         f"{kv_cache.dtype} {list(kv_cache.shape)}")
    k_pe = k_pe.reshape(k_pe.shape[0], -1)
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        kv_c, k_pe, slot_mapping = kv_c[keep], k_pe[keep], slot_mapping[keep]
    if slot_mapping.numel() == 0:
        return
    rows = encode_rows(kv_c, k_pe, layout)
    kv_cache.view(-1, layout.row_bytes)[slot_mapping.long()] = rows


def row_reader(layout: RowLayout) -> Callable[[torch.Tensor], torch.Tensor]:
    """Cache rows (uint8 ``[..., row_bytes]``) → values ``[..., latent + rope]`` in float32."""
    def read(rows: torch.Tensor) -> torch.Tensor:
        latent, rope = decode_rows(rows, layout)
        return torch.cat([latent, rope], dim=-1)
    return read


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                 scale: float, layout: RowLayout, kv_lora_rank: int | None = None) -> torch.Tensor:
    """Absorbed MLA decode over a low-bit cache: ``q`` ``[B, H, latent + rope]`` → ``[B, H, kv_lora_rank]``, the
    values being a row's first ``kv_lora_rank`` columns (default ``layout.latent``; a native-layout row's ``kv_c``
    also holds rotary keys and padding after the latent, which the absorbed value projection reads too)."""
    values = layout.latent if kv_lora_rank is None else kv_lora_rank
    return paged_latent_decode(q, kv_cache, block_table, seq_lens, scale, values, read_rows=row_reader(layout))


def gather_context(kv_cache: torch.Tensor, block_table: torch.Tensor, cu_seq_lens: torch.Tensor,
                   token_to_seq: torch.Tensor, num_tokens: int, layout: RowLayout, dtype: torch.dtype,
                   seq_starts: torch.Tensor | None = None) -> torch.Tensor:
    """The context tokens' rows ``[num_tokens, latent + rope]`` in ``dtype``, for a prefill that has earlier
    context in the cache (chunked prefill, a prefix-cache hit)."""
    rows = context_rows(kv_cache, block_table, cu_seq_lens, token_to_seq, num_tokens, seq_starts)
    return row_reader(layout)(rows).to(dtype)


def as_cached(kv_c: torch.Tensor, k_pe: torch.Tensor, layout: RowLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens' ``kv_c`` ``[T, kv_lora_rank]`` and ``k_pe`` ``[T, ..., rope]`` as the cache returns them (stored and
    read back, in their dtype), split at the layout's latent wherever that falls in vLLM's ``[kv_c | k_pe]`` row:
    what a prefill attends over for its own tokens, so that a token reads the same values whether its row comes
    from this chunk or from the cache (chunked prefill, prefix caching), as in the reference model."""
    rank = kv_c.shape[-1]
    row = torch.cat([kv_c, k_pe.reshape(k_pe.shape[0], -1)], dim=-1)
    values = row_reader(layout)(encode_rows(row[:, :layout.latent], row[:, layout.latent:], layout)).to(row.dtype)
    return values[:, :rank], values[:, rank:].reshape(k_pe.shape)


@dataclass(frozen=True)
class LowBitCache:
    """A paged low-bit cache (uint8 ``[blocks, block_size, row_bytes]``) with the layout of its rows: what the
    plugin hands vLLM's prefill-context path in place of the cache tensor, so the gather it calls decodes rows
    (CPU: :func:`vllm_mha2mla.patches.read_low_bit_context_on_cpu`, GPU:
    :func:`vllm_mha2mla.patches.extend_cache_gather_to_any_width`) instead of copying bytes."""

    rows: torch.Tensor
    layout: RowLayout

    def gather(self, dst: torch.Tensor, block_table: torch.Tensor, cu_seq_lens: torch.Tensor,
               seq_starts: torch.Tensor | None = None) -> None:
        """``dst[:n]`` = the decoded rows of the ``n = cu_seq_lens[-1]`` context tokens of the requests
        ``block_table`` lists (request ``b``'s tokens from position ``seq_starts[b]``)."""
        lens = cu_seq_lens[1:] - cu_seq_lens[:-1]
        n = int(cu_seq_lens[-1])
        token_to_seq = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens.long())
        self.gather_tokens(dst, block_table, cu_seq_lens, token_to_seq, n, seq_starts)

    def gather_tokens(self, dst: torch.Tensor, block_table: torch.Tensor, cu_seq_lens: torch.Tensor,
                      token_to_seq: torch.Tensor, num_tokens: int, seq_starts: torch.Tensor | None = None) -> None:
        """``dst[:num_tokens]`` = the decoded rows of the context tokens, token ``t`` of request ``token_to_seq[t]``
        (the arguments of vLLM's CUDA gather ``gather_and_maybe_dequant_cache``, which the plugin routes here on a
        GPU: :func:`vllm_mha2mla.patches.extend_cache_gather_to_any_width`); no host synchronisation."""
        if num_tokens == 0:
            return
        dst[:num_tokens] = gather_context(self.rows, block_table, cu_seq_lens, token_to_seq, num_tokens, self.layout,
                                          dst.dtype, seq_starts)

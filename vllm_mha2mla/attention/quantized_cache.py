"""A low-bit latent cache in vLLM's paged layout, in PyTorch: the write, the decode read and the prefill-context
gather over rows of :class:`~conversion.mla_format.cache_rows.RowLayout` bytes (issue 33).

The cache is uint8 ``[num_blocks, block_size, row_bytes]``: one row of bytes per token, a page per block, so
vLLM's block tables, slot mappings and prefix caching address it exactly as a bfloat16 latent cache (only the
row's width differs, and KV capacity follows ``row_bytes``). A token's row is quantised once, when written, and
never changes — what chunked prefill and prefix caching need. These are the reference path (any device, any
width); a fused kernel (dequantising in registers) is tested against them.
"""

from __future__ import annotations

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
                 scale: float, layout: RowLayout) -> torch.Tensor:
    """Absorbed MLA decode over a low-bit cache: ``q`` ``[B, H, latent + rope]`` → ``[B, H, latent]``."""
    return paged_latent_decode(q, kv_cache, block_table, seq_lens, scale, layout.latent, read_rows=row_reader(layout))


def gather_context(kv_cache: torch.Tensor, block_table: torch.Tensor, cu_seq_lens: torch.Tensor,
                   token_to_seq: torch.Tensor, num_tokens: int, layout: RowLayout, dtype: torch.dtype,
                   seq_starts: torch.Tensor | None = None) -> torch.Tensor:
    """The context tokens' rows ``[num_tokens, latent + rope]`` in ``dtype``, for a prefill that has earlier
    context in the cache (chunked prefill, a prefix-cache hit)."""
    rows = context_rows(kv_cache, block_table, cu_seq_lens, token_to_seq, num_tokens, seq_starts)
    return row_reader(layout)(rows).to(dtype)

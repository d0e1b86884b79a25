"""Gathering cached MLA rows of any width for chunked prefill and prefix caching.

When a prefill has earlier context in the cache (a chunked prefill, a prefix-cache hit),
vLLM copies those rows out of the paged cache with ``gather_and_maybe_dequant_cache``, a
CUDA op compiled for rows of 320 or 576 values only. This is the same gather for any width,
in PyTorch (one indexed copy; prefill-only, so never inside a CUDA graph). Pure function,
tested against a per-token loop; :func:`vllm_mha2mla.patches.extend_cache_gather_to_any_width`
routes vLLM's op here for widths its kernel lacks.
"""

from __future__ import annotations

import torch


def gather_cache_rows(
    src_cache: torch.Tensor,
    dst: torch.Tensor,
    block_table: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    token_to_seq: torch.Tensor,
    num_tokens: int,
    kv_cache_dtype: str,
    scale: torch.Tensor,
    seq_starts: torch.Tensor | None = None,
) -> None:
    """``dst[t] = cache row of token t`` for ``t < num_tokens`` (vLLM's op, any width).

    Token ``t`` belongs to request ``b = token_to_seq[t]`` at position
    ``t - cu_seq_lens[b] + seq_starts[b]`` of that request; an fp8 cache is multiplied by
    ``scale`` on the way out.
    """
    if num_tokens == 0:
        return
    rows = context_rows(src_cache, block_table, cu_seq_lens, token_to_seq, num_tokens, seq_starts)
    if kv_cache_dtype.startswith("fp8"):
        rows = rows.float() * scale.float()
    dst[:num_tokens] = rows.to(dst.dtype)


def context_rows(src_cache: torch.Tensor, block_table: torch.Tensor, cu_seq_lens: torch.Tensor,
                 token_to_seq: torch.Tensor, num_tokens: int, seq_starts: torch.Tensor | None = None) -> torch.Tensor:
    """The cached rows ``[num_tokens, row]`` of the context tokens, as stored (see :func:`gather_cache_rows`
    for the indexing); a low-bit cache's reader decodes them after."""
    block_size = src_cache.shape[1]
    tokens = torch.arange(num_tokens, device=src_cache.device)
    seq = token_to_seq[:num_tokens].long()
    pos = tokens - cu_seq_lens.long()[seq]
    if seq_starts is not None:
        pos = pos + seq_starts.long()[seq]
    blocks = block_table.long()[seq, pos // block_size]
    return src_cache[blocks, pos % block_size]

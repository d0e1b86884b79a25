"""Paged MQA decode over an MLA latent cache of any width, in plain PyTorch.

The cache holds one row ``[latent (kv_lora_rank) | k_pe (rope)]`` per token in blocks of
``block_size`` tokens; a request's tokens live in the blocks its block-table row lists.
Decode (weights absorbed) is multi-query attention of every head over those rows, with the
values being the latent part of the same rows. Pure function: tested on its own against
dense attention, used by the plugin's backend wherever vLLM's kernels refuse the shape.
"""

from __future__ import annotations

from typing import Callable

import torch


def gather_paged_rows(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """``[num_blocks, block_size, D]`` cache → ``[batch, max_len, D]`` rows (padding arbitrary)."""
    block_size = kv_cache.shape[1]
    max_len = int(seq_lens.max())
    pos = torch.arange(max_len, device=kv_cache.device)
    blocks = block_table[:, pos // block_size].long()  # [B, L]
    return kv_cache[blocks, (pos % block_size)[None, :]]


def paged_latent_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    kv_lora_rank: int,
    chunk_tokens: int = 4096,
    read_rows: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """One query token per request: ``q`` ``[B, H, D]`` → ``[B, H, kv_lora_rank]``.

    Softmax in float32 (or the inputs' wider dtype). Requests are processed in groups so the gathered rows stay below
    ``chunk_tokens`` × batch-group rows at a time. ``read_rows`` turns gathered cache rows into ``[..., D]`` values
    (a low-bit cache's bytes: :func:`vllm_mha2mla.attention.quantized_cache.row_reader`); only the rows a group
    reads are decoded, never the whole cache.
    """
    batch = q.shape[0]
    compute = torch.promote_types(q.dtype, torch.float32)
    out = torch.empty(batch, q.shape[1], kv_lora_rank, dtype=q.dtype, device=q.device)
    lens = seq_lens.long()
    order = torch.argsort(lens)  # similar lengths together: less padding per group
    start = 0
    while start < batch:
        end = start + 1
        while end < batch and int(lens[order[end]]) * (end + 1 - start) <= chunk_tokens * 8:
            end += 1
        idx = order[start:end]
        rows = gather_paged_rows(kv_cache, block_table[idx], lens[idx])
        rows = (rows if read_rows is None else read_rows(rows)).to(compute)  # [b, L, D]
        qf = q[idx].to(compute)
        scores = torch.einsum("bhd,bld->bhl", qf, rows) * scale
        valid = torch.arange(rows.shape[1], device=q.device)[None, :] < lens[idx][:, None]
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[idx] = torch.einsum("bhl,bld->bhd", probs, rows[..., :kv_lora_rank]).to(q.dtype)
        start = end
    return out

"""Paged latent decode against dense attention (pure PyTorch, no engine)."""

import pytest
import torch

from vllm_mha2mla.paged_attention import gather_paged_rows, paged_latent_decode


@pytest.mark.parametrize("latent,rope,block", [(96, 24, 16), (448, 64, 16), (1024, 128, 8), (7, 3, 4)])
def test_paged_decode_equals_dense_attention(latent, rope, block):
    g = torch.Generator().manual_seed(latent + rope)
    lens = torch.tensor([1, 5, 33, 17, 64])
    batch, heads, width = len(lens), 6, latent + rope
    blocks_per_req = (int(lens.max()) + block - 1) // block
    num_blocks = batch * blocks_per_req + 3
    cache = torch.randn(num_blocks, block, width, generator=g, dtype=torch.float64)
    table = torch.randperm(num_blocks, generator=g)[: batch * blocks_per_req].view(batch, blocks_per_req)
    q = torch.randn(batch, heads, width, generator=g, dtype=torch.float64)
    out = paged_latent_decode(q, cache, table, lens, 0.3, latent, chunk_tokens=16)
    for b in range(batch):
        rows = torch.cat([cache[table[b, i]] for i in range(blocks_per_req)])[: lens[b]]
        want = torch.softmax(q[b] @ rows.T * 0.3, -1) @ rows[:, :latent]
        torch.testing.assert_close(out[b], want, rtol=1e-6, atol=1e-6)


def test_gather_follows_the_block_table():
    cache = torch.arange(4 * 2 * 1, dtype=torch.float32).view(4, 2, 1)  # row value = global slot
    rows = gather_paged_rows(cache, torch.tensor([[3, 1], [0, 2]]), torch.tensor([3, 4]))
    assert rows[0, :3, 0].tolist() == [6, 7, 2] and rows[1, :, 0].tolist() == [0, 1, 4, 5]


@pytest.mark.parametrize("width", [120, 1024])
def test_cache_gather_follows_block_table_and_starts(width):
    from vllm_mha2mla.cache_gather import gather_cache_rows

    g = torch.Generator().manual_seed(width)
    block, blocks = 4, 12
    cache = torch.randn(blocks, block, width, generator=g)
    table = torch.randperm(blocks, generator=g)[:9].view(3, 3).to(torch.int32)
    starts = torch.tensor([0, 4, 2], dtype=torch.int32)  # context chunk begins mid-request
    lens = [5, 3, 6]
    cu = torch.tensor([0, 5, 8, 14], dtype=torch.int32)
    token_to_seq = torch.tensor(sum(([b] * n for b, n in enumerate(lens)), []) + [0, 0], dtype=torch.int32)
    dst = torch.zeros(16, width)
    gather_cache_rows(cache, dst, table, cu, token_to_seq, 14, "auto", torch.tensor([1.0]), starts)
    for t in range(14):
        b = int(token_to_seq[t])
        pos = t - int(cu[b]) + int(starts[b])
        assert torch.equal(dst[t], cache[table[b, pos // block], pos % block])
    assert dst[14:].abs().sum() == 0  # rows past num_tokens untouched
    scaled = torch.zeros(16, width)
    gather_cache_rows(cache, scaled, table, cu, token_to_seq, 14, "fp8", torch.tensor([0.5]), starts)
    torch.testing.assert_close(scaled[:14], dst[:14] * 0.5)

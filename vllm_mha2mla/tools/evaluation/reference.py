"""The same requests answered by a PyTorch model (Hugging Face original or the conversion's
reference model): what vLLM's answers are checked against, in tests and in
``benchmarks/end_to_end/eval_parity.py``."""

from __future__ import annotations

import torch

from vllm_mha2mla.tools.evaluation.requests import Generate, Score


@torch.no_grad()
def score(model, request: Score) -> float:
    """Summed log-probability of ``token_ids[start:]`` (float32 log-softmax of the logits)."""
    ids = list(request.token_ids)
    logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    positions = torch.arange(request.start, len(ids))
    return logp[positions - 1, torch.tensor(ids[request.start:])].sum().item()


@torch.no_grad()
def greedy(model, request: Generate, eos: int) -> list[int]:
    """Greedy tokens with a cache, stopped after ``eos`` (as vLLM stops)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(input_ids=torch.tensor([list(request.token_ids)]), past_key_values=cache, use_cache=True)
    tokens: list[int] = []
    for _ in range(request.max_tokens):
        nxt = int(out.logits[0, -1].argmax())
        tokens.append(nxt)
        if nxt == eos:
            break
        out = model(input_ids=torch.tensor([[nxt]]), past_key_values=cache, use_cache=True)
    return tokens

"""Perplexity of documents with rolling windows (lm-evaluation-harness's
``loglikelihood_rolling``): every token is predicted exactly once; the first window starts
from the end-of-text token, each later one from the token just before it, so windows hold at
most ``window + 1`` tokens and never overlap in what they score.
"""

from __future__ import annotations

import math
from typing import Sequence

from vllm_mha2mla.tools.evaluation.requests import Score, ScoreResult


def rolling_windows(token_ids: Sequence[int], eot: int, window: int) -> list[Score]:
    """Requests that together score every token of ``token_ids`` once."""
    if window < 1:
        raise ValueError("window must be at least one token")
    out = []
    for start in range(0, len(token_ids), window):
        end = min(start + window, len(token_ids))
        prefix = [eot] if start == 0 else [token_ids[start - 1]]
        out.append(Score(tuple(prefix + list(token_ids[start:end])), 1))
    return out


def perplexity_metrics(documents: Sequence[str], per_document: Sequence[Sequence[ScoreResult]]) -> dict:
    """Token perplexity, bits per byte, byte and word perplexity over all documents
    (corpus-level: total negative log-likelihood over total tokens, bytes or words)."""
    nll = sum(-r.logprob for results in per_document for r in results)
    tokens = sum(r.tokens for results in per_document for r in results)
    n_bytes = sum(len(d.encode("utf-8")) for d in documents)
    words = sum(len(d.split()) for d in documents)
    bits_per_byte = nll / n_bytes / math.log(2)
    return {
        "token_perplexity": math.exp(nll / tokens),
        "bits_per_byte": bits_per_byte,
        "byte_perplexity": 2 ** bits_per_byte,
        "word_perplexity": math.exp(nll / max(words, 1)),
        "n": len(documents),
        "tokens": tokens,
        "bytes": n_bytes,
    }

"""What an engine is asked, as plain tuples (cheap to pickle across processes and Ray).

- :class:`Score`: log-probabilities of ``token_ids[start:]``, each given the tokens before
  it — read from vLLM's ``prompt_logprobs`` — summed, with whether every one of them was the
  engine's greedy choice (lm-evaluation-harness's ``is_greedy``).
- :class:`Generate`: greedy continuation of ``token_ids`` for at most ``max_tokens`` tokens.
"""

from __future__ import annotations

from typing import NamedTuple


class Score(NamedTuple):
    token_ids: tuple[int, ...]
    start: int


class Generate(NamedTuple):
    token_ids: tuple[int, ...]
    max_tokens: int


class ScoreResult(NamedTuple):
    logprob: float
    """Sum of the scored tokens' log-probabilities (natural log)."""
    greedy: bool
    tokens: int


Request = Score | Generate
Result = ScoreResult | tuple[int, ...]  # generated token ids for Generate


def request_cost(request: Request) -> int:
    """Tokens an engine processes for it: sorts requests so that chunks hold similar lengths."""
    extra = request.max_tokens if isinstance(request, Generate) else 1
    return len(request.token_ids) + extra

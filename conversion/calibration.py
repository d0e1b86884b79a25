"""Calibration statistics from running the original model over text.

Two statistics, gathered in one pass with forward hooks on each layer's q/k projections:
- ``pair_scores [L, g, d/2]``: mean over tokens of ‖q_i‖·‖k_i‖ per rotary pair (before
  rotation; query norms averaged over the kv-head's group), the 2-norm strategy's score;
- ``input_second_moment [L, D, D]``: E[x xᵀ] of the attention input, for activation-aware
  SVD and for reporting output errors.
They are cached on disk keyed by the model's files and the text, since a run over a large
model is the slowest step of conversion. ``--strategy retrieval`` adds per-head retrieval scores,
measured on long prompts of their own (:mod:`conversion.retrieval`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from conversion.errors import ConversionError
from conversion.source import SourceSpec

DEFAULT_CALIB_TOKENS = 16384
DEFAULT_CALIB_SEQ_LEN = 512


@dataclass(frozen=True)
class RetrievalScores:
    """``--strategy retrieval``'s statistic (measured by :mod:`conversion.retrieval`):
    ``head_scores [layers, kv_heads]``, the strategy's input, from ``query_head_scores [layers, heads]``,
    the attention mass the answer's positions put on a planted fact; and how well the original
    answers the calibration facts (mean answer log-probability, answers greedy throughout)."""

    head_scores: torch.Tensor
    query_head_scores: torch.Tensor
    num_prompts: int
    prompt_tokens: int
    answer_logprob: float
    answers_greedy: int

    def summary(self) -> dict:
        return {"prompts": self.num_prompts, "prompt_tokens": self.prompt_tokens,
                "original_answer_logprob": round(self.answer_logprob, 4),
                "original_answers_greedy": self.answers_greedy}


@dataclass(frozen=True)
class CalibrationStats:
    pair_scores: torch.Tensor
    input_second_moment: torch.Tensor
    num_tokens: int
    retrieval: RetrievalScores | None = None
    """Per kv-head retrieval scores (``--strategy retrieval`` only; :mod:`conversion.retrieval`)."""


def pair_norms(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[..., heads·d]`` → ``[..., heads, d/2]``: norm of each rotate_half pair (i, i + d/2)."""
    x = x.reshape(*x.shape[:-1], -1, head_dim).to(torch.float64)
    half = head_dim // 2
    return torch.sqrt(x[..., :half] ** 2 + x[..., half:] ** 2)


def pair_scores_from_projections(q: torch.Tensor, k: torch.Tensor, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Sum over tokens of ‖q_i‖·‖k_i‖ per kv-head and pair: ``[tokens, h·d]``, ``[tokens, g·d]``
    → ``[g, d/2]``. Query norms are averaged over the heads that share the kv-head."""
    qn = pair_norms(q, head_dim)
    qn = qn.view(*qn.shape[:-2], num_kv_heads, -1, qn.shape[-1]).mean(-2)
    kn = pair_norms(k, head_dim)
    return (qn * kn).reshape(-1, num_kv_heads, head_dim // 2).sum(0)


def calibration_text_token_ids(tokenizer, text: str, max_tokens: int, seq_len: int) -> torch.Tensor:
    """Tokenises ``text`` into ``[n, seq_len]`` rows (at most ``max_tokens`` tokens)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0][:max_tokens]
    n = ids.numel() // seq_len
    if n == 0:
        raise ConversionError(
            f"calibration text is too short: {ids.numel()} tokens, need at least {seq_len}"
        )
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def collect_calibration_stats(
    spec: SourceSpec, text: str, max_tokens: int = DEFAULT_CALIB_TOKENS, seq_len: int = DEFAULT_CALIB_SEQ_LEN
) -> CalibrationStats:
    """Runs the original model (float32, CPU) over ``text`` and gathers the statistics."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(spec.path))
    rows = calibration_text_token_ids(tokenizer, text, max_tokens, seq_len)
    model = AutoModelForCausalLM.from_pretrained(str(spec.path), dtype=torch.float32).eval()
    layers = model.model.layers
    d, g, hidden = spec.head_dim, spec.num_kv_heads, spec.hidden_size
    scores = torch.zeros(len(layers), g, d // 2, dtype=torch.float64)
    moments = torch.zeros(len(layers), hidden, hidden, dtype=torch.float64)
    captured: dict[int, dict[str, torch.Tensor]] = {}

    def hook(idx: int, name: str):
        def fn(module, inputs, output):
            captured.setdefault(idx, {})[name] = output.reshape(-1, output.shape[-1])
            if name == "k":
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).to(torch.float64)
                moments[idx] += x.T @ x

        return fn

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.q_proj.register_forward_hook(hook(i, "q")))
        handles.append(layer.self_attn.k_proj.register_forward_hook(hook(i, "k")))
    try:
        for row in tqdm(rows, desc="calibration", unit="seq"):
            captured.clear()
            model.model(input_ids=row[None], use_cache=False)  # the decoder alone: no logits are needed
            # Projections as RoPE sees them (biases included).
            for i, qk in captured.items():
                scores[i] += pair_scores_from_projections(qk["q"], qk["k"], g, d)
    finally:
        for h in handles:
            h.remove()
    n = rows.numel()
    return CalibrationStats(pair_scores=scores / n, input_second_moment=moments / n, num_tokens=n)


def _cache_key(spec: SourceSpec, text: str, max_tokens: int, seq_len: int) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"tokens": max_tokens, "seq_len": seq_len, "v": 1}).encode())
    digest.update(text.encode())
    for f in sorted(spec.path.iterdir()):
        if f.suffix in (".json", ".safetensors"):
            st = f.stat()
            digest.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return digest.hexdigest()[:24]


def default_cache_dir() -> Path:
    base = os.environ.get("MHA2MLA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mha2mla"
    )
    return Path(base)


def load_or_collect(
    spec: SourceSpec,
    text: str,
    cache_dir: Path | None = None,
    max_tokens: int = DEFAULT_CALIB_TOKENS,
    seq_len: int = DEFAULT_CALIB_SEQ_LEN,
) -> CalibrationStats:
    """Calibration statistics from the on-disk cache, or computed and cached."""
    cache_dir = (cache_dir or default_cache_dir()) / "calibration"
    path = cache_dir / f"{_cache_key(spec, text, max_tokens, seq_len)}.pt"
    if path.is_file():
        data = torch.load(path, weights_only=True)
        return CalibrationStats(data["pair_scores"], data["input_second_moment"], int(data["num_tokens"]))
    stats = collect_calibration_stats(spec, text, max_tokens, seq_len)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "pair_scores": stats.pair_scores,
            "input_second_moment": stats.input_second_moment.to(torch.float32),
            "num_tokens": stats.num_tokens,
        },
        tmp,
    )
    os.replace(tmp, path)
    return stats

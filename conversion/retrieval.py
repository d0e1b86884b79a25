"""Retrieval-head scores: the calibration behind ``--strategy retrieval``.

Long-context retrieval in a Llama-family model is carried by a few attention heads (in
SmolLM2-135M a handful in layers 15-24, ``benchmarks/results/2026-12-07-cpu-needle-attention``):
when the model answers a question about a fact far back, these heads put most of their
attention on the fact's tokens. The conversion loses exactly these heads, so the retrieval
strategy finds them first and keeps their slowly rotating pairs (:func:`conversion.rope.
select_pairs_retrieval`).

A head's **retrieval score** is the attention mass that the answer's query positions put on a
planted fact's tokens, in long prompts built here from training text:

- the haystack is training-side paragraphs (the default corpus's training split, or the
  paragraphs of ``--calib-text``), joined by blank lines;
- the fact is :func:`fact_sentence` (a random six-digit archive code for a random name),
  inserted between two paragraphs at a stratified random depth;
- the prompt ends with :func:`fact_question`, and the answer (the code) is teacher-forced.

The query rows are the positions that predict the answer's tokens (the prompt's last token and
every answer token but the last). The mass is averaged over those rows, over the prompts and
over the query heads of a kv-head's group: ``[layers, kv_heads]``. Nothing of the evaluation's
long-context tasks is used (its needle and passkey sentences, its essays haystack, its held-out
text): the score is measured on data the evaluation never shows and scored on data it never saw.

Memory stays bounded at any length: the original model runs with its own SDPA attention, and a
wrapper registered with transformers' ``AttentionInterface`` computes ``softmax(q_r·Kᵀ·scale)``
for the few query rows alone (never the ``L × L`` matrix that ``output_attentions`` builds).
Scores are cached on disk beside the 2-norm statistics, keyed by the model's files and the
prompts' tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from conversion.calibration import RetrievalScores, default_cache_dir
from conversion.errors import ConversionError
from conversion.source import SourceSpec
from conversion.text_data import token_slot

DEFAULT_RETRIEVAL_PROMPTS = 8
DEFAULT_RETRIEVAL_TOKENS = 2048
DEFAULT_RETRIEVAL_HEADS = 0.1
"""Share of all kv-heads (every layer together) that keep low-frequency pairs (the study:
``benchmarks/results/2026-12-07-cpu-rope-retrieval``)."""
DEFAULT_RETRIEVAL_PAIRS = 0.5
"""Share of a retrieval head's kept pairs forced from its band (the rest by 2-norm)."""
DEFAULT_RETRIEVAL_BAND = "low"
"""The end of the spectrum a retrieval head's forced pairs come from (``low``: the slowest pairs)."""
MIN_RETRIEVAL_TOKENS = 128
"""Shorter prompts hold too few paragraphs to bury a fact in."""
SEED = 0
ANSWER_DIGITS = 6
MAX_PARAGRAPHS_READ = 2000
"""Paragraphs a prompt's haystack may look through (tokenising the whole corpus to fill one prompt
with short paragraphs would cost more than the calibration)."""
INTRO = "Read the records below carefully. A question about one of them follows at the end."
_FIRST = ("Adele", "Bruno", "Carmen", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Keiko", "Lars",
          "Mirela", "Nikhil", "Odile", "Pavel", "Quentin", "Rosa", "Stellan", "Tamsin", "Ulrich", "Vera", "Wendell",
          "Ximena", "Yusuf", "Zora")
_LAST = ("Abernathy", "Bergstrom", "Castellano", "Delacroix", "Eriksen", "Fairbanks", "Galloway", "Halvorsen",
         "Ivanova", "Jablonski", "Kowalczyk", "Lindqvist", "Montgomery", "Novak", "Okonkwo", "Pemberton",
         "Quinlan", "Rasmussen", "Sandoval", "Thornbury", "Underwood", "Valdivia", "Whitaker", "Yamamoto")

Encode = Callable[[str], list[int]]


def fact_sentence(name: str, code: str) -> str:
    """The planted fact (a template of this project's own, unlike the evaluation's needles)."""
    return f"Registry note: the archive code assigned to {name} is {code}."


def fact_question(name: str) -> str:
    return f"Question: What is the archive code assigned to {name}?\nAnswer: The archive code assigned to {name} is"


@dataclass(frozen=True)
class FactPrompt:
    """One calibration prompt: token ids, the answer's ids, the fact's token span ``[start, end)``
    and the depth (share of the haystack's tokens before the fact)."""

    ids: tuple[int, ...]
    answer: tuple[int, ...]
    fact: tuple[int, int]
    depth: float

    @property
    def query_rows(self) -> list[int]:
        """Positions of ``ids + answer`` that predict the answer's tokens."""
        return list(range(len(self.ids) - 1, len(self.ids) + len(self.answer) - 1))


def build_fact_prompts(encode: Encode, documents: Sequence[str], num_prompts: int, length: int,
                       seed: int = SEED) -> list[FactPrompt]:
    """``num_prompts`` prompts of at most ``length`` tokens (answer included), each a haystack of
    ``documents`` from a seeded random start, the fact at depth ``(i + u) / num_prompts`` (one
    depth per stratum, so a handful of prompts covers the whole window), then the question.

    Pieces are tokenised one by one and concatenated, so the fact's token span is exact.
    """
    if num_prompts < 1:
        raise ConversionError(f"--retrieval-prompts must be at least 1, got {num_prompts}")
    docs = [d.strip() for d in documents if d.strip()]
    if not docs:
        raise ConversionError("no calibration paragraphs to build retrieval prompts from")
    doc_tokens: dict[int, list[int]] = {}
    prompts = []
    for i in range(num_prompts):
        rng = random.Random(f"retrieval-{seed}-{i}")
        name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        code = str(rng.randint(10 ** (ANSWER_DIGITS - 1), 10 ** ANSWER_DIGITS - 1))
        intro = encode(INTRO + "\n\n")
        fact = encode(fact_sentence(name, code) + "\n\n")
        question = encode(fact_question(name))
        answer = encode(" " + code)
        room = length - len(intro) - len(fact) - len(question) - len(answer)
        hay: list[list[int]] = []
        start, used = rng.randrange(len(docs)), 0
        for k in range(min(len(docs), MAX_PARAGRAPHS_READ)):
            j = (start + k) % len(docs)
            if j not in doc_tokens:
                doc_tokens[j] = encode(docs[j] + "\n\n")
            if used + len(doc_tokens[j]) > room:
                if hay:
                    break
                continue  # a first paragraph longer than the room: try the next one
            hay.append(doc_tokens[j])
            used += len(doc_tokens[j])
        if not hay:
            raise ConversionError(f"--retrieval-tokens {length} leaves no room for a single calibration paragraph")
        depth = (i + rng.random()) / num_prompts
        at = token_slot([len(p) for p in hay], depth)
        before = [t for p in hay[:at] for t in p]
        after = [t for p in hay[at:] for t in p]
        ids = intro + before + fact + after + question
        span = (len(intro) + len(before), len(intro) + len(before) + len(fact))
        prompts.append(FactPrompt(tuple(ids), tuple(answer), span, len(before) / max(1, used)))
    return prompts


def text_paragraphs(text: str) -> list[str]:
    """Paragraphs of a calibration text file (split at blank lines) for the haystack."""
    return [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


# -- attention rows -------------------------------------------------------------------------------
def attention_rows(query: torch.Tensor, key: torch.Tensor, rows: Sequence[int], attn_mask: torch.Tensor | None = None,
                   is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Softmax attention weights ``[B, H, len(rows), S]`` of the query rows ``rows`` alone, as
    ``F.scaled_dot_product_attention(query, key, ..., attn_mask, is_causal, scale)`` weighs the keys
    (``query`` ``[B, Hq, L, E]``, ``key`` ``[B, Hk, S, E]``, Hk dividing Hq: grouped keys repeated)."""
    heads, kv_heads = query.shape[-3], key.shape[-3]
    if heads != kv_heads:
        key = key.repeat_interleave(heads // kv_heads, dim=-3)
    index = torch.tensor(list(rows), device=query.device)
    q = query.index_select(-2, index).float()
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = q @ key.float().transpose(-1, -2) * scale
    if attn_mask is not None:
        mask = attn_mask if attn_mask.shape[-2] == 1 else attn_mask.index_select(-2, index)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    elif is_causal:  # top-left aligned, as SDPA's is_causal
        keep = torch.arange(key.shape[-2], device=query.device)[None, :] <= index[:, None]
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores.softmax(-1)


def span_mass(probs: torch.Tensor, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``[..., len(spans)]``: the weight each row of ``probs`` (``[..., S]``) puts on each ``[start, end)``."""
    return torch.stack([probs[..., start:end].sum(-1) for start, end in spans], dim=-1)


def row_span_mass(query: torch.Tensor, key: torch.Tensor, rows: Sequence[int], span: tuple[int, int],
                  scale: float) -> torch.Tensor:
    """``[heads]``: the causal softmax weight that the query rows ``rows`` put on keys ``[start, end)``,
    averaged over the rows. ``query`` ``[1, heads, L, d]``, ``key`` ``[1, kv_heads, L, d]`` (rotated;
    a kv-head serves ``heads / kv_heads`` consecutive query heads, as Llama's ``repeat_kv``)."""
    probs = attention_rows(query, key, rows, is_causal=True, scale=scale)
    return span_mass(probs, [span])[0, ..., 0].mean(-1)


_ATTENTION_NAME = "mha2mla_retrieval_rows"
_capture: list[dict] = []
"""The active capture (at most one): rows, span and the per-layer masses it collects."""


def _capturing_sdpa(module, query, key, value, attention_mask, *args, **kwargs):
    """transformers' SDPA attention, plus the mass of the captured rows on the captured span."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _capture:
        cap = _capture[-1]
        scale = kwargs.get("scaling") or 1 / math.sqrt(query.shape[-1])
        cap["mass"][module.layer_idx] = row_span_mass(query, key, cap["rows"], cap["span"], scale)
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


@contextlib.contextmanager
def capture(rows: Sequence[int], span: tuple[int, int]):
    """While active, each attention layer of a model loaded with :func:`load_capturing_model`
    records ``[heads]`` (mass of ``rows`` on ``span``) under its layer index in the yielded dict."""
    cap = {"rows": list(rows), "span": span, "mass": {}}
    _capture.append(cap)
    try:
        yield cap["mass"]
    finally:
        _capture.remove(cap)


def load_capturing_model(path: Path):
    """The original model (float32, CPU) with :func:`_capturing_sdpa` as its attention."""
    from transformers import AttentionInterface, AutoModelForCausalLM

    AttentionInterface.register(_ATTENTION_NAME, _capturing_sdpa)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                attn_implementation=_ATTENTION_NAME).eval()


# -- the statistic ----------------------------------------------------------------------------------
def group_mean(query_head_scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[layers, heads]`` → ``[layers, kv_heads]``: the mean over each kv-head's query heads."""
    layers, heads = query_head_scores.shape
    return query_head_scores.view(layers, num_kv_heads, heads // num_kv_heads).mean(-1)


@torch.no_grad()
def collect_retrieval_scores(spec: SourceSpec, prompts: Sequence[FactPrompt], model=None,
                             show_progress: bool = True) -> RetrievalScores:
    """Runs the original over each prompt plus its answer and gathers the retrieval scores."""
    model = model if model is not None else load_capturing_model(spec.path)
    layers = spec.num_layers
    total = torch.zeros(layers, spec.num_heads, dtype=torch.float64)
    logprob, greedy = 0.0, 0
    for p in tqdm(prompts, desc="retrieval calibration", unit="prompt", disable=not show_progress):
        ids = torch.tensor([list(p.ids) + list(p.answer)])
        with capture(p.query_rows, p.fact) as mass:
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        if len(mass) != layers:
            raise ConversionError(f"retrieval calibration captured {len(mass)} attention layers of {layers}: the "
                                  "model does not run its attention through transformers' attention interface")
        total += torch.stack([mass[i] for i in range(layers)]).to(torch.float64)
        logits = model.get_output_embeddings()(hidden[0, p.query_rows]).float()
        gold = torch.tensor(p.answer)
        logprob += float(logits.log_softmax(-1).gather(-1, gold[:, None]).sum())
        greedy += int(bool((logits.argmax(-1) == gold).all()))
    per_head = total / len(prompts)
    return RetrievalScores(group_mean(per_head, spec.num_kv_heads), per_head, len(prompts),
                           sum(len(p.ids) for p in prompts), logprob / len(prompts), greedy)


def _cache_key(spec: SourceSpec, prompts: Sequence[FactPrompt]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"v": 1, "prompts": [[p.ids, p.answer, p.fact] for p in prompts]}).encode())
    for f in sorted(spec.path.iterdir()):
        if f.suffix in (".json", ".safetensors"):
            st = f.stat()
            digest.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return digest.hexdigest()[:24]


def load_or_collect_retrieval(spec: SourceSpec, documents: Sequence[str], cache_dir: Path | None = None,
                              num_prompts: int = DEFAULT_RETRIEVAL_PROMPTS, length: int = DEFAULT_RETRIEVAL_TOKENS,
                              show_progress: bool = True) -> RetrievalScores:
    """Retrieval scores from the on-disk cache, or measured and cached (prompts built with the
    model's tokenizer from ``documents``)."""
    from transformers import AutoTokenizer

    if length > spec.max_position_embeddings:
        raise ConversionError(f"--retrieval-tokens {length} exceeds the model's context of "
                              f"{spec.max_position_embeddings} tokens")
    tokenizer = AutoTokenizer.from_pretrained(str(spec.path))
    prompts = build_fact_prompts(lambda s: tokenizer(s, add_special_tokens=False).input_ids, documents,
                                 num_prompts, length)
    path = (cache_dir or default_cache_dir()) / "calibration" / f"retrieval-{_cache_key(spec, prompts)}.pt"
    if path.is_file():
        data = torch.load(path, weights_only=True)
        return RetrievalScores(data["head_scores"], data["query_head_scores"], int(data["num_prompts"]),
                               int(data["prompt_tokens"]), float(data["answer_logprob"]),
                               int(data["answers_greedy"]))
    scores = collect_retrieval_scores(spec, prompts, show_progress=show_progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"head_scores": scores.head_scores, "query_head_scores": scores.query_head_scores,
                "num_prompts": scores.num_prompts, "prompt_tokens": scores.prompt_tokens,
                "answer_logprob": scores.answer_logprob, "answers_greedy": scores.answers_greedy}, tmp)
    os.replace(tmp, path)
    return scores

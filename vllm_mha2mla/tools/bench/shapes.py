"""The models ``mha2mla bench`` measures and the conversions it makes of them (pure: configs
and cache arithmetic; nothing here touches a disk or vLLM).

A *shape* is a Hugging Face config of a real model family with the published dimensions
(weights are vLLM's dummy ones: speed depends on shapes, not values). A *variant* names one
conversion of a shape, or ``mha`` for the original:

- ``mha``: the original model, on vLLM's own attention.
- ``native``: vLLM's native 576-value MLA row (latent 512 + rope slot 64), the only width its
  Hopper kernels (FlashMLA) take.
- ``rR-dD``: the exact layout with ``rope_dim`` R and ``d_kv`` D per kv-head
  (``num_kv_heads × (R + D)`` cached values; the MHA2MLA paper's Llama-2-7B runs are r16-d16,
  r16-d32, r16-d64 = 1024, 1536, 2560 values).
- ``cutP``: the exact layout that caches P% fewer values than the original (rope_dim 16 or
  less, d_kv filling the rest), e.g. ``cut50``, ``cut75``.
- ``…@BACKEND``: the same, on a named vLLM attention backend (``native@CUSTOM`` runs the native
  row on this plugin's backend, ``native@TRITON_MLA`` on vLLM's Triton kernel).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from conversion.mla_format.layout import DEFAULT_NATIVE_HEAD_SIZE, NATIVE_ROPE_SLOT

CUT_ROPE_DIM = 16


class BenchError(ValueError):
    """A benchmark request that cannot be run as asked (unknown shape, impossible variant…)."""


def llama_config(hidden: int, heads: int, kv_heads: int, head_dim: int, layers: int, vocab: int, intermediate: int,
                 rope_theta: float = 10000.0, rms_eps: float = 1e-5, tie: bool = False) -> dict:
    """A Hugging Face Llama ``config.json`` of these dimensions."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "num_hidden_layers": layers, "vocab_size": vocab, "intermediate_size": intermediate,
        "max_position_embeddings": 4096, "rms_norm_eps": rms_eps, "rope_theta": rope_theta,
        "hidden_act": "silu", "tie_word_embeddings": tie, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2,
    }


def _qwen2(**kwargs) -> dict:
    return {**llama_config(**kwargs), "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}


SHAPES: dict[str, dict] = {
    # meta-llama/Llama-2-7b-hf: MHA, 32 heads × 128
    "llama2-7b": llama_config(hidden=4096, heads=32, kv_heads=32, head_dim=128, layers=32, vocab=32000,
                              intermediate=11008, rope_theta=10000.0),
    # meta-llama/Meta-Llama-3-8B: GQA 32/8 × 128
    "llama3-8b": llama_config(hidden=4096, heads=32, kv_heads=8, head_dim=128, layers=32, vocab=128256,
                              intermediate=14336, rope_theta=500000.0),
    # Qwen/Qwen2.5-7B: GQA 28/4 × 128, q/k/v biases
    "qwen2.5-7b": _qwen2(hidden=3584, heads=28, kv_heads=4, head_dim=128, layers=28, vocab=152064,
                         intermediate=18944, rope_theta=1000000.0, rms_eps=1e-6),
    # HuggingFaceTB/SmolLM2-135M-Instruct: GQA 9/3 × 64 (the project's default model)
    "smollm2-135m": llama_config(hidden=576, heads=9, kv_heads=3, head_dim=64, layers=30, vocab=49152,
                                 intermediate=1536, rope_theta=100000.0, tie=True),
}


def shape_config(name: str, max_positions: int) -> dict:
    """The named shape's config, its context stretched to ``max_positions`` (dummy weights have
    no trained window, and the original and its conversions must allow the same length)."""
    if name not in SHAPES:
        raise BenchError(f"unknown shape {name!r}: one of {', '.join(SHAPES)} or a model folder")
    config = dict(SHAPES[name])
    config["max_position_embeddings"] = max(config["max_position_embeddings"], max_positions)
    return config


def mha_cache_values(config: dict) -> int:
    """Values the original caches per token per layer: keys and values of every kv-head."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim


@dataclass(frozen=True)
class Variant:
    """One benchmarked model: the original (``rope_dim`` None) or one conversion of it."""

    name: str
    rope_dim: int | None = None
    d_kv: int | None = None
    layout: str = "exact"
    attention_backend: str | None = None

    @property
    def is_original(self) -> bool:
        return self.rope_dim is None

    def cache_values(self, config: dict) -> int:
        """Values per token per layer this model's KV cache row holds in vLLM."""
        if self.is_original:
            return mha_cache_values(config)
        if self.layout == "native":
            return DEFAULT_NATIVE_HEAD_SIZE
        return config.get("num_key_value_heads", config["num_attention_heads"]) * (self.rope_dim + self.d_kv)


_EXACT = re.compile(r"^r(\d+)-d(\d+)$")
_CUT = re.compile(r"^cut(\d+)$")


def parse_variant(spec: str, config: dict) -> Variant:
    """``mha``, ``native``, ``rR-dD`` or ``cutP``, optionally ``@BACKEND`` — see the module doc.

    Checks the conversion fits the shape (even rope dims within a head, a positive latent, a
    cache no larger than the original's), so that a bad matrix fails before any engine starts."""
    name, _, backend = spec.strip().partition("@")
    backend = backend.strip().upper() or None
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    if name == "mha":
        return Variant(spec.strip(), attention_backend=backend)
    if name == "native":
        rope = max(2, min(CUT_ROPE_DIM, (NATIVE_ROPE_SLOT // kv_heads) // 2 * 2))
        d_kv = min((DEFAULT_NATIVE_HEAD_SIZE - NATIVE_ROPE_SLOT) // kv_heads, 2 * head_dim - rope)
        return Variant(spec.strip(), rope, d_kv, "native", backend)
    if m := _EXACT.match(name):
        rope, d_kv = int(m[1]), int(m[2])
    elif m := _CUT.match(name):
        percent = int(m[1])
        if not 0 < percent < 100:
            raise BenchError(f"variant {spec!r}: the cut is a percentage between 1 and 99")
        per_head = round(2 * head_dim * (100 - percent) / 100)
        rope = min(CUT_ROPE_DIM, per_head // 2 // 2 * 2)
        rope, d_kv = rope, per_head - rope
    else:
        raise BenchError(f"variant {spec!r}: expected mha, native, rR-dD or cutP (optionally @BACKEND)")
    if rope < 2 or rope % 2 or rope > head_dim:
        raise BenchError(f"variant {spec!r}: rope_dim {rope} must be even and between 2 and head_dim {head_dim}")
    if d_kv < 1:
        raise BenchError(f"variant {spec!r}: d_kv {d_kv} leaves no latent")
    variant = Variant(spec.strip(), rope, d_kv, "exact", backend)
    if variant.cache_values(config) > mha_cache_values(config):
        raise BenchError(f"variant {spec!r} caches {variant.cache_values(config)} values per token per layer, more "
                         f"than the original's {mha_cache_values(config)}")
    return variant


def parse_workload(spec: str) -> tuple[int, int]:
    """``IN/OUT`` token counts, ``K`` suffixes allowed: ``8K/1K`` → (8192, 1024)."""

    def tokens(text: str) -> int:
        text = text.strip().upper()
        scale = 1024 if text.endswith("K") else 1
        try:
            value = int(text.rstrip("K")) * scale
        except ValueError:
            raise BenchError(f"workload {spec!r}: expected IN/OUT token counts such as 8192/1024 or 8K/1K") from None
        if value < 1:
            raise BenchError(f"workload {spec!r}: token counts must be positive")
        return value

    parts = spec.split("/")
    if len(parts) != 2:
        raise BenchError(f"workload {spec!r}: expected IN/OUT token counts such as 8192/1024 or 8K/1K")
    return tokens(parts[0]), tokens(parts[1])


def weight_bytes(config: dict, bytes_per_param: int = 2) -> int:
    """The original's parameter bytes (an upper bound for its conversions, whose key/value
    projections are smaller): sizes the prompt count before an engine has measured memory."""
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads", heads) * head_dim
    attention = hidden * heads * head_dim * 2 + hidden * kv * 2
    mlp = 3 * hidden * config["intermediate_size"]
    embeddings = config["vocab_size"] * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return (layers * (attention + mlp) + embeddings) * bytes_per_param


def auto_num_prompts(kv_cache_bytes: float, cache_bytes_per_token: int, input_len: int, output_len: int,
                     waves: int = 2, lowest: int = 8, highest: int = 1024) -> int:
    """Prompts for a throughput run: ``waves`` × the sequences the KV cache holds at once, so each
    model runs at the largest batch its memory allows (within [lowest, highest])."""
    concurrent = int(kv_cache_bytes // (cache_bytes_per_token * (input_len + output_len)))
    return max(lowest, min(highest, waves * concurrent))


SERVE_PROMPTS = 200
"""Requests per serving rate unless told otherwise."""
MIN_SERVE_PROMPTS = 16
"""Fewest requests per rate when the count follows the rate (``--serve-seconds``)."""


def serve_num_prompts(rate: float, prompts: int | None = None, seconds: float | None = None) -> int:
    """Requests for one serving rate: ``prompts`` (default :data:`SERVE_PROMPTS`) or, with
    ``seconds``, as many as arrive in that time at ``rate`` (at least :data:`MIN_SERVE_PROMPTS`).

    A fixed count spends most of a slow rate's run waiting for arrivals and ends a fast rate's
    arrivals before the server fills (64 requests at 16 req/s arrive in 4 s); a time span gives
    every rate the same stretch of load."""
    if prompts is not None and seconds is not None:
        raise BenchError("give --serve-prompts or --serve-seconds, not both")
    if seconds is None:
        count = SERVE_PROMPTS if prompts is None else prompts
        if count < 1:
            raise BenchError(f"--serve-prompts {count}: need at least one request per rate")
        return count
    if not seconds > 0:
        raise BenchError(f"--serve-seconds {seconds:g}: must be a positive number of seconds")
    return max(MIN_SERVE_PROMPTS, math.ceil(rate * seconds))

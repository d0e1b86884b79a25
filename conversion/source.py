"""Reading a local Hugging Face Llama-family folder: its config and its safetensors shards.

I/O at the edge: everything here validates early and raises ConversionError naming the
file and the problem, so conversion fails before it writes anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from conversion.errors import ConversionError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
"""Files one of which a folder needs for its tokenizer to load (the vocabulary itself)."""


@dataclass(frozen=True)
class SourceSpec:
    """What conversion needs to know about the original model."""

    path: Path
    model_type: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    hidden_act: str
    torch_dtype: str | None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    warnings: tuple[str, ...] = field(default=())


def _rope_params(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either transformers 4 or 5 config spellings."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") == "default":
            scaling = None
        return float(params["rope_theta"]), scaling
    scaling = cfg.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(cfg.get("rope_theta", 10000.0)), scaling


def read_source_spec(path: str | Path) -> SourceSpec:
    """Parses ``config.json`` of a Llama/Mistral/Qwen2 folder, refusing anything else."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"source model folder {path} does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConversionError(f"{cfg_file} is missing: not a Hugging Face model folder")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{cfg_file} is not valid JSON: {exc}") from exc
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"unsupported model_type {model_type!r} in {cfg_file}: supported are "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-family MHA/GQA models)"
        )
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        num_layers = int(cfg["num_hidden_layers"])
        intermediate = int(cfg["intermediate_size"])
        vocab = int(cfg["vocab_size"])
    except KeyError as exc:
        raise ConversionError(f"{cfg_file} lacks the field {exc.args[0]!r}") from exc
    if heads % kv_heads:
        raise ConversionError(f"{heads} attention heads are not a multiple of {kv_heads} kv heads")
    if head_dim % 2:
        raise ConversionError(f"head_dim {head_dim} is odd; rotary embeddings need pairs")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act {cfg.get('hidden_act')!r} is not supported (silu only)")
    if cfg.get("mlp_bias"):
        raise ConversionError("MLP biases (mlp_bias=true) are not supported")
    warnings: list[str] = []
    window = cfg.get("sliding_window")
    if window and (model_type != "qwen2" or cfg.get("use_sliding_window")):
        warnings.append(
            f"sliding_window={window} is dropped: the MLA model attends to the full context "
            "(identical to the original for sequences up to the window)"
        )
    attention_bias = bool(cfg.get("attention_bias", False))
    rope_theta, rope_scaling = _rope_params(cfg)
    return SourceSpec(
        path=path,
        model_type=model_type,
        architecture=(cfg.get("architectures") or ["?"])[0],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type != "qwen2" and attention_bias,
        hidden_act="silu",
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        warnings=tuple(warnings),
    )


class SourceWeights:
    """Name → tensor access over a folder's safetensors shards, validated up front.

    Opening every shard (and checking the index points at real tensors) at construction
    turns a missing or corrupt shard into one clear error before any output exists.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index_file = self.path / "model.safetensors.index.json"
        if index_file.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ConversionError(f"{index_file} is not a valid safetensors index: {exc}") from exc
            shard_names = sorted(set(weight_map.values()))
        else:
            shard_names = sorted(p.name for p in self.path.glob("*.safetensors"))
            weight_map = {}
            if not shard_names:
                raise ConversionError(f"no *.safetensors weights in {self.path}")
        self._handles = {}
        for name in shard_names:
            shard = self.path / name
            if not shard.is_file():
                raise ConversionError(f"shard {shard} named in the index is missing")
            try:
                self._handles[name] = safe_open(str(shard), framework="pt")
            except Exception as exc:  # safetensors raises its own error types
                raise ConversionError(f"shard {shard} is corrupt or not safetensors: {exc}") from exc
        self._where: dict[str, str] = {}
        for name, handle in self._handles.items():
            for key in handle.keys():
                self._where[key] = name
        missing = [k for k, shard in weight_map.items() if k not in self._where]
        if missing:
            raise ConversionError(
                f"the index names {len(missing)} tensors that no shard holds (first: {missing[0]})"
            )

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ConversionError(f"tensor {name!r} is missing from the weights in {self.path}")
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except Exception as exc:
            raise ConversionError(f"cannot read tensor {name!r} from {self._where[name]}: {exc}") from exc

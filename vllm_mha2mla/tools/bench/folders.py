"""Model folders for ``mha2mla bench``: the original and each conversion, on disk.

Named shapes become config-only folders that vLLM fills with dummy weights, with a word-level
tokenizer of the model's vocabulary size in a folder of its own (vLLM's benchmark tools tokenize
their random prompts, and no tokenizer can be downloaded here; beside a config.json, Hugging
Face's AutoTokenizer would swap in the model family's own tokenizer class). Its tokens are short
alphanumeric words separated by spaces, so decoding and re-encoding a random prompt gives back
exactly its ids and lengths (and prompts stay under vLLM's characters-per-token guard). A real model folder is benchmarked with its own weights and tokenizer; its
conversions are made by the converter itself (uniform rope pairs and a plain joint SVD: no
calibration, since speed does not depend on the weights' values).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from conversion.convert import ConvertOptions, convert
from conversion.mla_format.layout import DEFAULT_NATIVE_HEAD_SIZE, plan_exact_layout, plan_native_layout
from conversion.mla_format.spec import MHA2MLASpec, build_config
from conversion.rope import select_pairs_fixed
from conversion.source import read_source_spec
from vllm_mha2mla.backend_selection import cache_row_layout
from vllm_mha2mla.tools.bench.shapes import SHAPES, BenchError, Variant, shape_config

@dataclass(frozen=True)
class ModelFolder:
    """A folder vLLM can start on, and how: dummy weights or the folder's own."""

    path: Path
    dummy_weights: bool
    config: dict
    tokenizer: Path


def write_config_only(folder: Path, config: dict) -> Path:
    """A folder with only config.json, for ``load_format='dummy'`` engines."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


_WORD_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def token_word(index: int) -> str:
    """``index`` written in base 62: a distinct word of 1–3 characters for every id below 238,328."""
    digits = ""
    while True:
        index, rest = divmod(index, len(_WORD_DIGITS))
        digits = _WORD_DIGITS[rest] + digits
        if index == 0:
            return digits


def write_word_tokenizer(folder: Path, vocab_size: int) -> None:
    """A lossless word-level tokenizer of ``vocab_size`` ids: ``<unk>``, ``<s>``, ``</s>``, then
    one :func:`token_word` per id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{token_word(i): i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(folder))


def mla_config_for(llama_folder: Path, rope_dim: int, d_kv: int, cache_size: int | None = DEFAULT_NATIVE_HEAD_SIZE,
                   layer_latent: list[int] | None = None) -> dict:
    """The converted config.json an MHA2MLA conversion of ``llama_folder`` would write
    (``cache_size`` None: the exact layout, true sizes; ``layer_latent``: per-layer latent
    widths, exact layout)."""
    spec = read_source_spec(llama_folder)
    dims = (spec.num_heads, spec.num_kv_heads, spec.head_dim, rope_dim, d_kv)
    layout = plan_exact_layout(*dims) if cache_size is None or layer_latent else plan_native_layout(*dims, cache_size)
    if layer_latent:
        layout = layout.with_latent(max(layer_latent))
    pairs = select_pairs_fixed("uniform", rope_dim // 2, spec.head_dim // 2)
    return build_config(spec, layout, [[pairs] * spec.num_kv_heads] * spec.num_layers, "bfloat16",
                        strategy="uniform", svd="joint", layer_latent=layer_latent, allocation="uniform")


def prepare_original(shape: str, workdir: Path, max_positions: int) -> ModelFolder:
    """The original model: a named shape (config + tokenizer, dummy weights) or a model folder."""
    if shape in SHAPES:
        config = shape_config(shape, max_positions)
        folder, tokenizer = workdir / shape / "mha", workdir / shape / "tokenizer"
        write_config_only(folder, config)
        if not (tokenizer / "tokenizer.json").is_file():
            write_word_tokenizer(tokenizer, config["vocab_size"])
        return ModelFolder(folder, True, config, tokenizer)
    folder = Path(shape).expanduser()
    if not (folder / "config.json").is_file():
        raise BenchError(f"shape {shape!r} is neither a named shape ({', '.join(SHAPES)}) nor a model folder "
                         "with a config.json")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise BenchError(f"model folder {folder} has no tokenizer (tokenizer.json or tokenizer.model): vLLM's "
                         "benchmark tools tokenize their prompts")
    read_source_spec(folder)  # a clear error for architectures the converter does not take
    folder = folder.resolve()
    return ModelFolder(folder, False, json.loads((folder / "config.json").read_text()), folder)


def prepare_variant(original: ModelFolder, shape_label: str, variant: Variant, workdir: Path) -> ModelFolder:
    """The folder ``variant`` runs on: the original itself, or its conversion."""
    if variant.is_original:
        return original
    cache_size = DEFAULT_NATIVE_HEAD_SIZE if variant.layout == "native" else None
    folder = workdir / shape_label / f"r{variant.rope_dim}-d{variant.d_kv}-{variant.layout}"
    if original.dummy_weights:
        config = mla_config_for(original.path, variant.rope_dim, variant.d_kv, cache_size)
        write_config_only(folder, config)
        return ModelFolder(folder, True, config, original.tokenizer)
    if not (folder / "config.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        options = ConvertOptions(rope_dim=variant.rope_dim, d_kv=variant.d_kv, strategy="uniform", svd="joint",
                                 layout=variant.layout, overwrite=True)
        convert(original.path, folder, options, show_progress=False)
    return ModelFolder(folder, False, json.loads((folder / "config.json").read_text()), folder)


def low_bit_row_bytes(config: dict, kv_cache_dtype: str) -> float | None:
    """Bytes a converted model's low-bit cache row takes per token per layer, scales and minima included (the
    mean over layers of per-layer widths), as the plugin's backend sizes its pages; None for an original or a
    cache dtype that is not one of the plugin's low-bit formats (its bytes are values × bytes per value)."""
    if "mha2mla" not in config:
        return None
    spec = MHA2MLASpec.from_config(config)
    layers = config["num_hidden_layers"]
    rows = [cache_row_layout(spec.layer_layout(i), kv_cache_dtype) for i in range(layers)]
    return None if rows[0] is None else sum(r.row_bytes for r in rows) / layers

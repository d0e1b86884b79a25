"""Builders for small but real Hugging Face checkpoints on disk (no downloads)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from conversion.text_data import shared_text_path, split_text


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    model_type: str = "llama"
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    hidden_size: int = 256
    num_layers: int = 2
    vocab_size: int = 512
    bias: bool = False
    tie: bool = False


_TRAINED_TOKENIZERS: dict[int, str] = {}
"""vocab_size -> the trained tokenizer's JSON: trained once per test process, every tiny checkpoint of that
vocabulary size gets the same tokenizer (training it again per checkpoint took seconds each)."""


def train_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer trained on the shared text's calibration split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size in _TRAINED_TOKENIZERS:
        fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_TRAINED_TOKENIZERS[vocab_size]),
                                       bos_token="<s>", eos_token="</s>")
        fast.chat_template = CHAT_TEMPLATE
        fast.save_pretrained(str(folder))
        return
    calib, _ = split_text(shared_text_path().read_text())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([calib[:200_000]], trainer=trainer)
    _TRAINED_TOKENIZERS[vocab_size] = tok.to_str()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))


def build_tiny_model(folder: Path, spec: TinySpec, seed: int = 0) -> Path:
    """Saves a randomly initialised model of ``spec`` (float32) plus tokenizer to ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=2 * spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=1024,
        tie_word_embeddings=spec.tie,
        bos_token_id=0,
        eos_token_id=1,
    )
    if spec.model_type == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, attention_bias=spec.bias))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.2)
            elif "norm" in name:
                param.uniform_(0.8, 1.2)
            else:  # larger weights than the default init so attention is far from uniform
                param.normal_(0, 0.08)
    model.save_pretrained(str(folder))
    train_tokenizer(folder, spec.vocab_size)
    return folder


SHARED_PREFIX_TOKENS = 40
"""The prefix every prompt of :func:`prompts_sharing_a_prefix` starts with (2 full cache blocks of 16)."""


def short_prompts(model_dir: Path) -> list[list[int]]:
    """8 prompts of 6-34 tokens, each the start of a different held-out line."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    _, held_out = split_text(shared_text_path().read_text())
    lines = [ln for ln in held_out.splitlines() if len(ln) > 20]
    return [tok(lines[i * 7], add_special_tokens=False).input_ids[: 6 + 4 * i] for i in range(8)]


def prompts_sharing_a_prefix(model_dir: Path) -> list[list[int]]:
    """5 prompts of 70-122 tokens: a :data:`SHARED_PREFIX_TOKENS`-token shared prefix and their own held-out
    text after it."""
    from transformers import AutoTokenizer

    _, held_out = split_text(shared_text_path().read_text())
    ids = AutoTokenizer.from_pretrained(str(model_dir))(held_out, add_special_tokens=False).input_ids
    return [ids[:SHARED_PREFIX_TOKENS] + ids[500 + 200 * i : 500 + 200 * i + 30 + 13 * i] for i in range(5)]

"""Checks a converted checkpoint folder against its own config before anything loads it.

A hand-edited config, a truncated copy or a mixed-up shard otherwise fails deep inside a
weight loader (vLLM's or transformers'), with a shape assertion that names no tensor. Here
the tensors the config implies — the reference model's parameters, built on the meta device,
so nothing is allocated — are compared with the safetensors headers (read without loading
data), and every problem is listed with the tensor or config field it concerns.
"""

from __future__ import annotations

import json
from pathlib import Path

from conversion.errors import ConversionError
from conversion.mla_format.spec import MHA2MLASpec


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape that a checkpoint with this config.json must hold."""
    import torch
    from transformers import DeepseekV2Config

    from conversion.reference_model import MHA2MLAForCausalLM  # inside: ~6 s of modelling code, and serving checks run here

    try:
        spec = MHA2MLASpec.from_config(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConversionError(f"config.json: the 'mha2mla' section is unusable ({exc})") from exc
    lay = spec.layout
    fields = {"kv_lora_rank": lay.kv_lora_rank, "qk_rope_head_dim": lay.qk_rope_head_dim,
              "qk_nope_head_dim": lay.qk_nope_head_dim, "v_head_dim": lay.v_head_dim,
              "num_attention_heads": lay.num_heads}
    for name, want in fields.items():
        if config.get(name) != want:
            raise ConversionError(f"config.json: {name} is {config.get(name)!r} but its mha2mla layout says {want}")
    if len(spec.rope_pairs) != config.get("num_hidden_layers"):
        raise ConversionError(f"config.json: mha2mla.rope_pairs has {len(spec.rope_pairs)} layers, "
                              f"num_hidden_layers is {config.get('num_hidden_layers')}")
    hf_config = DeepseekV2Config(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = MHA2MLAForCausalLM(hf_config)
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        shapes.pop("lm_head.weight", None)
    return shapes


def _checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{folder} holds no .safetensors weights")
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise ConversionError(f"{path.name} is not a readable safetensors file ({exc})") from exc
    return shapes


def check_checkpoint(folder: str | Path) -> None:
    """Raises ConversionError listing every missing, unexpected or mis-shaped tensor."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{folder}/config.json could not be read ({exc})") from exc
    want = expected_shapes(config)
    have = _checkpoint_shapes(folder)
    problems = [f"missing tensor {n} (expected shape {list(s)})" for n, s in want.items() if n not in have]
    problems += [f"tensor {n} has shape {list(have[n])}, the config implies {list(s)}"
                 for n, s in want.items() if n in have and have[n] != s]
    problems += [f"unexpected tensor {n}" for n in have if n not in want]
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise ConversionError(f"{folder} does not match its config.json:\n  " + "\n  ".join(shown))

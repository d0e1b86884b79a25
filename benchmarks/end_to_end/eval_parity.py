"""vLLM's scores in ``mha2mla eval`` against PyTorch, on SmolLM2-135M-Instruct (CPU, float32).

For each model — the original (Hugging Face ``LlamaForCausalLM``) and a conversion (the
reference model) — runs ``mha2mla eval`` on ≥100 items of each task type (multiple choice:
ARC-Easy; perplexity: held-out Wikipedia documents; long context: passkey at 512 and 1024
tokens), recomputes every request in PyTorch and reports the largest log-likelihood
difference, how many chosen answers and greedy answers agree. Why: ``mha2mla eval``'s scores are
only worth comparing across models if vLLM computes them as PyTorch does, for the conversion too.

Usage: python -m benchmarks.end_to_end.eval_parity OUT.json original=PATH converted=PATH
Results: benchmarks/README.md lists the folders this script wrote.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from benchmarks.common import cli_args
from conversion import load_reference
from vllm_mha2mla.tools.evaluation import reference
from vllm_mha2mla.tools.evaluation.evaluate import EvalOptions, evaluate, parse_models
from vllm_mha2mla.tools.evaluation.tasks import Settings, Tokenizer, resolve_tasks

TASKS = "arc_easy,wikipedia,passkey"
OPTIONS = EvalOptions(tasks=TASKS, limit=100, dtype="float32", lengths=(512, 1024), per_cell=10, max_model_len=1024)


def _records(out: Path, label: str, task: str) -> list[dict]:
    return [json.loads(ln) for ln in (out / "items" / label / f"{task}.jsonl").read_text().splitlines()]


def main(out_json: str, *specs: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    work = Path(out_json).with_suffix("")
    summary = evaluate(list(specs), work, OPTIONS)
    settings = Settings(limit=OPTIONS.limit, max_model_len=OPTIONS.max_model_len, lengths=OPTIONS.lengths,
                        per_cell=OPTIONS.per_cell)
    mc, ppl, lc = resolve_tasks(TASKS)
    report: dict = {"command": "python -m benchmarks.end_to_end.eval_parity " + " ".join([out_json, *specs]),
                    "options": summary["options"], "models": {}}
    for spec in parse_models(list(specs)):
        tok = Tokenizer(AutoTokenizer.from_pretrained(str(spec.path)))
        is_mla = (spec.path / "mha2mla_report.json").is_file()
        model = load_reference(spec.path) if is_mla else \
            AutoModelForCausalLM.from_pretrained(str(spec.path), dtype=torch.float32).eval()
        t0 = time.perf_counter()
        got_mc = _records(work, spec.label, mc.name)
        want = [reference.score(model, r) for r in mc.prepare(tok, settings).requests]
        flat = [ll for r in got_mc for ll in r["loglikelihoods"]]
        at, same_choice = 0, 0
        for r in got_mc:
            k = len(r["loglikelihoods"])
            same_choice += r["pred"] == max(range(k), key=lambda i: want[at + i])
            at += k
        ppl_requests = ppl.prepare(tok, settings).requests
        got_ppl = [r["logprob"] for r in _records(work, spec.label, ppl.name)]
        want_windows = [reference.score(model, r) for r in ppl_requests]
        got_lc = [r["output"] for r in _records(work, spec.label, lc.name)]
        want_lc = [tok.decode(reference.greedy(model, r, tok.eot)) for r in lc.prepare(tok, settings).requests]
        report["models"][spec.label] = {
            "path": str(spec.path), "pytorch_model": "reference (MHA2MLA)" if is_mla else "transformers LlamaForCausalLM",
            "multiple_choice": {"items": len(got_mc), "requests": len(flat),
                                "max_abs_loglikelihood_diff": max(abs(a - b) for a, b in zip(flat, want)),
                                "same_choice": same_choice},
            "perplexity": {"documents": len(got_ppl), "windows": len(ppl_requests),
                           "abs_total_logprob_diff": abs(sum(got_ppl) - sum(want_windows)),
                           "vllm_token_perplexity": summary["results"][spec.label]["tasks"][ppl.name]["token_perplexity"]},
            "long_context": {"items": len(got_lc), "same_greedy_answer": sum(a == b for a, b in zip(got_lc, want_lc)),
                             "vllm_acc": summary["results"][spec.label]["tasks"][lc.name]["acc"]},
            "pytorch_seconds": time.perf_counter() - t0,
        }
        print(json.dumps(report["models"][spec.label], indent=2), flush=True)
    Path(out_json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main(*cli_args(__doc__, min_args=2))

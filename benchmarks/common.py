"""What more than one benchmark script needs, in one place (the scripts import nothing from each other).

- Synthetic checkpoints for GPU hosts without data or hub: random-weight Llama folders
  (:func:`save_random_llama`) and config-only folders for dummy-weight engines (re-exported from the
  package's own benchmark code, ``vllm_mha2mla.tools.bench``).
- Parity of an engine's tokens with a PyTorch model, teacher-forced (:func:`teacher_forced`,
  :func:`score_runs`), on random prompts (:func:`random_prompts`), the shared random-weight cases
  (:data:`PARITY_CASES`) or held-out text (:func:`held_out_prompts`).
- The decode kernel's inputs (:func:`paged_inputs`) and one call of the plugin's kernel or of vLLM's
  FlashMLA on them (:func:`decode_call`).
- The default model's studies: held-out windows and their perplexity (:func:`held_out_windows`,
  :func:`window_perplexity`, :func:`study_setup`).
- :func:`cli_args`: ``--help`` and a usage message for the scripts that read ``sys.argv`` themselves.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from conversion.default_model import ensure_default_model
from conversion.recovery.corpus import load_default_corpus
from vllm_mha2mla.tools.bench.folders import mla_config_for, write_config_only
from vllm_mha2mla.tools.bench.shapes import llama_config

__all__ = [
    "DECODE_SCALE", "PAGE", "PARITY_CASES", "cli_args", "decode_call", "eval_results_with_original",
    "held_out_prompts", "held_out_windows", "llama_config", "mla_config_for", "paged_inputs", "random_prompts",
    "save_random_llama", "score_runs", "study_setup", "targets_parser", "teacher_forced", "window_perplexity",
    "write_config_only", "write_targets",
]


# -- command lines ----------------------------------------------------------------------------------
def targets_parser(prog: str, doc: str, results_help: str) -> argparse.ArgumentParser:
    """The command line of a targets study (``studies.behaviour_targets``, ``studies.long_context_targets``): one
    ``mha2mla eval`` results.json, the original's label, the recovery reports' folder, where the tables go."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("results", type=Path, help=results_help)
    parser.add_argument("--original", default="original", help="the original's label")
    parser.add_argument("--reports", type=Path, help="folder of LABEL-finetune_report.json files")
    parser.add_argument("--output", type=Path, help="where targets.json/.md go (default: beside RESULTS)")
    return parser


def eval_results_with_original(path: Path, original: str) -> dict:
    """``results`` of an ``mha2mla eval`` results.json, which must hold a model labelled ``original``."""
    if not path.is_file():
        raise SystemExit(f"no results file at {path}")
    results = json.loads(path.read_text())["results"]
    if original not in results:
        raise SystemExit(f"{path} has no model labelled {original!r} (labels: {sorted(results)})")
    return results


def write_targets(output: Path, payload: dict, table: str) -> None:
    """A targets study's ``targets.json`` and ``targets.md`` (the table, also printed) in ``output``."""
    print(table)
    output.mkdir(parents=True, exist_ok=True)
    (output / "targets.json").write_text(json.dumps(payload, indent=1) + "\n")
    (output / "targets.md").write_text(table)
    print(f"wrote {output / 'targets.json'} and targets.md")


def cli_args(doc: str, min_args: int = 1, argv: list[str] | None = None) -> list[str]:
    """The script's arguments (``sys.argv[1:]``): with ``-h``/``--help`` print ``doc`` and exit 0,
    with fewer than ``min_args`` exit with ``doc`` as the message (status 1)."""
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(doc)
        raise SystemExit(0)
    if len(args) < min_args:
        raise SystemExit(doc)
    return args


# -- synthetic checkpoints ----------------------------------------------------------------------------
def save_random_llama(folder: Path, config: dict, seed: int = 0, std: float = 0.04) -> Path:
    """A real safetensors checkpoint with random weights (float32) of ``config``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.8, 1.2) if "norm" in name else p.normal_(0, std)
    model.save_pretrained(str(folder))
    return folder


PARITY_CASES = {
    # name: (llama config, rope_dim, d_kv); each fills a 576-value cache
    "gqa_d128": (llama_config(2048, 16, 4, 128, 4, 4096, 5632), 32, 112),
    "mha_d128": (llama_config(2048, 16, 16, 128, 4, 4096, 5632), 16, 20),
    "mha_d64": (llama_config(768, 12, 12, 64, 4, 4096, 2048), 8, 40),
}
"""The random-weight models the GPU parity checks convert (``gpu_plugin``, ``gpu_anyshape``)."""


# -- parity with a PyTorch model --------------------------------------------------------------------
def random_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of random token ids (from 3 up), 8, 15, 22, ... tokens long."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (8 + 7 * i,), generator=g).tolist() for i in range(n)]


def held_out_prompts(ids: list[int]) -> list[list[int]]:
    """8 prompts of 48–104 tokens cut from held-out token ids (no BOS: text mid-stream)."""
    return [ids[i * 97 : i * 97 + 48 + 8 * i] for i in range(8)]


@torch.no_grad()
def teacher_forced(model, prompts, outputs, device) -> dict:
    """Worst logit margin of vLLM's greedy tokens and worst prompt-logprob error.

    Greedy decoding in bf16 flips near-tied tokens, so an engine's tokens are judged teacher-forced:
    every token it chose must be within a margin of the reference's best logit."""
    margins, lp_errors, exact = [], [], 0
    for prompt, out in zip(prompts, outputs):
        seq = prompt + out["token_ids"]
        logits = model(torch.tensor([seq], device=device)).logits[0].float()
        gen = logits[len(prompt) - 1 : len(seq) - 1]
        chosen = gen.gather(1, torch.tensor(out["token_ids"], device=device)[:, None])[:, 0]
        margins.append(float((gen.max(-1).values - chosen).max()))
        exact += int(bool((gen.argmax(-1).cpu() == torch.tensor(out["token_ids"])).all()))
        if out.get("prompt_logprobs"):
            logp = logits.log_softmax(-1)
            want = [float(logp[t - 1, prompt[t]]) for t in range(1, len(prompt))]
            errors = [abs(a - b) for a, b in zip(want, out["prompt_logprobs"][1:])]
            worst = max(range(len(errors)), key=errors.__getitem__)
            lp_errors.append((errors[worst], 1 + worst))  # (error, index of that prompt token)
    max_error, worst_position = max(lp_errors) if lp_errors else (None, None)
    return {"max_margin": max(margins), "max_prompt_logprob_error": max_error,
            "worst_prompt_logprob_position": worst_position,
            "sequences_exactly_greedy": exact, "sequences": len(prompts)}


def score_runs(runs: dict, original, reference, device) -> dict:
    """Each engine run scored teacher-forced: ``baseline_llama`` against the original
    model, every other run against the MHA2MLA reference; failed runs kept as they are."""
    scored = {}
    for key, run in runs.items():
        if "error" in run:
            scored[key] = run
            continue
        model = original if key == "baseline_llama" else reference
        settings = {k: v for k, v in run["request"].items() if v is not None and k in
                    ("attention_backend", "kv_cache_dtype", "enable_prefix_caching", "max_num_batched_tokens")}
        scored[key] = {"backends": run["attention_backends"], "kv_cache_tokens": run["kv_cache_tokens"],
                       "settings": settings,
                       **teacher_forced(model, [o["prompt_token_ids"] for o in run["outputs"]], run["outputs"],
                                        device)}
    return scored


# -- the decode kernel's inputs ---------------------------------------------------------------------
PAGE = 16
"""vLLM's default block size for the plugin's backend."""
DECODE_SCALE = 0.07
"""The softmax scale of the decode calls that :func:`decode_call` makes."""


def paged_inputs(latent, rope, heads, batch, context, seed=0, page=PAGE):
    """Random bf16 queries and a paged cache of ``page``-token pages (16: vLLM's for this backend) in
    random order, each request holding 90-100% of ``context`` tokens: (q, cache, block table, lengths)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    lens = torch.randint(int(context * 0.9), context + 1, (batch,), device="cuda", generator=g).to(torch.int32)
    per_req = -(-context // page)
    pages = batch * per_req
    cache = (torch.randn(pages, page, latent + rope, device="cuda", generator=g) * 0.5).to(torch.bfloat16)
    table = torch.randperm(pages, device="cuda", generator=g)[: batch * per_req].view(batch, per_req).to(torch.int32)
    q = (torch.randn(batch, heads, latent + rope, device="cuda", generator=g) * 0.5).to(torch.bfloat16)
    return q, cache, table, lens


def decode_call(kernel: str, latent: int, q, cache, table, lens, context: int):
    """A function that runs one decode call of ``kernel`` on these inputs (scale :data:`DECODE_SCALE`):
    ``plugin`` (the plugin's Triton kernel with its own plan) or ``flashmla`` (vLLM's
    ``flash_mla_with_kvcache``, 576-value rows only)."""
    if kernel == "plugin":
        from vllm_mha2mla.attention.triton_decode import mla_paged_decode  # here: Triton only for the kernel scripts

        return lambda: mla_paged_decode(q, cache, table, lens, DECODE_SCALE, latent, context)
    if kernel == "flashmla":
        if q.shape[-1] != 576:
            raise SystemExit(f"flashmla serves 576-value rows only, not {q.shape[-1]}")
        from vllm.v1.attention.ops.flashmla import flash_mla_with_kvcache, get_mla_metadata

        sched, _ = get_mla_metadata(lens, q.shape[1], 1, is_fp8_kvcache=False)
        return lambda: flash_mla_with_kvcache(q=q.unsqueeze(1), k_cache=cache.unsqueeze(-2), block_table=table,
                                              cache_seqlens=lens, head_dim_v=latent, tile_scheduler_metadata=sched,
                                              softmax_scale=DECODE_SCALE, causal=True, is_fp8_kvcache=False)
    raise SystemExit(f"kernel must be plugin or flashmla, not {kernel!r}")


# -- studies of the default model -------------------------------------------------------------------
@torch.no_grad()
def window_perplexity(model, windows: torch.Tensor) -> float:
    """Perplexity of a PyTorch causal LM over token windows ``[n, seq_len]`` (8 windows a batch)."""
    nll, count = 0.0, 0
    for batch in windows.split(8):
        logits = model(batch).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                 reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


def held_out_windows(tokenizer, tokens: int, seq_len: int = 512) -> torch.Tensor:
    """The default corpus's held-out documents, EOS-separated, as ``tokens // seq_len`` windows."""
    ids: list[int] = []
    for doc in load_default_corpus().held_out:
        ids += tokenizer(doc, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        if len(ids) >= tokens:
            break
    n = tokens // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def study_setup(out: Path):
    """What every study of the default model starts with: its output folder, the 2 cores' threads,
    the model folder and its tokenizer."""
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    src = ensure_default_model()
    return src, AutoTokenizer.from_pretrained(str(src))

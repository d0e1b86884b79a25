"""Where does the converted model lose the needle? Attention mass on it, per layer and head.

For needle-in-a-haystack prompts (``mha2mla eval``'s own items: ``niah`` by default, any of the
filler tasks with ``--task``) at each length, runs the Hugging Face original (transformers) and
the converted checkpoint (``conversion.load_reference``, the PyTorch reference of what vLLM
serves) over the prompt followed by the gold answer, and measures, per layer and head, the
attention weight two query positions put on the needle's tokens:

- ``last_prompt``: the prompt's last token (it predicts the answer's first token);
- ``first_answer``: the answer's first token, teacher-forced (it predicts the second).

``needle`` is the whole hidden sentence (the item's ``fact``), ``value`` only the characters of
the value in it. Each model's mass is averaged over the prompts of a length; ``uniform`` is what
a head attending evenly to every earlier token would put there. Also per prompt: the gold
answer's log-probability and whether the answer's first token is the greedy one.

The attention rows come from the models' own ``scaled_dot_product_attention`` calls: while a
forward runs, every call is also answered for the two query rows alone (``softmax(q_r·Kᵀ·scale)``
with the call's mask, grouped-query keys repeated), so an 8K prompt keeps two rows per head in
memory, never the 8K × 8K matrix that ``output_attentions`` builds; the calls themselves run over
1,024 query rows at a time (:data:`QUERY_CHUNK`). One model is loaded at a time.

Writes ``needle_attention.json`` and ``needle_attention.png`` (per query and length: original,
converted, converted − original, layers × heads) into ``--output`` and prints the heads that lose
the most mass.

Usage: python -m benchmarks.studies.needle_attention ORIGINAL_DIR MLA_DIR [--lengths 1024,4096]
       [--depths 0.25,0.5,0.75] [--per-cell 1] [--task niah] [--text FILE] [--seed 0] [--top 15]
       [--dtype float32] [--output DIR]
Results: benchmarks/README.md lists the folders this script wrote.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from conversion.retrieval import attention_rows, span_mass
from vllm_mha2mla.tools.evaluation import long_context

QUERIES = ("last_prompt", "first_answer")
SPANS = ("needle", "value")
TASKS = ("niah", "passkey", "niah_multikey", "niah_multivalue", "variable_tracking")
TOP_KEPT = 100
"""Rows of ``top_losses`` in the JSON (every row follows from ``mass``)."""


# -- attention rows: conversion.retrieval.attention_rows / span_mass (the retrieval calibration reads them too)


QUERY_CHUNK = 1024
"""Query rows per SDPA call while capturing: a kernel that builds the score matrix (PyTorch's math path,
which the converted model's unequal key and value widths take on a CPU) then holds ``heads × 1024 × S``
scores, not ``heads × S × S`` (7.2 GB at 8K for SmolLM2's conversion)."""


def chunked_sdpa(sdpa, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """``sdpa(query, key, value, ...)`` over :data:`QUERY_CHUNK` query rows at a time (each row sees
    the keys it saw before: the causal mask made explicit, a given mask sliced by rows)."""
    length = query.shape[-2]
    if length <= QUERY_CHUNK or key.shape[-2] != length or dropout_p:
        return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    **kwargs)
    out = []
    for a in range(0, length, QUERY_CHUNK):
        b = min(length, a + QUERY_CHUNK)
        if attn_mask is not None:
            mask = attn_mask if attn_mask.shape[-2] == 1 else attn_mask[..., a:b, :]
        elif is_causal:
            mask = torch.arange(length, device=query.device)[None, :] <= torch.arange(a, b, device=query.device)[:, None]
        else:
            mask = None
        out.append(sdpa(query[..., a:b, :], key, value, attn_mask=mask, scale=scale, **kwargs))
    return torch.cat(out, dim=-2)


@contextlib.contextmanager
def capture(rows: Sequence[int], spans: Sequence[tuple[int, int]]):
    """While active, each ``F.scaled_dot_product_attention`` call (one per layer in a forward) appends
    ``[heads, len(rows), len(spans)]``: the mass its query rows put on each span, and runs over
    :data:`QUERY_CHUNK` query rows at a time. Yields that list."""
    original = F.scaled_dot_product_attention
    per_call: list[torch.Tensor] = []

    def wrapped(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        probs = attention_rows(query, key, rows, attn_mask, is_causal, scale)
        per_call.append(span_mass(probs, spans)[0].cpu())
        return chunked_sdpa(original, query, key, value, attn_mask, dropout_p, is_causal, scale, **kwargs)

    F.scaled_dot_product_attention = wrapped
    try:
        yield per_call
    finally:
        F.scaled_dot_product_attention = original


# -- prompts ----------------------------------------------------------------------------------------
def char_span_tokens(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """``[first, last + 1)`` of the tokens whose characters overlap ``[start, end)``."""
    hit = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
    if not hit:
        raise ValueError(f"no token covers characters {start}..{end}")
    return hit[0], hit[-1] + 1


def prompt_spans(hf_tokenizer, item: long_context.Item) -> dict[str, tuple[int, int]]:
    """Token spans of the item's fact (``needle``) and of its first value inside it (``value``), from
    the fast tokenizer's character offsets of the decoded prompt (its tokens must be the prompt's)."""
    ids = list(item.request.token_ids)
    text = hf_tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    enc = hf_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc.input_ids) != ids:
        raise ValueError("the decoded prompt does not tokenize back to its ids: the needle cannot be placed")
    at = text.find(item.fact)
    if at < 0:
        raise ValueError("the needle is not in the prompt")
    value = item.facts[0][0]
    value_at = at + max(0, item.fact.find(value))
    return {"needle": char_span_tokens(enc.offset_mapping, at, at + len(item.fact)),
            "value": char_span_tokens(enc.offset_mapping, value_at, value_at + len(value))}


def build_items(task: str, encode, haystack: list[str] | None, lengths, depths, per_cell: int, seed: int):
    if task == "passkey":
        return long_context.passkey_items(encode, lengths, depths, per_cell, seed)
    if task == "variable_tracking":
        return long_context.variable_tracking_items(encode, lengths, depths, per_cell, seed)
    build = {"niah": long_context.niah_items, "niah_multikey": long_context.niah_multikey_items,
             "niah_multivalue": long_context.niah_multivalue_items}[task]
    return build(encode, haystack, lengths, depths, per_cell, seed)


# -- models -----------------------------------------------------------------------------------------
def load_model(path: Path, converted: bool, dtype: torch.dtype):
    if converted:
        from conversion import load_reference

        return load_reference(path, dtype)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa").eval()


@torch.no_grad()
def measure(model, prompt: Sequence[int], answer: Sequence[int], spans: dict[str, tuple[int, int]]) -> dict:
    """One forward over ``prompt + answer``: mass ``[layers, heads, query, span]`` on ``spans`` from
    the two query rows, the answer's log-probability and whether its first token is greedy."""
    ids = torch.tensor([list(prompt) + list(answer)])
    rows = [len(prompt) - 1, len(prompt)]
    with capture(rows, [spans[s] for s in SPANS]) as per_call:
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    if len(per_call) != model.config.num_hidden_layers:
        raise RuntimeError(f"captured {len(per_call)} attention calls for {model.config.num_hidden_layers} layers")
    logits = model.get_output_embeddings()(hidden[0, len(prompt) - 1:len(prompt) - 1 + len(answer)]).float()
    logprobs = logits.log_softmax(-1)
    gold = torch.tensor(list(answer))
    return {"mass": torch.stack(per_call).tolist(),
            "answer_logprob": float(logprobs.gather(-1, gold[:, None]).sum()),
            "first_token_greedy": bool(logits[0].argmax() == gold[0])}


# -- the study --------------------------------------------------------------------------------------
def run(original: Path, converted: Path, lengths: Sequence[int], depths: Sequence[float], per_cell: int,
        task: str = "niah", text: Path | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
        log=print) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(original))

    def encode(s: str) -> list[int]:
        return tokenizer(s, add_special_tokens=False).input_ids

    haystack = None
    if task.startswith("niah"):
        if text is not None:
            haystack = long_context.essay_sentences(text.read_text(encoding="utf-8", errors="replace"))
        else:
            from conversion.recovery.corpus import load_default_corpus

            haystack = long_context.essay_sentences(load_default_corpus().out_of_domain[0])
    items = build_items(task, encode, haystack, lengths, depths, per_cell, seed)
    prompts = []
    for item in items:
        spans = prompt_spans(tokenizer, item)
        prompts.append({"length": item.length, "depth": item.depth, "tokens": len(item.request.token_ids),
                        "answer": item.facts[0][0], "spans": spans, "models": {}})
    masses: dict[str, list] = {}
    for name, path in (("original", original), ("converted", converted)):
        start = time.time()
        model = load_model(path, name == "converted", dtype)
        masses[name] = []
        for item, prompt in zip(items, prompts):
            answer = encode(" " + item.facts[0][0])
            out = measure(model, item.request.token_ids, answer, prompt["spans"])
            masses[name].append(torch.tensor(out.pop("mass")))
            prompt["models"][name] = out
        del model
        log(f"{name}: {len(items)} prompts in {time.time() - start:.1f} s")
    shapes = {name: tuple(m[0].shape) for name, m in masses.items()}
    summary: dict = {"original": str(original), "converted": str(converted), "task": task, "lengths": list(lengths),
                     "depths": list(depths), "per_cell": per_cell, "seed": seed, "dtype": str(dtype).split(".")[-1],
                     "queries": list(QUERIES), "spans": list(SPANS),
                     "shape": {name: {"layers": s[0], "heads": s[1]} for name, s in shapes.items()},
                     "prompts": prompts, "mass": {}, "uniform": {}}
    for name, per_prompt in masses.items():
        summary["mass"][name] = {}
        for length in lengths:
            at = [i for i, p in enumerate(prompts) if p["length"] == length]
            mean = torch.stack([per_prompt[i] for i in at]).mean(0)  # [layers, heads, query, span]
            summary["mass"][name][str(length)] = {
                q: {s: mean[:, :, qi, si].round(decimals=5).tolist() for si, s in enumerate(SPANS)}
                for qi, q in enumerate(QUERIES)}
    for length in lengths:
        at = [p for p in prompts if p["length"] == length]
        summary["uniform"][str(length)] = {s: sum((p["spans"][s][1] - p["spans"][s][0]) / p["tokens"] for p in at)
                                           / len(at) for s in SPANS}
    summary["top_losses"] = top_losses(summary, top=TOP_KEPT) if shapes["original"] == shapes["converted"] else []
    return summary


def top_losses(summary: dict, span: str = "needle", top: int | None = None) -> list[dict]:
    """(length, query, layer, head) rows sorted by the mass the conversion lost on ``span``, largest first."""
    rows = []
    for length in summary["lengths"]:
        for q in QUERIES:
            orig = torch.tensor(summary["mass"]["original"][str(length)][q][span])
            conv = torch.tensor(summary["mass"]["converted"][str(length)][q][span])
            for layer, head in torch.cartesian_prod(torch.arange(orig.shape[0]), torch.arange(orig.shape[1])).tolist():
                rows.append({"length": length, "query": q, "layer": layer, "head": head,
                             "original": float(orig[layer, head]), "converted": float(conv[layer, head]),
                             "lost": float(orig[layer, head] - conv[layer, head])})
    rows.sort(key=lambda r: -r["lost"])
    return rows[:top] if top else rows


def loss_table(summary: dict, top: int) -> str:
    lines = [f"{'length':>7} {'query':>12} {'layer':>5} {'head':>4} {'original':>9} {'converted':>9} {'lost':>7}"]
    for r in summary["top_losses"][:top]:
        lines.append(f"{r['length']:>7} {r['query']:>12} {r['layer']:>5} {r['head']:>4} {r['original']:>9.3f} "
                     f"{r['converted']:>9.3f} {r['lost']:>7.3f}")
    return "\n".join(lines)


def plot(summary: dict, path: Path, span: str = "needle") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(length, q) for q in QUERIES for length in summary["lengths"]]
    same = summary["shape"]["original"] == summary["shape"]["converted"]
    fig, axes = plt.subplots(len(panels), 3, figsize=(11, 3.2 * len(panels)), squeeze=False, layout="constrained")
    for r, (length, q) in enumerate(panels):
        orig = torch.tensor(summary["mass"]["original"][str(length)][q][span])
        conv = torch.tensor(summary["mass"]["converted"][str(length)][q][span])
        top = max(float(orig.max()), float(conv.max()), 1e-6)
        for c, (title, data, kw) in enumerate([
                ("original", orig, {"cmap": "viridis", "vmin": 0, "vmax": top}),
                ("converted", conv, {"cmap": "viridis", "vmin": 0, "vmax": top}),
                ("converted − original", conv - orig if same else None, {"cmap": "RdBu", "vmin": -top, "vmax": top})]):
            ax = axes[r][c]
            if data is None:
                ax.axis("off")
                continue
            im = ax.imshow(data.numpy(), aspect="auto", interpolation="nearest", **kw)
            ax.set_title(f"{title}: {q}, {length} tokens", fontsize=8)
            ax.set_xlabel("head", fontsize=8)
            ax.set_ylabel("layer", fontsize=8)
            fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"attention mass on the {span} ({summary['task']})", fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("original", type=Path)
    ap.add_argument("converted", type=Path)
    ap.add_argument("--lengths", default="1024,4096", help="prompt lengths in tokens, comma-separated")
    ap.add_argument("--depths", default="0.25,0.5,0.75", help="needle depths, comma-separated")
    ap.add_argument("--per-cell", type=int, default=1, help="prompts per (length, depth)")
    ap.add_argument("--task", default="niah", choices=TASKS)
    ap.add_argument("--text", type=Path, help="haystack text for the niah tasks (default: the corpus's essays)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top", type=int, default=15, help="rows of the printed table")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--output", type=Path, default=Path("needle-attention"))
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    depths = [float(x) for x in args.depths.split(",") if x.strip()]
    summary = run(args.original, args.converted, lengths, depths, args.per_cell, args.task, args.text, args.seed,
                  getattr(torch, args.dtype))
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "needle_attention.json").write_text(json.dumps(summary, indent=1) + "\n")
    try:
        plot(summary, args.output / "needle_attention.png")
    except ImportError:
        print("matplotlib is not installed: no plot")
    if summary["top_losses"]:
        print("heads that lose the most attention mass on the needle:")
        print(loss_table(summary, args.top))
    for name in ("original", "converted"):
        by = [p["models"][name] for p in summary["prompts"]]
        print(f"{name}: first answer token greedy in {sum(b['first_token_greedy'] for b in by)}/{len(by)}, "
              f"mean answer log-prob {sum(b['answer_logprob'] for b in by) / len(by):.2f}")
    print(f"wrote {args.output / 'needle_attention.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

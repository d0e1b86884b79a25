"""Does keeping the retrieval heads' low-frequency pairs give back long-context retrieval, at equal cache?

Issue 32 item 2. SmolLM2-135M-Instruct is converted at 192 cached values per token per layer
(rope_dim 32, d_kv 32, ``--svd aw-joint``, ``--layout exact``: the GPU runs' conversion,
``benchmarks/gpu/jobs.sh convert``; float32 weights here) once per partial-RoPE strategy — 2-norm,
low, uniform, retrieval (``conversion.retrieval``: the top share of kv-heads by attention mass on a
planted fact keep their lowest-frequency pairs) and variants of its shares and band, plus one
diagnostic off equal cache (2-norm with the latent uncut: partial RoPE alone) — and every model, the
original too, is scored **without recovery** with the PyTorch reference model on the CPU:

- ``niah`` and ``passkey`` prompts at each length, from ``mha2mla eval``'s own builders
  (``vllm_mha2mla.tools.evaluation.long_context``: the essays haystack, the repeated filler; text the
  retrieval calibration never reads — it buries its own fact template in training-side Wikipedia
  paragraphs). Each prompt plus its gold answer runs once, teacher-forced: ``logprob`` is the answer's
  summed log-probability, ``exact`` whether every answer token is the greedy one (what greedy
  decoding would write first), ``first`` whether the first one is;
- held-out perplexity on short windows of the default corpus's held-out split (``benchmarks.common``),
  so a cost anywhere else shows.

Writes ``rope_retrieval.json`` (settings, every model's scores and per-prompt records, the retrieval
heads and the pairs each strategy kept for them, how many kept pairs differ from 2-norm's, conversion
times) and ``rope_retrieval.png`` into ``--out``, and prints the table. Every model but the original runs
inside :func:`fused_attention` (same attention, the fused CPU kernel). Checkpoints go to ``--work`` (reused when present, unless
``--fresh``); the JSON is rewritten after each model, and ``--resume`` skips models already in it.

Usage: python -m benchmarks.studies.rope_retrieval_study [--out DIR] [--work DIR] [--variants a,b,...]
       [--lengths 1024,2048] [--depths 0.1,0.3,0.5,0.7,0.9] [--tasks niah:2,passkey:1]
       [--ppl-tokens 4096] [--limit N] [--resume] [--fresh] [--threads 2]
Results: benchmarks/README.md lists the folders this script wrote.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from benchmarks.common import held_out_windows, study_setup, window_perplexity
from conversion import ConvertOptions, convert, load_reference

BASE = dict(rope_dim=32, d_kv=32, svd="aw-joint", layout="exact", dtype="float32")
"""192 cached values per token per layer (3 kv-heads × (32 rotary + 32 latent)), as the GPU runs convert."""
VARIANTS = {
    "2-norm": dict(strategy="2-norm"),
    "retrieval": dict(strategy="retrieval"),
    "low": dict(strategy="low"),
    "uniform": dict(strategy="uniform"),
    "retrieval band high": dict(strategy="retrieval", retrieval_band="high"),
    "retrieval pairs 1.0": dict(strategy="retrieval", retrieval_pairs=1.0),
    "retrieval heads 0.2 pairs 1.0": dict(strategy="retrieval", retrieval_heads=0.2, retrieval_pairs=1.0),
    "2-norm latent uncut (384 values)": dict(strategy="2-norm", d_kv=96),
    # Equal cache, the latent moved to the layers whose heads retrieve (the needle study's layers 14-23): the
    # uncut diagnostic says the latent's cut, not the rotary choice, is what loses the needle.
    "2-norm layers 14-23 latent 192 others 48": dict(strategy="2-norm", d_kv=None,
                                                       layer_latent=[48] * 14 + [192] * 10 + [48] * 6),
    "2-norm layers 14-23 latent 144 others 72": dict(strategy="2-norm", d_kv=None,
                                                       layer_latent=[72] * 14 + [144] * 10 + [72] * 6),
    # The four layers holding the calibration's top retrieval heads (17, 18, 21, 23) uncut (288), the rest 66:
    # 2,868 latent values in all, under the 2,880 of uniform 96.
    "2-norm layers 17 18 21 23 uncut others 66": dict(
        strategy="2-norm", d_kv=None, layer_latent=[288 if i in (17, 18, 21, 23) else 66 for i in range(30)]),
}
"""Name → the options on top of :data:`BASE` (retrieval's defaults: heads 0.1, pairs 0.5, band low). The last is
not at equal cache: partial RoPE alone (the latent keeps every non-rotary key and value dim, 384 values as the
original), to tell the loss of the rotary dims from the loss of the latent's cut."""
TASKS = ("niah", "passkey")
DEFAULT_TASKS = "niah:2,passkey:1"
"""``task:prompts per (length, depth)``: the 2-norm conversion already answers passkey at 1K and 2K (its
log-probability still moves), niah not at all, so niah gets more of the CPU time."""
DEFAULT_OUT = Path("benchmarks/results/2026-12-07-cpu-rope-retrieval")


def build_items(tokenizer, tasks: dict[str, int], lengths, depths, seed=0):
    """The evaluation's own long-context items (held-out text: the essays haystack, the passkey filler);
    ``tasks``: task → prompts per (length, depth)."""
    from conversion.recovery.corpus import load_default_corpus
    from vllm_mha2mla.tools.evaluation import long_context

    def encode(s: str) -> list[int]:
        return tokenizer(s, add_special_tokens=False).input_ids

    items = []
    for task, per_cell in tasks.items():
        if task == "niah":
            haystack = long_context.essay_sentences(load_default_corpus().out_of_domain[0])
            built = long_context.niah_items(encode, haystack, lengths, depths, per_cell, seed)
        elif task == "passkey":
            built = long_context.passkey_items(encode, lengths, depths, per_cell, seed)
        else:
            raise SystemExit(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
        items += [{"task": task, "length": it.length, "depth": it.depth, "prompt": list(it.request.token_ids),
                   "answer": encode(" " + it.answer), "value": it.answer} for it in built]
    return items


@torch.no_grad()
def score_answer(model, prompt: list[int], answer: list[int]) -> dict:
    """Teacher-forced: the answer's summed log-probability, every answer token greedy, the first greedy.
    Logits only at the answer's rows (a 2K prompt's full logits would be 400 MB)."""
    ids = torch.tensor([prompt + answer])
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    logits = model.get_output_embeddings()(hidden[0, len(prompt) - 1:len(prompt) - 1 + len(answer)]).float()
    gold = torch.tensor(answer)
    hit = logits.argmax(-1) == gold
    return {"logprob": float(logits.log_softmax(-1).gather(-1, gold[:, None]).sum()), "exact": bool(hit.all()),
            "first": bool(hit[0])}


@contextlib.contextmanager
def fused_attention():
    """While active, an SDPA call whose values are narrower than its queries and keys (the converted
    model's: 128-wide q/k, 64-wide v) gets its values zero-padded to the q/k width and the output cut
    back, so PyTorch's fused CPU kernel takes it instead of the math path (which builds the L × L
    scores): the same attention to float32 rounding (measured: 1.6e-4 largest difference in 2K-token
    hidden states of magnitude 54), 1.7x faster at 2K tokens."""
    original = F.scaled_dot_product_attention

    def padded(query, key, value, *args, **kwargs):
        width = value.shape[-1]
        if width >= query.shape[-1]:
            return original(query, key, value, *args, **kwargs)
        value = F.pad(value, (0, query.shape[-1] - width))
        return original(query, key, value, *args, **kwargs)[..., :width]

    F.scaled_dot_product_attention = padded
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def summarise(records: list[dict]) -> dict:
    """Mean log-prob, exact and first-token rates per ``task/length``."""
    cells: dict[str, list[dict]] = {}
    for r in records:
        cells.setdefault(f"{r['task']}/{r['length']}", []).append(r)
    return {key: {"n": len(rs), "logprob": sum(r["logprob"] for r in rs) / len(rs),
                  "exact": sum(r["exact"] for r in rs) / len(rs), "first": sum(r["first"] for r in rs) / len(rs)}
            for key, rs in sorted(cells.items())}


def kept_pairs_of_retrieval_heads(folder: Path, heads: list[dict]) -> dict:
    """The rotary pairs a checkpoint keeps for each of the given heads (``L{layer}kv{kv_head}`` → pairs)."""
    pairs = json.loads((folder / "config.json").read_text())["mha2mla"]["rope_pairs"]
    return {f"L{h['layer']}kv{h['kv_head']}": pairs[h["layer"]][h["kv_head"]] for h in heads}


def pairs_changed(folder: Path, reference: Path) -> int:
    """Kept pairs (summed over layers and kv-heads) of one checkpoint that another does not keep."""
    mine, theirs = (json.loads((f / "config.json").read_text())["mha2mla"]["rope_pairs"] for f in (folder, reference))
    return sum(len(set(a) - set(b)) for la, lb in zip(mine, theirs) for a, b in zip(la, lb))


def table(results: dict) -> str:
    keys = sorted({k for m in results["models"].values() for k in m.get("retrieval_scores", {})})
    head = "| model | " + " | ".join(f"{k} log-prob / exact" for k in keys) + \
        " | held-out ppl | pairs ≠ 2-norm | convert s |"
    lines = [head, "|" + "---|" * (len(keys) + 4)]
    for name, m in results["models"].items():
        cells = [f"{m['retrieval_scores'][k]['logprob']:.2f} / {100 * m['retrieval_scores'][k]['exact']:.0f}%"
                 for k in keys]
        conv = f"{m['convert_seconds']:.0f}" if m.get("convert_seconds") is not None else "–"
        changed = m.get("pairs_changed_vs_2norm")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {m['perplexity']:.2f} | "
                     f"{'–' if changed is None else changed} | {conv} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    keys = sorted({k for m in results["models"].values() for k in m["retrieval_scores"]})
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.8), layout="constrained",
                             gridspec_kw={"width_ratios": [3, 3, 1.6, 1.2]})
    width = 0.8 / max(1, len(names))
    for ax, metric, label in ((axes[0], "logprob", "answer log-prob (teacher-forced)"),
                              (axes[1], "exact", "answers greedy throughout")):
        for i, name in enumerate(names):
            vals = [results["models"][name]["retrieval_scores"][k][metric] for k in keys]
            ax.bar([x + i * width for x in range(len(keys))], vals, width, label=name)
        ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(keys))], keys, fontsize=8)
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=7)
    ppl = [results["models"][n]["perplexity"] for n in names]
    axes[2].barh(names, ppl, color=[f"C{i}" for i in range(len(names))])
    axes[2].invert_yaxis()
    axes[2].set_title("held-out perplexity (512-token windows)", fontsize=9)
    axes[2].tick_params(labelsize=7)
    scores = results.get("retrieval_head_scores")
    if scores:
        im = axes[3].imshow(torch.tensor(scores).numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
        axes[3].set_title("retrieval score (calibration)", fontsize=9)
        axes[3].set_xlabel("kv-head", fontsize=8)
        axes[3].set_ylabel("layer", fontsize=8)
        fig.colorbar(im, ax=axes[3], shrink=0.8)
    else:
        axes[3].axis("off")
    fig.suptitle(f"SmolLM2-135M at 192 cached values, no recovery: partial-RoPE strategies (CPU, reference model)",
                 fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _folder_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in name)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--work", type=Path, default=Path("/tmp/rope-retrieval-study"), help="checkpoints (not kept)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--tasks", default=DEFAULT_TASKS, help="task:prompts per (length, depth), comma-separated")
    ap.add_argument("--ppl-tokens", type=int, default=4096, help="held-out tokens in 512-token windows")
    ap.add_argument("--limit", type=int, help="score only the first N prompts (to time a small batch)")
    ap.add_argument("--resume", action="store_true", help="skip models already in the JSON")
    ap.add_argument("--fresh", action="store_true", help="convert again even where a checkpoint exists")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 where another job holds a core: MKL's "
                                                          "SVD with 2 threads then ran 250x slower)")
    args = ap.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    src, tok = study_setup(args.out)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    tasks = {t.split(":")[0]: int(t.split(":")[1]) if ":" in t else 1 for t in args.tasks.split(",") if t}
    items = build_items(tok, tasks, lengths, depths)[:args.limit]
    windows = held_out_windows(tok, args.ppl_tokens)
    out_json = args.out / "rope_retrieval.json"
    results = json.loads(out_json.read_text()) if args.resume and out_json.is_file() else {}
    command = "python -m benchmarks.studies.rope_retrieval_study " + " ".join(argv if argv is not None else sys.argv[1:])
    if "command" in results:  # a resumed run keeps the first command and commit, and lists its own
        results.setdefault("resumed", []).append({"command": command, "commit": _commit()})
    else:
        results.update(command=command, commit=_commit())
    results.update({
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
                                        f"torch {torch.__version__}",
        "base": BASE, "variants": {n: VARIANTS[n] for n in names}, "lengths": lengths, "depths": depths,
        "tasks": tasks, "prompts": len(items), "held_out_tokens": windows.numel()})
    results.setdefault("models", {})

    def save() -> None:
        out_json.write_text(json.dumps(results, indent=1) + "\n")

    def evaluate(name: str, model, extra: dict) -> None:
        t0 = time.perf_counter()
        records = []
        for it in tqdm(items, desc=f"{name}: retrieval", unit="prompt"):
            records.append({k: it[k] for k in ("task", "length", "depth", "value")}
                           | score_answer(model, it["prompt"], it["answer"]))
        t1 = time.perf_counter()
        ppl = window_perplexity(model, windows)
        results["models"][name] = {**extra, "retrieval_scores": summarise(records), "perplexity": ppl,
                                   "score_seconds": t1 - t0, "perplexity_seconds": time.perf_counter() - t1,
                                   "records": records}
        save()
        row = ", ".join(f"{k} {v['logprob']:.2f}/{100 * v['exact']:.0f}%"
                        for k, v in results["models"][name]["retrieval_scores"].items())
        print(f"{name}: {row}; perplexity {ppl:.2f} ({t1 - t0:.0f} s + {time.perf_counter() - t1:.0f} s)", flush=True)

    if "original" not in results["models"]:
        evaluate("original", AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval(),
                 {"convert_seconds": None})
    heads: list[dict] = results.get("retrieval_heads", [])
    for name in names:
        if name in results["models"]:
            continue
        folder = args.work / _folder_name(name)
        seconds = None
        if args.fresh and folder.exists():
            shutil.rmtree(folder)
        if not (folder / "config.json").is_file():
            t0 = time.perf_counter()
            convert(src, folder, ConvertOptions(**{**BASE, **VARIANTS[name]}))
            seconds = time.perf_counter() - t0
        report = json.loads((folder / "mha2mla_report.json").read_text())
        if "retrieval" in report and name == "retrieval":
            heads = report["retrieval"]["heads"]
            results["retrieval_heads"] = heads
            results["retrieval_head_scores"] = report["retrieval"]["head_scores"]
            results["retrieval_calibration"] = {k: report["retrieval"][k] for k in
                                                ("prompts", "prompt_tokens", "original_answer_logprob",
                                                 "original_answers_greedy")}
        extra = {"convert_seconds": seconds, "options": VARIANTS[name],
                 "retrieval": {k: v for k, v in report.get("retrieval", {}).items() if k != "head_scores"}}
        model = load_reference(folder)
        with fused_attention():
            evaluate(name, model, extra)
        del model
    two_norm = args.work / "2-norm"
    for name in results["models"]:  # which pairs each strategy kept for the default retrieval heads
        folder = args.work / _folder_name(name)
        if heads and (folder / "config.json").is_file():
            results["models"][name]["pairs_of_retrieval_heads"] = kept_pairs_of_retrieval_heads(folder, heads)
        if (two_norm / "config.json").is_file() and (folder / "config.json").is_file():
            results["models"][name]["pairs_changed_vs_2norm"] = pairs_changed(folder, two_norm)
    save()
    print(table(results))
    try:
        plot(results, args.out / "rope_retrieval.png")
    except ImportError:
        print("matplotlib is not installed: no plot")
    print(f"wrote {out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

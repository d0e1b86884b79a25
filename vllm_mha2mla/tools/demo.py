"""``mha2mla demo``: convert a real model, recover it, and compare all three in vLLM.

Stages (each timed, with progress): prepare the model (the embedded default is
SmolLM2-135M-Instruct) and the default English corpus; convert (2-norm partial RoPE +
activation-aware joint SVD, calibrated on the corpus's training split); recover (the local
stage: layer-wise attention distillation, then a short global stage, ``--finetune-tokens``:
end-to-end distillation, ~8 minutes on 2 CPU cores together, on corpus text and teacher-written
chats); then run the original, the converted and the recovered model in vLLM, one engine each
under the same KV-cache memory, and measure: cached values/bytes per token per layer, KV capacity
in tokens, perplexity on the corpus's held-out split (never seen by calibration or training),
greedy chat samples and output tokens/s. Writes
``summary.json``, ``summary.md`` and ``chart.png`` under ``results/demo/<timestamp>/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from rich.console import Console
from rich.table import Table

from conversion.accounting import KVAccounting
from conversion.convert import ConvertOptions, convert
from conversion.default_model import MODEL_NAME, ensure_default_model
from conversion.errors import ConversionError
from conversion.mla_format.layout import MLALayout
from conversion.recovery.data import default_training_data
from conversion.text_data import split_text
from vllm_mha2mla.tools.runner import AUTO_DTYPE_ENV, EngineRequest, run_engine_in_subprocess
from vllm_mha2mla.tools.synthesize import vllm_engine_hooks

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Write a haiku about the sea.",
    "Explain what a neural network is in one sentence.",
    "What is 12 times 12?",
    "Name the largest planet in the solar system.",
    "Translate 'good morning' into Spanish.",
    "Who wrote Romeo and Juliet?",
)
AGREEMENT_TOKENS = 8
"""A sample agrees with the original when its first this-many greedy tokens are the same."""
SIDES = (("original", "MHA original"), ("converted", "MHA2MLA"), ("recovered", "MHA2MLA + recovery"))


@dataclass
class DemoOptions:
    model: Path | None = None
    out_dir: Path = Path("results/demo")
    rope_dim: int = 32
    d_kv: int = 32
    strategy: str = "2-norm"
    svd: str = "aw-joint"
    """Activation-aware joint SVD: on SmolLM2 at 192 values plain weight SVD gives perplexities
    in the thousands before recovery (measured)."""
    text: Path | None = None
    """A text file for calibration, training and held-out perplexity instead of the default corpus."""
    calib_tokens: int = 8192
    ppl_tokens: int = 8192
    ppl_seq_len: int = 512
    recover: bool = True
    local_tokens: int = 16384
    local_steps: int = 8
    """Adam steps per layer of the local stage: ~150 s on 2 cores (the demo then stays within ~10 minutes)."""
    local_seconds: float | None = None
    """Optional time cap of the local stage. Off by default: a cap that binds makes the recovered model,
    and its chat answers, depend on how busy the machine is (a capped 40-step stage got 3-14 steps a
    layer alone, fewer on shared cores, where chat answers dropped to 0 of 8)."""
    finetune_tokens: int = 40_000
    """Tokens of a global stage (end-to-end distillation of the attention weights on the same mix) after the local
    stage: ~6.5 min on 2 cores (~105 tokens/s, float32). Measured (benchmarks/results/2026-12-08-cpu-demo-global/):
    held-out perplexity 35.3 → 26.8 (65% → 85% of the conversion's gap closed) and 1 answer in 8 caught in a
    repetition loop instead of 4; the whole demo ~10 minutes instead of ~4. 0: the local stage only."""
    synthesize: int = 12_000
    """Tokens of teacher-written chat conversations (sampled in vLLM, ~35 conversations, ~1.5 min on 2
    cores) that join the corpus in the local stage's windows: the GPU recipe's data at CPU scale, so the
    recovered model is fitted on chat turns, not only on Wikipedia paragraphs. 0: corpus only."""
    synthesis_max_tokens: int = 128
    max_tokens: int = 64
    num_prompts: int = len(DEFAULT_PROMPTS)
    kv_cache_memory_bytes: int = 256 << 20
    """KV-cache memory of each engine, sized in bf16: a float32 engine gets twice as much (:func:`engine_settings`),
    so the capacity in tokens is what this memory holds in bf16 whichever dtype the engines compute in."""
    dtype: str = "bfloat16"
    """The converted checkpoints' dtype, and the engines' where the machine computes it natively."""
    engine_dtype: str | None = None
    """The vLLM engines' dtype; None: :func:`default_engine_dtype` (``dtype``, or float32 on CPUs without bf16)."""
    enforce_eager: bool | None = None
    """None: eager on a CPU (vLLM's torch.compile of SmolLM2 took ~90 s per engine on 2 cores, several times what
    the demo's requests take eager), torch.compile + CUDA graphs on a GPU; as ``mha2mla bench`` and ``eval`` do."""
    prompts: tuple[str, ...] = field(default=DEFAULT_PROMPTS)


def native_bf16() -> bool:
    """Whether this machine computes bf16 natively: a CUDA GPU, or a CPU with AVX512-BF16 or AMX (x86) or
    the BF16 extension (aarch64). Without it, vLLM's CPU build emulates every bf16 matmul through float32
    conversions: on 2 AVX2 cores a bf16 engine of SmolLM2-135M took ~340 s to start and run the demo's
    requests, several times a float32 engine's time, which made bf16 engines most of the demo's time."""
    import torch

    if torch.cuda.is_available():
        return True
    try:
        caps = torch.cpu.get_capabilities()
        if caps.get("avx512_bf16") or caps.get("amx_bf16"):
            return True
    except (AttributeError, RuntimeError):  # an older torch: read the kernel's flags below
        pass
    try:
        flags = {f for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith(("flags", "Features")) for f in line.split(":", 1)[1].split()}
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def default_engine_dtype(dtype: str) -> str:
    """The engines' dtype for checkpoints of ``dtype``: float32 for bf16 ones on a machine without native bf16
    (:func:`native_bf16`), else ``dtype`` itself."""
    return "float32" if dtype == "bfloat16" and not native_bf16() else dtype


class EngineChoice(NamedTuple):
    dtype: str
    kv_cache_memory_bytes: int
    enforce_eager: bool


def engine_settings(opts: DemoOptions) -> EngineChoice:
    """How the demo's vLLM engines run. The KV cache follows the engine's dtype, so a float32 engine gets twice
    ``kv_cache_memory_bytes`` (sized in bf16): the same number of tokens, and the capacity ratios, a bf16 engine
    shows."""
    import torch

    dtype = opts.engine_dtype or default_engine_dtype(opts.dtype)
    eager = opts.enforce_eager if opts.enforce_eager is not None else not torch.cuda.is_available()
    return EngineChoice(dtype, opts.kv_cache_memory_bytes * (2 if dtype == "float32" else 1), eager)


@contextmanager
def _auto_dtype(dtype: str):
    """Engines started inside (in child processes too) that ask for dtype ``auto`` compute in ``dtype``
    (:data:`vllm_mha2mla.tools.runner.AUTO_DTYPE_ENV`)."""
    before = os.environ.get(AUTO_DTYPE_ENV)
    os.environ[AUTO_DTYPE_ENV] = dtype
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(AUTO_DTYPE_ENV, None)
        else:
            os.environ[AUTO_DTYPE_ENV] = before


def _stage(console: Console, timings: dict, name: str):
    class _Timer:
        def __enter__(self):
            console.rule(f"[bold]{name}")
            self.t0 = time.perf_counter()

        def __exit__(self, *exc):
            timings[name] = round(time.perf_counter() - self.t0, 1)
            if exc[0] is None:
                console.print(f"[green]done[/] in {timings[name]} s")

    return _Timer()


def perplexity(scoring_logprobs: list[list[float]]) -> float:
    """exp of the mean negative log-likelihood over all scored tokens."""
    values = [lp for seq in scoring_logprobs for lp in seq]
    return math.exp(-sum(values) / len(values))


def agreement(reference: list[list[int]], candidate: list[list[int]], tokens: int = AGREEMENT_TOKENS) -> int:
    """How many samples start with the same ``tokens`` greedy tokens as the reference's."""
    return sum(1 for a, b in zip(reference, candidate) if a[:tokens] == b[:tokens] and a)


def _chat_prompts(tokenizer, prompts) -> list[str]:
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                              tokenize=False) for p in prompts]
    return list(prompts)


def _engine(model: Path, opts: DemoOptions, prompts: list[str], scoring: list[list[int]]) -> dict:
    engine = engine_settings(opts)
    return run_engine_in_subprocess(EngineRequest(
        model=str(model), prompts=prompts, max_tokens=opts.max_tokens, dtype=engine.dtype,
        kv_cache_memory_bytes=engine.kv_cache_memory_bytes, max_model_len=max(1024, opts.ppl_seq_len + 8),
        timed_repeats=2, scoring_token_ids=scoring, enforce_eager=engine.enforce_eager,
    ))


def _held_out_windows(tokenizer, opts: DemoOptions, cache_dir: Path | None) -> tuple[list[list[int]], str]:
    """Held-out token windows: the default corpus's held-out split, or the tail of ``--text``."""
    if opts.text is None:
        _, held = default_training_data(tokenizer, opts.ppl_seq_len, cache_dir, max_train_tokens=opts.ppl_seq_len,
                                        held_out_tokens=opts.ppl_tokens, show_progress=False)
        return [held[i]["input_ids"].tolist() for i in range(len(held))], "default corpus, held-out split"

    _, held_out = split_text(opts.text.read_text(encoding="utf-8", errors="replace"))
    ids = tokenizer(held_out, add_special_tokens=False).input_ids[: opts.ppl_tokens]
    n = opts.ppl_seq_len
    return [ids[i : i + n] for i in range(0, len(ids) - n + 1, n)] or [ids], f"last 10% of {opts.text}"


def write_chart(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, _ in SIDES if k in summary]
    labels = [label for k, label in SIDES if k in summary]
    colors = ["#7f8c8d", "#e67e22", "#2e86c1"][: len(keys)]
    panels = [
        ("KV bytes / token / layer (bf16)", "kv_bytes_per_token_per_layer"),
        ("vLLM KV capacity (tokens)", "kv_cache_tokens"),
        ("held-out perplexity", "perplexity"),
        ("output tokens / s", "output_tokens_per_s"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for ax, (title, field_name) in zip(axes, panels):
        values = [summary[k][field_name] for k in keys]
        bars = ax.bar(labels, values, color=colors)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        for bar, v in zip(bars, values):
            ax.annotate(f"{v:,.4g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=9)
        ax.margins(y=0.15)
    fig.suptitle(f"{summary['model_name']}: MHA vs MHA2MLA vs MHA2MLA + recovery in vLLM ({summary['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(summary: dict) -> str:
    keys = [k for k, _ in SIDES if k in summary]
    header = "| | " + " | ".join(label for k, label in SIDES if k in summary) + " |"
    rows = [
        ("cached values / token / layer", "kv_values_per_token_per_layer", "{}"),
        ("KV bytes / token (all layers, bf16)", "kv_bytes_per_token", "{}"),
        ("vLLM KV capacity (tokens)", "kv_cache_tokens", "{:,}"),
        ("held-out perplexity", "perplexity", "{:.2f}"),
        ("output tokens / s", "output_tokens_per_s", "{:.1f}"),
        ("non-empty chat answers", "non_empty_answers", "{}"),
        (f"answers starting like the original's ({AGREEMENT_TOKENS} tokens)", "agrees_with_original", "{}"),
    ]
    lines = [header, "|---" * (len(keys) + 1) + "|"]
    for title, key, fmt in rows:
        lines.append(f"| {title} | " + " | ".join(fmt.format(summary[k][key]) for k in keys) + " |")
    lines.append("| attention backend | " + " | ".join(", ".join(summary[k]["attention_backends"]) for k in keys)
                 + " |")
    lines += ["", "| prompt | " + " | ".join(label for k, label in SIDES if k in summary) + " |",
              "|---" * (len(keys) + 1) + "|"]
    for s in summary["samples"]:
        cells = [s["prompt"]] + [s[k] for k in keys]
        lines.append("| " + " | ".join(x.replace("|", "\\|").replace("\n", " ") for x in cells) + " |")
    return "\n".join(lines) + "\n"


def run_demo(opts: DemoOptions, console: Console | None = None) -> Path:
    """Runs the whole comparison; returns the results folder."""
    from transformers import AutoTokenizer

    # inside: recovery loads transformers' Trainer (seconds), and every `mha2mla` command imports this module
    from conversion.recovery.finetune import FinetuneOptions, finetune
    from conversion.recovery.global_stage import GlobalOptions
    from conversion.recovery.local import LocalOptions

    console = console or Console()
    timings: dict[str, float] = {}
    out_dir = opts.out_dir / datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=False)
    steps = 7 if opts.recover else 5  # prepare, convert, [recover], one engine per model, summary
    with _stage(console, timings, f"1/{steps} prepare the model and the held-out text"):
        model = Path(opts.model) if opts.model else ensure_default_model()
        model_name = model.name if opts.model else MODEL_NAME
        tokenizer = AutoTokenizer.from_pretrained(str(model))
        scoring, held_out_name = _held_out_windows(tokenizer, opts, None)
        prompts = _chat_prompts(tokenizer, opts.prompts[: opts.num_prompts])
        engine = engine_settings(opts)
        console.print(f"model {model}; {len(scoring)} held-out windows of {opts.ppl_seq_len} tokens ({held_out_name}); "
                      f"{len(prompts)} prompts; vLLM engines: {engine.dtype}, "
                      f"{'eager' if engine.enforce_eager else 'compiled'}, {engine.kv_cache_memory_bytes >> 20} MiB KV")
    calib_file = None
    if opts.text is not None:
        calib_file = out_dir / "calibration.txt"
        calib_file.write_text(split_text(opts.text.read_text(encoding="utf-8", errors="replace"))[0])
    with _stage(console, timings, f"2/{steps} convert (partial RoPE + SVD)"):
        converted = out_dir / "mha2mla-model"
        report = convert(model, converted, ConvertOptions(
            rope_dim=opts.rope_dim, strategy=opts.strategy, d_kv=opts.d_kv, svd=opts.svd, calib_text=calib_file,
            calib_tokens=opts.calib_tokens, layout="exact", dtype=opts.dtype))
    recovery = None
    if opts.recover:
        with _stage(console, timings, f"3/{steps} recover ("
                    + ("teacher chats in vLLM, " if opts.synthesize else "") + "layer-wise distillation"
                    + (f" + {opts.finetune_tokens:,} tokens of global training)" if opts.finetune_tokens else ")")):
            recovered = out_dir / "mha2mla-recovered"
            with _auto_dtype(engine.dtype):  # the teacher-chat engine asks for "auto"
                recovery = finetune(converted, recovered, FinetuneOptions(
                    teacher=model, stage="both" if opts.finetune_tokens else "local",
                    data=[calib_file] if calib_file else [], seq_len=opts.ppl_seq_len, evaluate=False,
                    local_tokens=opts.local_tokens, local_seq_len=opts.ppl_seq_len,
                    local=LocalOptions(steps_per_layer=opts.local_steps, time_budget_s=opts.local_seconds),
                    global_=GlobalOptions(tokens=max(opts.finetune_tokens, 1), batch_size=2),
                    synthesize=opts.synthesize, synthesis_max_tokens=opts.synthesis_max_tokens,
                ), log=console.print, hooks=vllm_engine_hooks() if opts.synthesize else None)
    if calib_file is not None:
        calib_file.unlink()
    runs = {}
    for i, (key, label, path) in enumerate([("original", "MHA original", model), ("converted", "MHA2MLA", converted)]
                                           + ([("recovered", "MHA2MLA + recovery", recovered)] if opts.recover else [])):
        with _stage(console, timings, f"{i + (4 if opts.recover else 3)}/{steps} vLLM: {label}"):
            runs[key] = _engine(path, opts, prompts, scoring)
    with _stage(console, timings, f"{steps}/{steps} summary"):
        summary = summarise(opts, model, model_name, report, recovery, runs, scoring, held_out_name, timings)
        summary["converted_model"] = str(converted)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        (out_dir / "summary.md").write_text(f"# MHA2MLA demo: {model_name}\n\n" + markdown_table(summary))
        write_chart(summary, out_dir / "chart.png")
    print_summary(console, summary, out_dir)
    return out_dir


def summarise(opts: DemoOptions, model: Path, model_name: str, report: dict, recovery: dict | None, runs: dict,
              scoring: list[list[int]], held_out_name: str, timings: dict) -> dict:
    """The demo's summary: one entry per model run, ratios against the original, samples."""
    layout = MLALayout.from_dict(report["layout"])
    kv = KVAccounting.from_layout(layout, len(report["layer_errors"]))
    engine = engine_settings(opts)
    reference = [out["token_ids"] for out in runs["original"]["outputs"]]

    def side(run: dict, values: int) -> dict:
        tokens = [out["token_ids"] for out in run["outputs"]]
        return {
            "dtype": run["dtype"],
            "kv_values_per_token_per_layer": values,
            "kv_bytes_per_token_per_layer": values * 2,
            "kv_bytes_per_token": values * 2 * kv.num_layers,
            "kv_cache_tokens": run["kv_cache_tokens"],
            "perplexity": perplexity(run["scoring_logprobs"]),
            "output_tokens_per_s": run["output_tokens_per_s"],
            "attention_backends": run["attention_backends"],
            "non_empty_answers": sum(1 for out in run["outputs"] if out["text"].strip()),
            "agrees_with_original": agreement(reference, tokens),
        }

    summary: dict = {
        "model": str(model), "model_name": model_name, "device": runs["original"]["device"],
        "vllm_version": runs["original"]["vllm_version"],
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items() if k != "prompts"},
        "layout": report["layout"], "kv_cache_memory_bytes": opts.kv_cache_memory_bytes,
        "engine_dtype": engine.dtype, "engine_kv_cache_memory_bytes": engine.kv_cache_memory_bytes,
        "engine_enforce_eager": engine.enforce_eager,
        "held_out": held_out_name, "perplexity_tokens": sum(len(s) for s in scoring),
        "calibration": report.get("calibration_text"),
    }
    for key, run in runs.items():
        summary[key] = side(run, kv.original_values if key == "original" else layout.cache_values)
    original = summary["original"]
    summary["ratios"] = {
        "kv_reduction_pct": 100 * (1 - layout.cache_values / kv.original_values),
        "kv_capacity": summary["converted"]["kv_cache_tokens"] / original["kv_cache_tokens"],
        "kv_capacity_expected": kv.original_values / layout.cache_values,
        "perplexity": summary["converted"]["perplexity"] / original["perplexity"],
        "output_tokens_per_s": summary["converted"]["output_tokens_per_s"] / original["output_tokens_per_s"],
    }
    if "recovered" in summary:
        gap = summary["converted"]["perplexity"] - original["perplexity"]
        summary["ratios"]["perplexity_recovered"] = summary["recovered"]["perplexity"] / original["perplexity"]
        summary["ratios"]["perplexity_gap_closed_pct"] = (
            100 * (summary["converted"]["perplexity"] - summary["recovered"]["perplexity"]) / gap if gap > 0 else None)
    if recovery is not None:
        summary["recovery"] = {k: recovery[k] for k in ("stage", "data", "synthesis") if recovery.get(k)}
        if "local" in recovery:
            local = recovery["local"]
            summary["recovery"]["local"] = {k: local[k] for k in ("seconds", "train_tokens", "mean_held_out_error_before",
                                                                  "mean_held_out_error_after")}
            summary["recovery"]["local"]["steps_per_layer"] = [layer["steps"] for layer in local["layers"]]
        if "global" in recovery:
            summary["recovery"]["global"] = {k: recovery["global"][k] for k in ("tokens_seen", "seconds", "tokens_per_s")}
    summary["samples"] = [{"prompt": p, **{k: run["outputs"][i]["text"] for k, run in runs.items()}}
                          for i, p in enumerate(opts.prompts[: len(runs["original"]["outputs"])])]
    summary["stage_seconds"] = timings
    summary["notes"] = [
        f"Perplexity is measured on {held_out_name}, which calibration and recovery never saw.",
    ]
    if summary["engine_dtype"] != opts.dtype:
        summary["notes"].append(
            f"The vLLM engines (the teacher's chats too) computed in {summary['engine_dtype']} ({opts.dtype} "
            f"checkpoints): this machine has no native {opts.dtype}, which vLLM emulates several times slower. Each "
            "engine got "
            f"{summary['engine_kv_cache_memory_bytes'] >> 20} MiB of KV cache, the tokens "
            f"{opts.kv_cache_memory_bytes >> 20} MiB hold in {opts.dtype}.")
    if "recovered" not in summary:
        summary["notes"].append("No recovery was run (--no-recover): the converted model's cost is the cost before "
                                "the method's fine-tune.")
    for key in ("converted", "recovered"):
        if key in summary and summary[key]["non_empty_answers"] < len(summary["samples"]):
            summary["notes"].append(
                f"Empty {dict(SIDES)[key]} samples ended at once with the end-of-turn token: chat behaviour is the "
                "first casualty of conversion; recovery (more of it with --finetune-tokens on a GPU) brings it back.")
    summary["notes"] += report["notes"]
    return summary


def print_summary(console: Console, summary: dict, out_dir: Path) -> None:
    keys = [k for k, _ in SIDES if k in summary]
    table = Table(title=f"{summary['model_name']} in vLLM {summary['vllm_version']} ({summary['device']})")
    table.add_column("")
    for k, label in SIDES:
        if k in summary:
            table.add_column(label, justify="right")
    table.add_row("cached values / token / layer", *[str(summary[k]["kv_values_per_token_per_layer"]) for k in keys])
    table.add_row("vLLM KV capacity (tokens)", *[f"{summary[k]['kv_cache_tokens']:,}" for k in keys])
    table.add_row("held-out perplexity", *[f"{summary[k]['perplexity']:.2f}" for k in keys])
    table.add_row("output tokens / s", *[f"{summary[k]['output_tokens_per_s']:.1f}" for k in keys])
    table.add_row("non-empty chat answers", *[str(summary[k]["non_empty_answers"]) for k in keys])
    table.add_row("answers starting like the original's", *[str(summary[k]["agrees_with_original"]) for k in keys])
    console.print(table)
    closed = summary["ratios"].get("perplexity_gap_closed_pct")
    if closed is not None:
        console.print(f"recovery closed [bold]{closed:.1f}%[/] of the perplexity gap to the original")
    for s in summary["samples"][:3]:
        console.print(f"[bold]{s['prompt']}[/]")
        for k, label in SIDES:
            if k in s:
                console.print(f"  {label}: {s[k].strip()[:120]!r}")
    for note in summary["notes"]:
        console.print(f"[yellow]note[/]: {note}")
    console.print(f"results in {out_dir} (summary.json, summary.md, chart.png)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="local Llama-family folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--out", type=Path, default=Path("results/demo"), help="results root (default results/demo)")
    p.add_argument("--rope-dim", type=int, default=32, help="rotary dims kept per head (default 32)")
    p.add_argument("--d-kv", type=int, default=32, help="latent dims per kv-head (default 32)")
    p.add_argument("--svd", default="aw-joint", choices=["joint", "split", "aw-joint"])
    p.add_argument("--text", type=Path,
                   help="text file for calibration, recovery and held-out perplexity (default: the English corpus)")
    p.add_argument("--ppl-tokens", type=int, default=8192)
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--no-recover", dest="recover", action="store_false", help="skip the recovery stage")
    p.add_argument("--local-steps", type=int, default=8, help="Adam steps per layer of the local stage (default 8)")
    p.add_argument("--local-seconds", type=float, default=None,
                   help="optional time cap of the local stage (off: results then do not depend on machine load)")
    p.add_argument("--finetune-tokens", type=int, default=DemoOptions.finetune_tokens,
                   help=f"tokens of the global stage after the local one (KD, attention; default "
                        f"{DemoOptions.finetune_tokens:,}; 0: the local stage only)")
    p.add_argument("--synthesize", type=int, default=DemoOptions.synthesize,
                   help=f"tokens of teacher chat conversations sampled in vLLM for the recovery (default "
                        f"{DemoOptions.synthesize:,}; 0: corpus only)")


def main_from_args(args: argparse.Namespace) -> int:
    opts = DemoOptions(model=args.model, out_dir=args.out, rope_dim=args.rope_dim, d_kv=args.d_kv, svd=args.svd,
                       text=args.text, ppl_tokens=args.ppl_tokens, calib_tokens=args.calib_tokens,
                       max_tokens=args.max_tokens, recover=args.recover, local_steps=args.local_steps,
                       local_seconds=args.local_seconds,
                       finetune_tokens=args.finetune_tokens, synthesize=args.synthesize)
    try:
        run_demo(opts)
    except ConversionError as exc:
        Console(stderr=True).print(f"mha2mla demo: error: {exc}")
        return 2
    return 0

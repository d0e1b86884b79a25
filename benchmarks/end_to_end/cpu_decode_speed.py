"""CPU decode speed: a converted MHA2MLA checkpoint against its MHA/GQA original, in vLLM. Why: on a CPU
the converted model decodes through the plugin's own kernel while the original uses vLLM's C++ CPU
attention; half the cached values should make decode no slower, and faster at long contexts.

Both models run as real vLLM engines (bf16, the project's CPU defaults: compiled, in-process engine core), each in
its own child process, side by side in one run. For every context length and batch size, each engine gets the same
``batch`` prompts of ``context`` random token ids (prefix caching off, so every request has its own cache rows),
runs the prefill (not timed) and then decodes in timed windows of ``--window`` steps, EOS ignored. The engines'
windows alternate (original, converted, then converted, original, ...), so load on the shared CPU hits all alike;
decode tokens/s of a model is its median window (tokens produced / seconds), and its ratio to the original is the
median over window pairs; the ratio of the two fastest windows (what each does when nothing else runs) and the
1-minute load average at every window are recorded too. ``--torch-decode`` adds a third engine: the converted model with the plugin's PyTorch
decode (``MHA2MLA_CPU_DECODE=torch``), what served it before the compiled kernel.
Only engine steps where every request of the batch decodes are timed (the engine is stepped directly:
``LLMEngine.add_request`` / ``step``), so prefill never leaks into the figure.

Usage:
    python -m benchmarks.end_to_end.cpu_decode_speed [--original DIR] [--converted DIR]
        [--contexts 256,512,1024,2048,4096] [--batches 16] [--window 16] [--windows 5]
        [--out benchmarks/results/YYYY-MM-DD-cpu-decode] [--eager] [--torch-decode]

Without ``--converted`` the original is converted the way ``mha2mla demo`` does (2-norm rope_dim 32, aw-joint
d_kv 32: 192 cached values per token per layer) into ``~/.cache/mha2mla/bench/<name>-192``. Writes
``results.json`` (every window, the command, versions), ``table.md`` and ``decode_speed.png`` under ``--out``
(default: a new folder named as benchmarks/README.md says, today's date first).
Results: benchmarks/README.md lists the folders this script wrote.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_ORIGINAL = Path.home() / ".cache/mha2mla/models/SmolLM2-135M-Instruct"
DEMO_CONVERT = ["--rope-dim", "32", "--d-kv", "32", "--strategy", "2-norm", "--svd", "aw-joint",
                "--dtype", "bfloat16"]


# ---------------------------------------------------------------------------------------------- child side
def _worker(conn, model: str, engine_kwargs: dict, env: dict) -> None:
    """One vLLM engine; answers commands from the parent over ``conn`` until told to stop."""
    os.environ.update(env)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process: step() is synchronous
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # (spawn gives this child the parent's sys.path)
    try:
        from vllm import LLM, SamplingParams

        from vllm_mha2mla.tools.runner import backend_names

        t0 = time.perf_counter()
        llm = LLM(model=model, **engine_kwargs)
        engine = llm.llm_engine
        info = {"init_seconds": time.perf_counter() - t0,
                "kv_cache_tokens": engine.vllm_config.cache_config.num_gpu_blocks * engine.vllm_config.cache_config.block_size,
                "block_size": engine.vllm_config.cache_config.block_size}
        try:
            info["attention_backends"] = sorted(set(sum(llm.apply_model(backend_names), [])))
        except Exception as exc:  # pragma: no cover - informational only
            info["attention_backends"] = [f"unknown ({type(exc).__name__})"]
        conn.send(("ready", info))
    except Exception as exc:  # report, don't hang the parent
        import traceback

        conn.send(("error", traceback.format_exc() + str(exc)))
        return

    lengths: dict[str, int] = {}
    counter = 0

    def step_counting() -> int:
        produced = 0
        for out in engine.step():
            n = len(out.outputs[0].token_ids) if out.outputs else 0
            produced += n - lengths.get(out.request_id, 0)
            lengths[out.request_id] = n
        return produced

    while True:
        cmd, arg = conn.recv()
        if cmd == "stop":
            conn.send(("ok", None))
            return
        if cmd == "prefill":  # arg: list of prompts (token ids), max_tokens
            prompts, max_tokens = arg
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
            lengths.clear()
            t0 = time.perf_counter()
            for ids in prompts:
                counter += 1
                engine.add_request(f"r{counter}", {"prompt_token_ids": ids}, params)
                lengths[f"r{counter}"] = 0
            steps = 0
            while min(lengths.values()) == 0:  # until every request has its first token: all decode from here
                step_counting()
                steps += 1
            conn.send(("ok", {"seconds": time.perf_counter() - t0, "steps": steps}))
        elif cmd == "decode":  # arg: steps
            t0 = time.perf_counter()
            produced = sum(step_counting() for _ in range(arg))
            conn.send(("ok", {"seconds": time.perf_counter() - t0, "tokens": produced,
                              "min_len": min(lengths.values()), "max_len": max(lengths.values())}))
        elif cmd == "abort":
            engine.abort_request(list(lengths))
            while engine.has_unfinished_requests():
                engine.step()
            lengths.clear()
            conn.send(("ok", None))


class Engine:
    def __init__(self, label: str, model: Path, engine_kwargs: dict, env: dict | None = None):
        ctx = mp.get_context("spawn")
        self.label = label
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, str(model), engine_kwargs, env or {}), daemon=True)
        self.proc.start()
        status, self.info = self.conn.recv()
        if status != "ready":
            raise RuntimeError(f"{label} engine failed to start:\n{self.info}")

    def call(self, cmd: str, arg=None):
        self.conn.send((cmd, arg))
        status, result = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"{self.label}: {result}")
        return result

    def close(self) -> None:
        try:
            self.call("stop")
        finally:
            self.proc.join(timeout=60)


# --------------------------------------------------------------------------------------------- parent side
def ensure_converted(original: Path, converted: Path | None) -> Path:
    if converted is not None:
        return converted
    target = Path.home() / ".cache/mha2mla/bench" / f"{original.name}-192"
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        cmd = [str(Path(sys.executable).with_name("mha2mla")), "convert", str(original), str(target), *DEMO_CONVERT]
        print("converting:", shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return target


def random_prompts(batch: int, context: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(context)] for _ in range(batch)]


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    batches = sorted({r["batch"] for r in results["points"]})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for batch in batches:
        pts = sorted((r for r in results["points"] if r["batch"] == batch), key=lambda r: r["context"])
        ctx = [p["context"] for p in pts]
        for label, style, color in (("original", "o-", "C0"), ("converted", "s-", "C1"),
                                    ("converted_torch_decode", "x--", "C2")):
            if label in pts[0]:
                shade = dict(color=color, alpha=1.0 if batch == max(batches) else 0.5)
                axes[0].plot(ctx, [p[label]["tokens_per_s"] for p in pts], style, **shade,
                             label=f"{label.replace('_', ' ')}, batch {batch}")
                if label != "original":
                    axes[1].plot(ctx, [p[label]["ratio"] for p in pts], style, **shade,
                                 label=f"{label.replace('_', ' ')}, batch {batch}")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (prompt tokens)")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("decode tokens / s")
    axes[0].set_title("vLLM decode on the CPU")
    axes[1].axhline(1.0, color="gray", lw=1)
    axes[1].set_ylabel("converted / original")
    axes[1].set_title("ratio (median of paired windows)")
    fig.suptitle(results["title"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def table(results: dict) -> str:
    torch_decode = any("converted_torch_decode" in p for p in results["points"])
    head = "| batch | context | original tok/s | converted tok/s | converted / original | fastest windows' ratio |"
    rule = "|---|---|---|---|---|---|"
    if torch_decode:
        head += " converted, PyTorch decode: tok/s | / original |"
        rule += "---|---|"
    lines = [head, rule]
    for p in results["points"]:
        line = (f"| {p['batch']} | {p['context']:,} | {p['original']['tokens_per_s']:.1f} | "
                f"{p['converted']['tokens_per_s']:.1f} | **{p['ratio']:.2f}×** | {p['converted']['best_ratio']:.2f}× |")
        if torch_decode:
            t = p["converted_torch_decode"]
            line += f" {t['tokens_per_s']:.1f} | {t['ratio']:.2f}× |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--original", type=Path, default=DEFAULT_ORIGINAL)
    ap.add_argument("--converted", type=Path, default=None)
    ap.add_argument("--contexts", default="256,512,1024,2048,4096")
    ap.add_argument("--batches", default="16")
    ap.add_argument("--window", type=int, default=16, help="decode steps per timed window")
    ap.add_argument("--windows", type=int, default=5, help="timed windows per model and point")
    ap.add_argument("--kv-cache-gib", type=float, default=None,
                    help="KV cache memory per engine (default: enough for the largest batch × context)")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (default: compiled, as the demo)")
    ap.add_argument("--torch-decode", action="store_true",
                    help="a third engine: the converted model with the plugin's PyTorch decode (MHA2MLA_CPU_DECODE=torch)")
    ap.add_argument("--out", type=Path, default=REPO / f"benchmarks/results/{date.today().isoformat()}-cpu-decode")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    original = args.original.expanduser()
    converted = ensure_converted(original, args.converted.expanduser() if args.converted else None)
    decode_tokens = args.window * (args.windows + 1) + 8  # one untimed warm-up window per point
    max_len = max(contexts) + decode_tokens + 16
    bytes_per_token = 30 * 384 * 2  # the original's (the larger); both get the same memory
    try:
        cfg = json.loads((original / "config.json").read_text())
        bytes_per_token = cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * (
            cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]) * 2
        vocab = cfg["vocab_size"]
    except (OSError, KeyError):
        vocab = 32000
    kv_bytes = int(args.kv_cache_gib * 2**30) if args.kv_cache_gib else int(
        max(batches) * (max_len + 128) * bytes_per_token * 1.1)
    engine_kwargs = dict(dtype="bfloat16", max_model_len=max_len, kv_cache_memory_bytes=kv_bytes,
                         enable_prefix_caching=False, enforce_eager=args.eager, max_num_seqs=max(max(batches), 16),
                         seed=args.seed)
    command = "python -m benchmarks.end_to_end.cpu_decode_speed " + shlex.join(argv if argv is not None else sys.argv[1:])
    print(f"original {original}\nconverted {converted}\nengine {engine_kwargs}", flush=True)

    engines = {"original": Engine("original", original, engine_kwargs)}
    engines["converted"] = Engine("converted", converted, engine_kwargs)
    if args.torch_decode:
        engines["converted_torch_decode"] = Engine("converted_torch_decode", converted, engine_kwargs,
                                                   {"MHA2MLA_CPU_DECODE": "torch"})
    for label, eng in engines.items():
        print(f"{label}: {eng.info}", flush=True)

    import torch
    import vllm

    results = {
        "command": command, "original": str(original), "converted": str(converted), "engine": engine_kwargs,
        "window": args.window, "windows": args.windows,
        "engines": {k: e.info for k, e in engines.items()},
        "vllm": vllm.__version__, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "points": [],
        "title": f"{original.name}: original (GQA, 384 cached values/token/layer) vs converted "
                 f"({converted.name}); vLLM {vllm.__version__}, {os.cpu_count()} CPU cores, bf16",
    }
    order = list(engines)
    try:
        for batch in batches:
            for context in contexts:
                prompts = random_prompts(batch, context, vocab, args.seed + context + 7919 * batch)
                point = {"batch": batch, "context": context}
                for label in order:
                    pre = engines[label].call("prefill", (prompts, decode_tokens))
                    engines[label].call("decode", args.window)  # warm-up window, not counted
                    point[label] = {"prefill_seconds": pre["seconds"], "windows": []}
                for w in range(args.windows):  # the order rotates: every engine runs first, second, ...
                    for label in order[w % len(order):] + order[: w % len(order)]:
                        window = engines[label].call("decode", args.window)
                        window["load_1min"] = os.getloadavg()[0]  # this run's engine counts ~2 on 2 cores
                        point[label]["windows"].append(window)
                for label in order:
                    engines[label].call("abort")
                    ws = point[label]["windows"]
                    point[label]["tokens_per_s"] = statistics.median(x["tokens"] / x["seconds"] for x in ws)
                    point[label]["step_ms"] = statistics.median(1e3 * x["seconds"] / args.window for x in ws)
                    point[label]["best_tokens_per_s"] = max(x["tokens"] / x["seconds"] for x in ws)
                for label in order[1:]:  # ratio to the original, window by window (same stretch of CPU time)
                    pairs = zip(point["original"]["windows"], point[label]["windows"])
                    point[label]["ratio"] = statistics.median(
                        (c["tokens"] / c["seconds"]) / (o["tokens"] / o["seconds"]) for o, c in pairs)
                    # fastest window over fastest window: what each does when nothing else runs
                    point[label]["best_ratio"] = point[label]["best_tokens_per_s"] / point["original"]["best_tokens_per_s"]
                point["ratio"] = point["converted"]["ratio"]
                results["points"].append(point)
                print(f"batch {batch:3d} context {context:6d}: " + ", ".join(
                    f"{label} {point[label]['tokens_per_s']:.1f} tok/s" for label in order)
                    + f"; converted / original {point['ratio']:.2f}", flush=True)
    finally:
        for eng in engines.values():
            eng.close()

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    md = table(results)
    (args.out / "table.md").write_text(f"Command: `{command}`\n\n{md}\n")
    print(md)
    if not plot(results, args.out / "decode_speed.png"):
        print("matplotlib missing: no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())

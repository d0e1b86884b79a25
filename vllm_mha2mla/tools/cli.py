"""The ``mha2mla`` command: ``convert`` and ``finetune`` (from ``conversion.cli``, which needs
no vLLM), ``eval`` (quality on vLLM engines, optionally on Ray replicas), ``bench`` (speed
against the MHA original with vLLM's own benchmark tools) and ``demo``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from conversion.cli import add_commands, run_command
from conversion.errors import ConversionError
from vllm_mha2mla.tools.bench import BenchError, BenchOptions, run_bench, write_report
from vllm_mha2mla.tools.bench.run import DEFAULT_RUNS, DEFAULT_WORKLOADS
from vllm_mha2mla.tools.bench.shapes import MIN_SERVE_PROMPTS, SERVE_PROMPTS, SHAPES
from vllm_mha2mla.tools.demo import add_arguments, main_from_args
from vllm_mha2mla.tools.evaluation import EvaluationError
from vllm_mha2mla.tools.evaluation.evaluate import DEFAULT_KV_CACHE_GIB, EvalOptions, evaluate
from vllm_mha2mla.tools.evaluation.tasks import GROUPS, TASKS


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    d = EvalOptions()
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="model folders (an MHA original or a converted checkpoint), LABEL=PATH to name one; the "
                        "first is the reference in the table (none: merge the --baseline runs)")
    p.add_argument("--tasks", default=d.tasks,
                   help=f"comma-separated: {', '.join(TASKS)}; groups {', '.join(GROUPS)}; or FILE.jsonl "
                        "({\"context\", \"choices\", \"label\"} per line) / FILE.txt (perplexity) (default all)")
    p.add_argument("--output", type=Path, required=True, help="folder for results.json, results.md, results.png")
    p.add_argument("--limit", type=int, help="items per task (documents for perplexity) for quick runs")
    p.add_argument("--baseline", type=Path, action="append", default=[],
                   help="an earlier run's --output folder (repeatable): its models join the table without running "
                        "again, the first one's first model stays the agreement reference (same tasks, --limit, "
                        "--seed, … required); with no MODEL the runs are merged into one table")
    p.add_argument("--replicas", type=int,
                   help="run N vLLM engines as Ray actors and shard the requests across them (GPU: one engine "
                        "per GPU × --tensor-parallel-size; CPU: cores and KV memory split); without it, one "
                        "engine and no Ray")
    p.add_argument("--ray-address", help="join an existing Ray cluster (`ray start --head` …) instead of a local one")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per replica")
    p.add_argument("--dtype", default=d.dtype, help="model dtype in vLLM (auto, bfloat16, float32, …)")
    p.add_argument("--max-model-len", type=int,
                   help="engine context (default: the longest long-context length asked for, else 2048)")
    p.add_argument("--kv-cache-gib", type=float,
                   help=f"CPU: KV-cache memory per node, split between its replicas (default {DEFAULT_KV_CACHE_GIB:g})")
    p.add_argument("--gpu-memory-utilization", type=float, help="GPU: vLLM's memory share per engine")
    p.add_argument("--per-cell", type=int, default=d.per_cell,
                   help="long context: prompts per (length, depth) cell (default 10)")
    p.add_argument("--ppl-window", type=int, default=d.ppl_window, help="perplexity: tokens scored per window")
    p.add_argument("--chunk-size", type=int, default=d.chunk_size, help="requests per engine call")
    p.add_argument("--lengths", help="long context: prompt lengths in tokens, comma-separated (default "
                                     "1024,2048,4096,8192)")
    compile_ = p.add_mutually_exclusive_group()
    compile_.add_argument("--enforce-eager", action="store_true", default=None,
                          help="no CUDA graphs / torch.compile (the default on the CPU)")
    compile_.add_argument("--compile", dest="enforce_eager", action="store_false",
                          help="CUDA graphs / torch.compile (the default on GPUs)")
    p.add_argument("--seed", type=int, default=d.seed)


def _lengths(spec: str | None) -> tuple[int, ...] | None:
    if spec is None:
        return None
    try:
        lengths = tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise EvaluationError(f"--lengths {spec!r}: expected comma-separated token counts") from None
    if not lengths or min(lengths) < 64:
        raise EvaluationError(f"--lengths {spec!r}: every length must be at least 64 tokens")
    return lengths


def _run_eval(args: argparse.Namespace) -> int:
    try:
        options = EvalOptions(
            tasks=args.tasks, limit=args.limit, replicas=args.replicas, ray_address=args.ray_address,
            tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype, max_model_len=args.max_model_len,
            kv_cache_gib=args.kv_cache_gib, gpu_memory_utilization=args.gpu_memory_utilization,
            chunk_size=args.chunk_size, ppl_window=args.ppl_window, per_cell=args.per_cell, seed=args.seed,
            enforce_eager=args.enforce_eager, lengths=_lengths(args.lengths),
        )
        evaluate(args.models, args.output, options, args.baseline)
    except EvaluationError as exc:
        print(f"mha2mla: error: {exc}", file=sys.stderr)
        return 2
    print((args.output / "results.md").read_text())
    print(f"wrote {args.output}/results.json, results.md, results.png")
    return 0


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    d = BenchOptions()
    p.add_argument("runs", nargs="*", metavar="SHAPE:VARIANTS",
                   help=f"a shape ({', '.join(SHAPES)}: dummy weights; or a model folder: its own weights) and the "
                        "variants to run on it, comma-separated: mha (the original), native (vLLM's 576-value MLA "
                        "row), rR-dD (exact layout, rope_dim R, d_kv D), cutP (exact layout caching P%% fewer values), "
                        f"each optionally @BACKEND (default: {' '.join(DEFAULT_RUNS)})")
    p.add_argument("--output", type=Path, required=True,
                   help="folder for summary.json (rows merge with an earlier run's), summary.md, plots, logs/, raw/")
    p.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                   help="comma-separated IN/OUT token counts, K suffix allowed; '' for serving runs only "
                        "(default %(default)s)")
    p.add_argument("--kv-cache-dtype", default="auto",
                   help="comma-separated KV cache dtypes: auto, fp8, int4_per_token_head (the plugin's 4-bit latent, "
                        "CPU backend; its rows report their true bytes) (default auto)")
    p.add_argument("--dtype", default=d.dtype, choices=["bfloat16", "float16", "float32"],
                   help="the engines' model dtype, the same for every variant (default %(default)s; float32 on CPUs "
                        "without native bf16, where bf16 is emulated and several times slower)")
    p.add_argument("--num-prompts", type=int,
                   help="prompts per throughput run (default: twice what each model's KV cache holds at once)")
    p.add_argument("--gpus", help="comma-separated GPU indices to spread runs over, one run per GPU (default all)")
    p.add_argument("--serve-rates", default="",
                   help="comma-separated request rates (req/s) for `vllm serve` + `vllm bench serve` (default: none)")
    p.add_argument("--serve-workload", default=d.serve_workload, help="IN/OUT tokens of serving requests")
    p.add_argument("--serve-prompts", type=int, help=f"requests per serving rate (default {SERVE_PROMPTS})")
    p.add_argument("--serve-seconds", type=float,
                   help="instead: each rate sends as many requests as arrive in this many seconds "
                        f"(at least {MIN_SERVE_PROMPTS})")
    p.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    p.add_argument("--cpu-kv-cache-gib", type=float, default=d.cpu_kv_cache_gib, help="CPU: KV cache per engine")
    p.add_argument("--enforce-eager", action="store_true", default=None,
                   help="no CUDA graphs / torch.compile (the default on the CPU)")
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds per tool run")
    p.add_argument("--workdir", type=Path, help="where model folders are written (default ~/.cache/mha2mla/bench)")
    p.add_argument("--report-only", action="store_true",
                   help="only regenerate summary.md and the plots from OUTPUT/summary.json")


def _run_bench(args: argparse.Namespace) -> int:
    def floats(text: str) -> list[float]:
        try:
            return [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise BenchError(f"--serve-rates {text!r}: expected comma-separated numbers") from None

    try:
        if args.report_only:
            if not (args.output / "summary.json").is_file():
                raise BenchError(f"{args.output / 'summary.json'} does not exist")
            write_report(args.output)
        else:
            options = BenchOptions(
                workloads=[w for w in args.workloads.split(",") if w.strip()],
                kv_cache_dtypes=[k.strip() for k in args.kv_cache_dtype.split(",") if k.strip()], dtype=args.dtype,
                num_prompts=args.num_prompts, gpus=args.gpus.split(",") if args.gpus else None,
                serve_rates=floats(args.serve_rates), serve_workload=args.serve_workload,
                serve_prompts=args.serve_prompts, serve_seconds=args.serve_seconds,
                gpu_memory_utilization=args.gpu_memory_utilization,
                cpu_kv_cache_gib=args.cpu_kv_cache_gib, enforce_eager=args.enforce_eager, timeout_s=args.timeout,
                workdir=args.workdir)
            if args.runs:
                options.runs = args.runs
            run_bench(options, args.output, stop_on_signals=True)  # this process owns its signals
    except (BenchError, ConversionError) as exc:
        print(f"mha2mla: error: {exc}", file=sys.stderr)
        return 2
    print((args.output / "summary.md").read_text())
    print(f"wrote {args.output}/summary.json, summary.md and plots")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mha2mla", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub)
    _add_eval_args(sub.add_parser("eval", help="score models on standard tasks in vLLM (Ray for several engines)"))
    _add_bench_args(sub.add_parser("bench", help="throughput and serving latency against the MHA original, with "
                                                 "vLLM's own benchmark tools"))
    add_arguments(sub.add_parser("demo", help="convert a real model and compare it with the original in vLLM"))
    args = parser.parse_args(argv)
    if args.command == "demo":
        return main_from_args(args)
    if args.command == "eval":
        return _run_eval(args)
    if args.command == "bench":
        return _run_bench(args)
    from vllm_mha2mla.tools.synthesize import vllm_engine_hooks

    return run_command(args, engine_hooks=vllm_engine_hooks)


if __name__ == "__main__":
    sys.exit(main())

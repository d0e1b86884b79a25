"""The ``mha2mla`` command: ``convert`` and ``finetune`` (from ``conversion.cli``, which needs
no vLLM), ``eval`` (quality on vLLM engines, optionally on Ray replicas) and ``demo``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from conversion.cli import add_commands, run_command


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    from vllm_mha2mla.evaluation.evaluate import DEFAULT_KV_CACHE_GIB, EvalOptions
    from vllm_mha2mla.evaluation.tasks import GROUPS, TASKS

    d = EvalOptions()
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="model folders (an MHA original or a converted checkpoint), LABEL=PATH to name one; the "
                        "first is the reference in the table")
    p.add_argument("--tasks", default=d.tasks,
                   help=f"comma-separated: {', '.join(TASKS)}; groups {', '.join(GROUPS)}; or FILE.jsonl "
                        "({\"context\", \"choices\", \"label\"} per line) / FILE.txt (perplexity) (default all)")
    p.add_argument("--output", type=Path, required=True, help="folder for results.json, results.md, results.png")
    p.add_argument("--limit", type=int, help="items per task (documents for perplexity) for quick runs")
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
    from vllm_mha2mla.evaluation import EvaluationError

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
    from vllm_mha2mla.evaluation import EvaluationError
    from vllm_mha2mla.evaluation.evaluate import EvalOptions, evaluate

    try:
        options = EvalOptions(
            tasks=args.tasks, limit=args.limit, replicas=args.replicas, ray_address=args.ray_address,
            tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype, max_model_len=args.max_model_len,
            kv_cache_gib=args.kv_cache_gib, gpu_memory_utilization=args.gpu_memory_utilization,
            chunk_size=args.chunk_size, ppl_window=args.ppl_window, per_cell=args.per_cell, seed=args.seed,
            enforce_eager=args.enforce_eager, lengths=_lengths(args.lengths),
        )
        evaluate(args.models, args.output, options)
    except EvaluationError as exc:
        print(f"mha2mla: error: {exc}", file=sys.stderr)
        return 2
    print((args.output / "results.md").read_text())
    print(f"wrote {args.output}/results.json, results.md, results.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mha2mla", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub)
    _add_eval_args(sub.add_parser("eval", help="score models on standard tasks in vLLM (Ray for several engines)"))
    from vllm_mha2mla.demo import add_arguments

    add_arguments(sub.add_parser("demo", help="convert a real model and compare it with the original in vLLM"))
    args = parser.parse_args(argv)
    if args.command == "demo":
        from vllm_mha2mla.demo import main_from_args

        return main_from_args(args)
    if args.command == "eval":
        return _run_eval(args)
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())

"""``mha2mla eval``: every model through every task on vLLM engines, models side by side.

Each model gets its engines once (one child process, or N Ray replicas) and serves every
task's requests in one stream with one progress bar; then the engines are shut down before
the next model starts. Results are written only when every model finished — a run that
fails leaves no partial results.

The first model is the reference of the ``agreement`` task: its answers are kept
(``references``) and every later model's answers are scored against them.

``baseline``: an earlier run's output folder whose models join this run's table without running
again (its first model stays the reference). An original is scored once and each new checkpoint
against it later, or several checkpoints in parallel processes on one GPU, each against the same
stored reference; the settings that define the tasks' items must match, or the numbers would
not be comparable.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from conversion.recovery.data import tokenizer_identity
from vllm_mha2mla.tools.evaluation import EvaluationError
from vllm_mha2mla.tools.evaluation.executor import start_executor, timed_run
from vllm_mha2mla.tools.evaluation.report import write_reports
from vllm_mha2mla.tools.evaluation.tasks import Prepared, Settings, Task, Tokenizer, resolve_tasks

DEFAULT_KV_CACHE_GIB = 4.0


@dataclass(frozen=True)
class EvalOptions:
    tasks: str = "all"
    limit: int | None = None
    replicas: int | None = None
    """None: one engine in a child process, Ray never imported."""
    ray_address: str | None = None
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    max_model_len: int | None = None
    """Default: the longest long-context length asked for (else 2048), capped by the model's."""
    kv_cache_gib: float | None = None
    """CPU: KV-cache memory per node (split between its replicas); default 4 GiB. GPU: unused."""
    gpu_memory_utilization: float | None = None
    chunk_size: int = 256
    ppl_window: int = 2048
    per_cell: int = 10
    seed: int = 0
    enforce_eager: bool | None = None
    """Default: eager on the CPU (compiling costs more than it saves on scoring), graphs on GPUs."""
    lengths: tuple[int, ...] | None = None
    """Long-context prompt lengths in tokens (default 1K, 2K, 4K, 8K)."""


@dataclass(frozen=True)
class ModelSpec:
    label: str
    path: Path


def parse_models(specs: list[str]) -> list[ModelSpec]:
    """``PATH`` or ``LABEL=PATH``; labels default to the folder name and must be distinct."""
    out: list[ModelSpec] = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        folder = Path(path if sep else spec)
        label = label if sep else folder.name
        if not (folder / "config.json").is_file():
            raise EvaluationError(f"{folder} is not a model folder (no config.json): pass an MHA original or a "
                                  "converted checkpoint")
        if any(m.label == label for m in out):
            raise EvaluationError(f"two models are labelled {label!r}: name them with LABEL=PATH")
        out.append(ModelSpec(label, folder))
    if not out:
        raise EvaluationError("no models given")
    return out


def _model_max_len(folder: Path) -> int:
    config = json.loads((folder / "config.json").read_text())
    return int(config.get("max_position_embeddings") or 2048)


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _engine_kwargs(options: EvalOptions, max_model_len: int) -> dict:
    kwargs: dict = {"dtype": options.dtype, "max_model_len": max_model_len, "seed": options.seed,
                    "tensor_parallel_size": options.tensor_parallel_size,
                    "enforce_eager": (not _on_gpu()) if options.enforce_eager is None else options.enforce_eager}
    if _on_gpu():
        if options.gpu_memory_utilization:
            kwargs["gpu_memory_utilization"] = options.gpu_memory_utilization
    else:
        kwargs["kv_cache_memory_bytes"] = int((options.kv_cache_gib or DEFAULT_KV_CACHE_GIB) * (1 << 30))
    return kwargs


def _settings(options: EvalOptions, tasks: list[Task], folder: Path) -> Settings:
    lengths = tuple(options.lengths or Settings().lengths)
    wants_long = any(t.kind == "long_context" for t in tasks)
    wanted = options.max_model_len or (max(lengths) if wants_long else 2048)
    return Settings(limit=options.limit, max_model_len=min(wanted, _model_max_len(folder)), lengths=lengths,
                    ppl_window=options.ppl_window, per_cell=options.per_cell, seed=options.seed)


def _prepare(tasks: list[Task], model: ModelSpec, settings: Settings, memo: dict) -> dict[str, Prepared]:
    """Each task's requests for this model's tokenizer; models with the same tokenizer and
    settings (an original and its conversions) share them instead of tokenizing again."""
    import hashlib

    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(model.path))
    except Exception as exc:
        raise EvaluationError(f"{model.path}: its tokenizer could not be loaded ({exc})") from exc
    key = (hashlib.sha256(tokenizer_identity(hf)).hexdigest(), settings)
    if key not in memo:
        tok = Tokenizer(hf)
        memo[key] = {task.name: task.prepare(tok, settings) for task in tasks}
    return memo[key]


def evaluate_model(model: ModelSpec, tasks: list[Task], options: EvalOptions, items_dir: Path | None,
                   memo: dict | None = None, references: dict[str, list[str]] | None = None) -> dict:
    """Scores one model on every task; returns its results and what its engines ran with.

    ``references``: the reference model's answers per ``agreement`` task; a task missing from
    it makes this model the reference (scored against itself, its answers stored there)."""
    references = {} if references is None else references
    kinds = {t.name: t.kind for t in tasks}
    settings = _settings(options, tasks, model.path)
    prepared = _prepare(tasks, model, settings, {} if memo is None else memo)
    requests = [r for p in prepared.values() for r in p.requests]
    executor = start_executor(str(model.path), _engine_kwargs(options, settings.max_model_len), options.replicas,
                              options.ray_address)
    try:
        with tqdm(total=len(requests), desc=f"{model.label}", unit="req", dynamic_ncols=True) as bar:
            results, seconds = timed_run(executor, requests, options.chunk_size, bar.update)
    finally:
        executor.close()
    per_task, at, items = {}, 0, 0
    for name, prep in prepared.items():
        answered = results[at:at + len(prep.requests)]
        if kinds[name] == "agreement":
            metrics, records = prep.score(answered, references.get(name))
            references.setdefault(name, [r["answer"] for r in records])
        else:
            metrics, records = prep.score(answered)
        at += len(prep.requests)
        items += metrics["n"]
        per_task[name] = {**metrics, "requests": len(prep.requests), "notes": prep.notes}
        if items_dir is not None:
            path = items_dir / model.label / f"{name}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
    prompt_tokens = sum(len(r.token_ids) for r in requests)
    return {
        "path": str(model.path), "tasks": per_task,
        "engine": {"replicas": executor.replicas, "num_replicas": len(executor.replicas),
                   "max_model_len": settings.max_model_len, "dtype": options.dtype},
        "throughput": {"seconds": seconds, "items": items, "requests": len(requests), "prompt_tokens": prompt_tokens,
                       "items_per_s": items / seconds, "requests_per_s": len(requests) / seconds,
                       "prompt_tokens_per_s": prompt_tokens / seconds,
                       "items_per_s_per_engine": items / seconds / len(executor.replicas)},
    }


ITEM_DEFINING_OPTIONS = ("limit", "max_model_len", "ppl_window", "per_cell", "seed", "lengths")
"""Options that change which items a task builds or how they are scored: a baseline must share them."""


@dataclass(frozen=True)
class Baseline:
    """An earlier run's models, results and agreement answers (see the module docstring)."""
    labels: list[str]
    results: dict
    references: dict[str, list[str]]
    items_dirs: dict[str, Path]
    """Per label: the ``items`` folder holding its per-item records."""


def load_baseline(folder: Path, tasks: list[Task], options: EvalOptions) -> Baseline:
    """The earlier run in ``folder``, checked against this run's tasks and item-defining options."""
    path = folder / "results.json"
    if not path.is_file():
        raise EvaluationError(f"--baseline {folder}: no results.json there (an `mha2mla eval --output` folder)")
    try:
        earlier = json.loads(path.read_text())
        labels, earlier_options = list(earlier["models"]), earlier["options"]
        results = {label: earlier["results"][label] for label in labels}
    except (ValueError, KeyError, TypeError) as exc:
        raise EvaluationError(f"--baseline {path}: not an `mha2mla eval` result ({exc!r})") from None
    for name in ITEM_DEFINING_OPTIONS:
        mine, theirs = asdict(options)[name], earlier_options.get(name)
        if (list(mine) if isinstance(mine, tuple) else mine) != theirs:
            raise EvaluationError(f"--baseline {folder}: it ran with {name}={theirs!r}, this run with {mine!r}; "
                                  "the tasks' items would differ")
    missing = [t.name for t in tasks if any(t.name not in results[label]["tasks"] for label in labels)]
    if missing:
        raise EvaluationError(f"--baseline {folder}: no results for {', '.join(missing)} there (it ran "
                              f"{', '.join(earlier['tasks'])})")
    references = {}
    for task in (t for t in tasks if t.kind == "agreement"):
        records = folder / "items" / labels[0] / f"{task.name}.jsonl"
        if not records.is_file():
            raise EvaluationError(f"--baseline {folder}: {records} (the reference's answers) is missing")
        references[task.name] = [json.loads(line)["answer"] for line in records.read_text().splitlines() if line]
    return Baseline(labels, results, references, {label: folder / "items" for label in labels})


def merge_baselines(folders: list[Path], tasks: list[Task], options: EvalOptions) -> Baseline | None:
    """Several earlier runs as one: models in order, a model in several of them (same label, same
    folder: the shared original) once. Their agreement scores are comparable only if they share
    the reference, so with ``agreement`` asked for every run must have the same first model."""
    merged: Baseline | None = None
    for folder in folders:
        earlier = load_baseline(folder, tasks, options)
        if merged is None:
            merged = earlier
            continue
        if earlier.references and earlier.labels[0] != merged.labels[0]:
            raise EvaluationError(f"--baseline {folder}: its agreement reference is {earlier.labels[0]}, the first "
                                  f"baseline's is {merged.labels[0]}")
        for label in earlier.labels:
            if label in merged.results:
                if merged.results[label]["path"] != earlier.results[label]["path"]:
                    raise EvaluationError(f"--baseline {folder}: {label} is another model there "
                                          f"({earlier.results[label]['path']}) than in an earlier baseline")
                continue
            merged.labels.append(label)
            merged.results[label] = earlier.results[label]
            merged.items_dirs[label] = earlier.items_dirs[label]
    return merged


def evaluate(model_specs: list[str], output: Path, options: EvalOptions,
             baselines: list[Path] | Path | None = None) -> dict:
    """Runs everything and writes ``output``/results.json, results.md, results.png (+ the
    long-context heat map and per-item records under ``items/``). With ``baselines`` and no new
    models, it merges earlier runs into one table."""
    folders = [baselines] if isinstance(baselines, Path) else list(baselines or [])
    models = parse_models(model_specs) if model_specs else []
    if not models and not folders:
        raise EvaluationError("no models to evaluate (give model folders, or --baseline runs to merge)")
    tasks = resolve_tasks(options.tasks)
    if options.limit is not None and options.limit < 1:
        raise EvaluationError("--limit must be at least 1")
    earlier = merge_baselines(folders, tasks, options)
    if earlier is not None:
        clash = sorted(set(earlier.labels) & {m.label for m in models})
        if clash:
            raise EvaluationError(f"--baseline already has {', '.join(clash)}: label the new models apart "
                                  "(LABEL=PATH)")
    output.mkdir(parents=True, exist_ok=True)
    staging = output / ".items.partial"
    memo: dict = {}
    references: dict[str, list[str]] = dict(earlier.references) if earlier else {}  # the first model's answers
    results = {}
    if earlier is not None:
        names = {t.name for t in tasks}
        for label in earlier.labels:
            kept = dict(earlier.results[label])
            results[label] = {**kept, "tasks": {k: v for k, v in kept["tasks"].items() if k in names}}
            for task in names:
                src = earlier.items_dirs[label] / label / f"{task}.jsonl"
                if src.is_file():
                    (staging / label).mkdir(parents=True, exist_ok=True)
                    (staging / label / src.name).write_bytes(src.read_bytes())
    results.update({m.label: evaluate_model(m, tasks, options, staging, memo, references) for m in models})
    labels = (earlier.labels if earlier else []) + [m.label for m in models]
    summary = {
        "models": labels,
        "tasks": {t.name: {"kind": t.kind, "metrics": list(t.metrics),
                           **({"reference": labels[0]} if t.kind == "agreement" else {})} for t in tasks},
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "results": results,
    }
    write_reports(summary, output)
    final = output / "items"
    if final.exists():
        import shutil

        shutil.rmtree(final)
    staging.rename(final)
    return summary

"""``mha2mla bench``: an MHA original and its conversions through vLLM's own benchmark tools,
on the same machine in the same run, written to ``summary.json`` with tables and plots.

Every (shape, variant, KV dtype, workload) is one ``vllm bench throughput`` process; every
(shape, variant, KV dtype) with serving rates is one ``vllm serve`` with a ``vllm bench serve``
per rate. With several GPUs, runs go to one GPU each, side by side (they share nothing but the
host); on the CPU they run one after another.
"""

from __future__ import annotations

import os
import platform
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vllm_mha2mla.tools.bench.folders import ModelFolder, prepare_original, prepare_variant
from vllm_mha2mla.tools.bench.shapes import (
    BenchError,
    Variant,
    auto_num_prompts,
    parse_variant,
    parse_workload,
    serve_num_prompts,
    weight_bytes,
)
from vllm_mha2mla.tools.bench.folders import low_bit_row_bytes
from vllm_mha2mla.tools.bench.summary import load_summary, markdown, plot, row_bytes, save_summary
from vllm_mha2mla.tools.bench.vllm_tools import (
    EngineSettings,
    Server,
    attention_backend,
    bench_serve_command,
    free_port,
    kv_capacity_tokens,
    phase_rates,
    prefill_backend,
    read_json,
    run_tool,
    serve_command,
    stop_tools_on_signals,
    stopping,
    throughput_command,
)

DEFAULT_RUNS = ("llama2-7b:mha,native,native@CUSTOM,r16-d16", "llama3-8b:mha,cut75")
DEFAULT_WORKLOADS = ("1024/256", "8192/1024")
ACTIVATION_RESERVE_GIB = 6.0
"""GPU memory an engine keeps outside weights and KV cache (activations, CUDA graphs) — only for
sizing the prompt count; vLLM measures the real figure."""


@dataclass
class BenchOptions:
    runs: list[str] = field(default_factory=lambda: list(DEFAULT_RUNS))
    """``SHAPE:VARIANT,VARIANT,…`` (SHAPE: a named shape or a model folder)."""
    workloads: list[str] = field(default_factory=lambda: list(DEFAULT_WORKLOADS))
    kv_cache_dtypes: list[str] = field(default_factory=lambda: ["auto"])
    dtype: str = "bfloat16"
    """The engines' model dtype (``--dtype``), the same for the original and its conversions. float32 on CPUs
    without native bf16 (no AVX512-BF16 / AMX), where vLLM emulates bf16 matmuls several times slower."""
    num_prompts: int | None = None
    """None: twice the sequences each model's KV cache holds at once (see ``auto_num_prompts``)."""
    gpus: list[str] | None = None
    """GPU indices to spread runs over (default: all); ignored on the CPU."""
    serve_rates: list[float] = field(default_factory=list)
    serve_workload: str = "1024/256"
    serve_prompts: int | None = None
    """Requests per serving rate (None: ``SERVE_PROMPTS``, or follow ``serve_seconds``)."""
    serve_seconds: float | None = None
    """Each rate sends as many requests as arrive in this many seconds (``serve_num_prompts``)."""
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gib: float = 2.0
    enforce_eager: bool | None = None
    """None: eager on the CPU, CUDA graphs + torch.compile on GPUs."""
    timeout_s: float = 1800.0
    workdir: Path | None = None


@dataclass(frozen=True)
class Model:
    shape: str
    variant: Variant
    folder: ModelFolder
    mha_config: dict


@dataclass(frozen=True)
class Machine:
    device: str
    vllm_version: str
    gpus: tuple[str, ...]
    memory_gib: float

    @property
    def on_cpu(self) -> bool:
        return not self.gpus


def _nvidia_smi(query: str) -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def detect_machine(options: BenchOptions) -> Machine:
    """The device and vLLM version every row records. GPUs are read through nvidia-smi, so this
    process holds no CUDA context that would take memory from the engines."""
    from vllm.version import __version__ as version

    names, memory = _nvidia_smi("name"), _nvidia_smi("memory.total")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    all_gpus = [g.strip() for g in visible.split(",") if g.strip()] if visible else [str(i) for i in range(len(names))]
    gpus = tuple(options.gpus if options.gpus else all_gpus)
    if gpus and names:
        return Machine(names[0], version, gpus, float(memory[0]) / 1024)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return Machine(f"CPU {cpu} ({os.cpu_count()} cores)", version, (), options.cpu_kv_cache_gib)


def parse_runs(runs: list[str]) -> list[tuple[str, list[str]]]:
    parsed = []
    for item in runs:
        shape, sep, variants = item.rpartition(":")
        if not sep or not shape or not variants.strip():
            raise BenchError(f"run {item!r}: expected SHAPE:VARIANT[,VARIANT…], e.g. llama2-7b:mha,native,r16-d16")
        parsed.append((shape, [v for v in variants.split(",") if v.strip()]))
    return parsed


def prepare_models(options: BenchOptions, workdir: Path, max_len: int) -> list[Model]:
    """Every (shape, variant) folder, checked before any engine starts."""
    models = []
    for shape, variant_specs in parse_runs(options.runs):
        original = prepare_original(shape, workdir, max_len)
        label = shape if not Path(shape).expanduser().is_dir() else Path(shape).expanduser().resolve().name
        for spec in variant_specs:
            variant = parse_variant(spec, original.config)
            models.append(Model(label, variant, prepare_variant(original, label, variant, workdir), original.config))
    return models


def _engine(model: Model, machine: Machine, options: BenchOptions, kv_dtype: str, max_len: int,
            max_num_seqs: int | None = None) -> EngineSettings:
    eager = options.enforce_eager if options.enforce_eager is not None else machine.on_cpu
    return EngineSettings(model.folder.path, model.folder.tokenizer, max_len, model.folder.dummy_weights, kv_dtype,
                          model.variant.attention_backend,
                          None if machine.on_cpu else options.gpu_memory_utilization, max_num_seqs, eager,
                          options.dtype)


def _env(machine: Machine, options: BenchOptions, gpu: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"  # real models past their trained window (speed only)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    else:
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{options.cpu_kv_cache_gib:g}"  # what the prompt count was sized for
    return env


def _kv_bytes(model: Model, machine: Machine, options: BenchOptions) -> float:
    if machine.on_cpu:
        return options.cpu_kv_cache_gib * 2**30
    free = machine.memory_gib * options.gpu_memory_utilization - ACTIVATION_RESERVE_GIB
    return max(free * 2**30 - weight_bytes(model.mha_config), 2**30)


def _base_row(model: Model, machine: Machine, options: BenchOptions, kv_dtype: str, input_len: int,
              output_len: int) -> dict:
    row = {"device": machine.device, "vllm_version": machine.vllm_version, "shape": model.shape,
           "variant": model.variant.name, "cache_values": model.variant.cache_values(model.mha_config),
           "dtype": options.dtype, "kv_cache_dtype": kv_dtype, "input_len": input_len, "output_len": output_len}
    low_bit = low_bit_row_bytes(model.folder.config, kv_dtype)
    if low_bit is not None:
        row["kv_bytes_per_token_layer"] = low_bit
    return row


def run_throughput(model: Model, machine: Machine, options: BenchOptions, kv_dtype: str, workload: tuple[int, int],
                   max_len: int, out: Path, gpu: str | None) -> dict:
    input_len, output_len = workload
    row = _base_row(model, machine, options, kv_dtype, input_len, output_len)
    layers = model.mha_config["num_hidden_layers"]
    bytes_per_token = row_bytes(row) * layers
    prompts = options.num_prompts or auto_num_prompts(_kv_bytes(model, machine, options), bytes_per_token,
                                                      input_len, output_len)
    tag = f"{model.shape}_{model.variant.name.replace('@', '-')}_{kv_dtype}_{input_len}-{output_len}"
    result_file = out / "raw" / f"throughput_{tag}.json"
    result_file.parent.mkdir(parents=True, exist_ok=True)
    engine = _engine(model, machine, options, kv_dtype, max_len)
    command = throughput_command(engine, input_len, output_len, prompts, result_file)
    run = run_tool(command, _env(machine, options, gpu), out / "logs" / f"throughput_{tag}.log", options.timeout_s)
    row.update(num_prompts=prompts, command=" ".join(["vllm", *command[3:]]), log=f"logs/throughput_{tag}.log",
               wall_s=round(run.seconds, 1),
               attention_backend=attention_backend(run.log, model.variant.attention_backend,
                                                   model.variant.is_original, machine.on_cpu),
               prefill_backend=prefill_backend(run.log), kv_capacity_tokens=kv_capacity_tokens(run.log),
               **phase_rates(run.log))
    if run.returncode != 0:
        row.update(error=run.failure(), output_tokens_per_s=None)
        return row
    result = read_json(result_file)
    row.update(output_tokens_per_s=result["num_requests"] * output_len / result["elapsed_time"],
               elapsed_s=result["elapsed_time"], requests_per_s=result["requests_per_second"])
    return row


SERVE_METRICS = ("completed", "failed", "duration", "request_throughput")


def serving_metrics(result: dict) -> dict:
    """The row fields of one ``vllm bench serve`` result file: counts, duration, output tokens/s
    and TTFT / TPOT / ITL at p50 and p99 (None where the tool left one out)."""
    row = {k: result.get(k) for k in SERVE_METRICS}
    row["output_tokens_per_s"] = result.get("output_throughput")
    for metric in ("ttft", "tpot", "itl"):
        for p in ("50", "99"):
            row[f"p{p}_{metric}_ms"] = result.get(f"p{p}_{metric}_ms")
    return row


def run_serving(model: Model, machine: Machine, options: BenchOptions, kv_dtype: str, max_len: int, out: Path,
                gpu: str | None, port: int, on_row: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """One ``vllm serve`` and a ``vllm bench serve`` per rate. ``on_row`` gets each rate's row as
    soon as it is measured: a run stopped at a slow rate (a time limit, a lost machine) keeps the
    rates before it (on the H100 a 4K/512 MHA server lost 8 req/s two minutes from the end, and
    with it the finished 4 req/s, when rows were written only after the last rate)."""
    input_len, output_len = parse_workload(options.serve_workload)
    tag = f"{model.shape}_{model.variant.name.replace('@', '-')}_{kv_dtype}"
    engine = _engine(model, machine, options, kv_dtype, max_len)
    env = _env(machine, options, gpu)
    rows = []
    base = _base_row(model, machine, options, kv_dtype, input_len, output_len)
    try:
        with Server(serve_command(engine, port), env, out / "logs" / f"serve_{tag}.log", port,
                    options.timeout_s) as server:
            log = server.log()  # the engine's start-up lines, written before it served: its backend and KV capacity
            engine_fields = dict(attention_backend=attention_backend(log, model.variant.attention_backend,
                                                                     model.variant.is_original, machine.on_cpu),
                                 kv_capacity_tokens=kv_capacity_tokens(log))
            for rate in options.serve_rates:
                name = f"serve_{tag}_{input_len}-{output_len}_rate{rate:g}.json"
                prompts = serve_num_prompts(rate, options.serve_prompts, options.serve_seconds)
                command = bench_serve_command(engine, port, input_len, output_len, prompts, rate,
                                              out / "raw", name)
                run = run_tool(command, env, out / "logs" / name.replace(".json", ".log"), options.timeout_s)
                row = dict(base, request_rate=rate, num_prompts=prompts,
                           command=" ".join(["vllm", *command[3:]]))
                try:
                    if run.returncode != 0:
                        raise BenchError(run.failure())
                    row.update(serving_metrics(read_json(out / "raw" / name)))
                except BenchError as exc:  # this rate failed; the server is up for the next one
                    row["error"] = str(exc)
                row.update(engine_fields)
                rows.append(row)
                on_row(row)
    except BenchError as exc:
        measured = {row["request_rate"] for row in rows}
        failed = [dict(base, request_rate=rate, error=str(exc)) for rate in options.serve_rates if rate not in measured]
        for row in failed:
            on_row(row)
        return rows + failed
    return rows


def _jobs(models: list[Model], options: BenchOptions) -> list[tuple]:
    """Every run, longest first (so parallel GPUs finish together): the original and long
    contexts before short ones."""
    workloads = [parse_workload(w) for w in options.workloads]
    jobs = [("throughput", m, kv, w) for m in models for kv in options.kv_cache_dtypes for w in workloads]
    jobs.sort(key=lambda j: (-(j[3][0] + 4 * j[3][1]), not j[1].variant.is_original))
    if options.serve_rates:
        jobs = [("serve", m, kv, None) for m in models for kv in options.kv_cache_dtypes] + jobs
    return jobs


def run_bench(options: BenchOptions, output: Path, show_progress: bool = True,
              stop_on_signals: bool = False) -> dict:
    """Runs the matrix; returns the summary (also written to ``output``). ``stop_on_signals``: once
    the model folders are written, SIGTERM / SIGINT / SIGHUP stop the running tools and exit the
    process (:func:`stop_tools_on_signals`; for a process that owns its signals, as the CLI does)."""
    from tqdm import tqdm

    output.mkdir(parents=True, exist_ok=True)
    workdir = options.workdir or Path(os.environ.get("MHA2MLA_CACHE", Path.home() / ".cache" / "mha2mla")) / "bench"
    for w in options.workloads:
        parse_workload(w)
    if not options.workloads and not options.serve_rates:
        raise BenchError("nothing to run: give --workloads for throughput runs or --serve-rates for serving runs")
    if any(r <= 0 for r in options.serve_rates):
        raise BenchError("--serve-rates: every rate must be a positive number of requests per second")
    for rate in options.serve_rates:  # bad counts or spans fail here, before any engine starts
        serve_num_prompts(rate, options.serve_prompts, options.serve_seconds)
    lengths = [sum(parse_workload(w)) for w in options.workloads]
    if options.serve_rates:
        lengths.append(sum(parse_workload(options.serve_workload)))
    max_len = max(lengths)
    machine = detect_machine(options)
    models = prepare_models(options, workdir, max_len)
    jobs: queue.Queue = queue.Queue()
    for job in _jobs(models, options):
        jobs.put(job)
    lock = threading.Lock()
    bar = tqdm(total=jobs.qsize(), desc="mha2mla bench", unit="run",
               disable=not (show_progress and sys.stderr.isatty()))  # each finished run prints a line anyway
    slots = list(machine.gpus) or [None]

    def worker(gpu: str | None) -> None:
        while True:
            try:
                kind, model, kv_dtype, workload = jobs.get_nowait()
            except queue.Empty:
                return
            start = time.time()

            def record(new: list[dict], new_serving: list[dict]) -> None:
                """Merge into summary.json now and print one line per row (none while the bench is
                being stopped: its tools fail then because they were stopped)."""
                with lock:
                    if stopping():
                        return
                    save_summary(output / "summary.json", new, new_serving)
                    for r in new + new_serving:
                        what = (f"{r['output_tokens_per_s']:,.0f} output tok/s" if r.get("output_tokens_per_s")
                                else "failed" if r.get("error") else "done")
                        tqdm.write(f"[{'cpu' if gpu is None else 'gpu ' + gpu}] {model.shape} {model.variant.name} "
                                  f"{kv_dtype} {r['input_len']}/{r['output_len']}"
                                  f"{' rate ' + format(r['request_rate'], 'g') if 'request_rate' in r else ''}: "
                                  f"{what} ({time.time() - start:.0f} s)")

            if kind == "throughput":
                record([run_throughput(model, machine, options, kv_dtype, workload, max_len, output, gpu)], [])
            else:
                run_serving(model, machine, options, kv_dtype, max_len, output, gpu, free_port(),
                            on_row=lambda row: record([], [row]))
            with lock:
                bar.update(1)

    if stop_on_signals:  # after prepare_models: a conversion interrupted there cleans up its partial folder
        stop_tools_on_signals()
    threads = [threading.Thread(target=worker, args=(gpu,), daemon=True) for gpu in slots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    return write_report(output)


def write_report(output: Path) -> dict:
    """summary.md and the plots from ``output/summary.json`` (also after a run elsewhere)."""
    summary = load_summary(output / "summary.json")
    (output / "summary.md").write_text(markdown(summary))
    plot(summary, output)
    return summary

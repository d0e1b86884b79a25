"""vLLM's own benchmark tools, driven as a user would run them: ``vllm bench throughput`` for
offline throughput, ``vllm serve`` + ``vllm bench serve`` for serving latency.

Each tool runs as ``python -m vllm.entrypoints.cli.main …`` in a child process (the bundled
GPU install has no ``vllm`` script), so it loads this plugin through its entry point exactly as
``vllm`` does. What the tools do not write to their JSON (KV capacity, the attention backend)
is read from the engine's log: the parsers are pure functions, tested on real log lines.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from vllm_mha2mla.tools.bench.shapes import BenchError

VLLM_CLI = [sys.executable, "-m", "vllm.entrypoints.cli.main"]

_KV_CAPACITY = re.compile(r"KV cache size: ([\d,]+) tokens")
_PLUGIN_BACKEND = re.compile(r"MHA2MLA attention backend: (\w+)")
_VLLM_BACKEND = (re.compile(r"Using (\w+) attention backend out of potential backends"),
                 re.compile(r"Using (?:AttentionBackendEnum\.)?([A-Z][A-Z0-9_]+) backend\."))
_PREFILL_BACKEND = re.compile(r"Using (\w+) MLA prefill backend")
_ENGINE_STATS = re.compile(r"Avg prompt throughput: ([\d.]+) tokens/s, Avg generation throughput: ([\d.]+) tokens/s, "
                           r"Running: (\d+) reqs")


@dataclass(frozen=True)
class EngineSettings:
    """What every tool's engine is started with (the same for an original and its conversions)."""

    model: Path
    tokenizer: Path
    max_model_len: int
    dummy_weights: bool
    kv_cache_dtype: str = "auto"
    attention_backend: str | None = None
    gpu_memory_utilization: float | None = None
    max_num_seqs: int | None = None
    enforce_eager: bool = False
    dtype: str = "bfloat16"
    extra: tuple[str, ...] = ()

    def args(self) -> list[str]:
        args = ["--model", str(self.model), "--tokenizer", str(self.tokenizer), "--dtype", self.dtype,
                "--max-model-len", str(self.max_model_len), "--kv-cache-dtype", self.kv_cache_dtype, "--seed", "0"]
        if self.dummy_weights:
            args += ["--load-format", "dummy"]
        if self.attention_backend:
            args += ["--attention-backend", self.attention_backend]
        if self.gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", f"{self.gpu_memory_utilization:g}"]
        if self.max_num_seqs is not None:
            args += ["--max-num-seqs", str(self.max_num_seqs)]
        if self.enforce_eager:
            args.append("--enforce-eager")
        return args + list(self.extra)


def throughput_command(engine: EngineSettings, input_len: int, output_len: int, num_prompts: int,
                       output_json: Path) -> list[str]:
    """``vllm bench throughput`` on random prompts of exactly ``input_len`` tokens, each asked for
    exactly ``output_len`` (the tool sets ``ignore_eos``)."""
    return [*VLLM_CLI, "bench", "throughput", *engine.args(), "--dataset-name", "random",
            "--random-input-len", str(input_len), "--random-output-len", str(output_len), "--random-range-ratio", "0",
            "--num-prompts", str(num_prompts), "--disable-detokenize", "--output-json", str(output_json)]


def serve_command(engine: EngineSettings, port: int) -> list[str]:
    model_args = engine.args()
    return [*VLLM_CLI, "serve", str(engine.model), *model_args[2:], "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", "bench"]


def bench_serve_command(engine: EngineSettings, port: int, input_len: int, output_len: int, num_prompts: int,
                        rate: float, result_dir: Path, result_file: str) -> list[str]:
    """``vllm bench serve`` with Poisson arrivals at ``rate`` requests/s (``inf``: all at once)."""
    return [*VLLM_CLI, "bench", "serve", "--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}",
            "--model", "bench", "--tokenizer", str(engine.tokenizer), "--dataset-name", "random",
            "--random-input-len", str(input_len), "--random-output-len", str(output_len), "--random-range-ratio", "0",
            "--num-prompts", str(num_prompts), "--request-rate", "inf" if rate == float("inf") else f"{rate:g}",
            "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99", "--seed", "0",
            "--disable-tqdm", "--save-result", "--result-dir", str(result_dir), "--result-filename", result_file]


# -- log parsing ------------------------------------------------------------------------------------
def kv_capacity_tokens(log: str) -> int | None:
    """The KV capacity vLLM reports at start ("GPU KV cache size: 1,706,800 tokens"; CPU likewise)."""
    found = _KV_CAPACITY.findall(log)
    return int(found[-1].replace(",", "")) if found else None


def attention_backend(log: str, forced: str | None, is_original: bool, on_cpu: bool) -> str:
    """Which attention backend served the layers: the plugin's own line for converted models,
    else vLLM's selection message, else what was forced, else the platform's default."""
    found = _PLUGIN_BACKEND.findall(log)
    if found:
        return found[-1]
    for pattern in _VLLM_BACKEND:
        found = pattern.findall(log)
        if found:
            return found[-1]
    if forced:
        return forced
    return "CPU_ATTN" if (on_cpu and is_original) else "unknown"


def prefill_backend(log: str) -> str | None:
    found = _PREFILL_BACKEND.findall(log)
    return found[-1] if found else None


def phase_rates(log: str) -> dict[str, float | None]:
    """Decode and prefill rates from the engine's periodic stats lines ("Avg prompt throughput:
    …, Avg generation throughput: …, Running: N reqs", every ~10 s on GPUs).

    An offline run's output tokens/s mixes both phases: at 8K in / 1K out a model spends most of
    its time in prefill, whatever its cache. ``decode_tokens_per_s`` is the median generation
    rate over intervals with no prompt tokens (pure decode, at ``decode_running`` sequences);
    ``prefill_tokens_per_s`` the median prompt rate over intervals that were mostly prefill."""
    stats = [(float(p), float(g), int(r)) for p, g, r in _ENGINE_STATS.findall(log)]
    decode = sorted((g, r) for p, g, r in stats if p == 0 and g > 0)
    prefill = sorted(p for p, g, r in stats if p > 0 and p > 4 * g)
    middle = decode[len(decode) // 2] if decode else (None, None)
    return {"decode_tokens_per_s": middle[0], "decode_running": middle[1],
            "prefill_tokens_per_s": prefill[len(prefill) // 2] if prefill else None}


# -- running ----------------------------------------------------------------------------------------
@dataclass
class ToolRun:
    """One finished tool process: its exit code, combined output and wall time."""

    command: list[str]
    returncode: int
    log: str
    seconds: float
    extra: dict = field(default_factory=dict)

    def failure(self) -> str:
        tail = "\n".join(self.log.splitlines()[-30:])
        return f"`{' '.join(self.command[2:6])} …` exited with {self.returncode}:\n{tail}"


_LIVE_GROUPS: set[int] = set()
"""Process groups of the tools running now (each tool and its engine processes in a group of its
own), so that a stopped bench stops them too (:func:`stop_tools_on_signals`)."""
_GROUPS_LOCK = threading.Lock()
_STOPPING = threading.Event()
STOP_GRACE_S = 15.0
"""How long a stopped bench gives its tools' groups to exit on SIGTERM before SIGKILL (a ``vllm
serve`` shuts its engine down in a few seconds; one stuck in a CUDA call never does)."""


def _start(command: list[str], env: dict[str, str], log) -> subprocess.Popen:
    with _GROUPS_LOCK:  # started and registered as one step: a stop in between would miss the tool
        if _STOPPING.is_set():
            raise BenchError("the bench is stopping: no new tool started")
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _LIVE_GROUPS.add(proc.pid)
    return proc


def _signal_group(group: int, signum: int) -> bool:
    """Send ``signum`` to a process group; False if none of it is left."""
    try:
        os.killpg(group, signum)
        return True
    except ProcessLookupError:
        return False


def _stop(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM to the tool's whole group (its engine core too, also when the tool itself has
    already exited and left it behind), SIGKILL after ``grace_s``."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    else:
        _signal_group(proc.pid, signal.SIGTERM)
    _LIVE_GROUPS.discard(proc.pid)


def stopping() -> bool:
    """Whether :func:`stop_live_tools` has begun: a tool that fails from now on was stopped, not
    broken, and its row must not be recorded as a failure."""
    return _STOPPING.is_set()


def stop_live_tools(grace_s: float | None = None) -> None:
    """Start no more tools; SIGTERM every running tool's group, then SIGKILL what is left of them
    after ``grace_s`` (default :data:`STOP_GRACE_S`)."""
    grace_s = STOP_GRACE_S if grace_s is None else grace_s
    _STOPPING.set()  # before any SIGTERM: see stopping()
    locked = _GROUPS_LOCK.acquire(timeout=5)  # a start in progress finishes registering first
    try:
        groups = list(_LIVE_GROUPS)
    finally:
        if locked:
            _GROUPS_LOCK.release()
    pending = [g for g in groups if _signal_group(g, signal.SIGTERM)]
    deadline = time.monotonic() + grace_s
    while pending and time.monotonic() < deadline:
        time.sleep(0.2)
        for group in pending:
            try:
                os.waitpid(group, os.WNOHANG)  # the leader is this process's child: reap it
            except ChildProcessError:
                pass
        pending = [g for g in pending if _signal_group(g, 0)]
    for group in pending:
        _signal_group(group, signal.SIGKILL)


def stop_tools_on_signals() -> dict[int, object]:
    """On SIGTERM (``timeout``, a scheduler), SIGINT (Ctrl-C) or SIGHUP (a closed terminal) stop
    every running tool (:func:`stop_live_tools`) and exit 128 + the signal. The tools run in sessions
    of their own, so none of these signals reaches them otherwise: the bench would die alone and its
    ``vllm serve`` or ``vllm bench throughput`` live on, holding the GPU and the port. A signal the
    process was started to ignore (``nohup``) stays ignored. The handler exits without unwinding the
    worker threads (their rows stop being recorded at once: :func:`stopping`): install it only in a
    process that owns its signals (``mha2mla bench``), from the main thread. Returns the handlers it
    replaced."""
    def handler(signum, frame) -> None:
        stop_live_tools()
        sys.stdout.flush()
        os._exit(128 + signum)  # the worker threads hold no state: summary.json is replaced atomically

    replaced = {}
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            replaced[sig] = signal.signal(sig, handler)
    return replaced


def run_tool(command: list[str], env: dict[str, str], log_file: Path, timeout: float) -> ToolRun:
    """Runs one tool to completion, its output teed to ``log_file`` (kept for the record)."""
    start = time.time()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        proc = _start(command, env, log)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = -9
        finally:  # past its time (or interrupted): stop it; finished: stop what it left in its group
            _stop(proc, grace_s=10)
    return ToolRun(command, code, log_file.read_text(errors="replace"), time.time() - start)


def free_port() -> int:
    """A local TCP port nothing listens on now, chosen by the OS. A fixed port would let a second
    bench run (or any service) answer this run's health checks and requests."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int) -> bool:
    """Whether something holds ``port`` on the loopback interface (binding it fails). With ``SO_REUSEADDR``, as
    ``vllm serve`` (uvicorn) binds: connections a stopped server closed linger in TIME_WAIT for a minute, which
    would fail a plain bind although a new server can take the port at once; a listener still fails it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


class Server:
    """``vllm serve`` in its own process group, stopped (with its engine) on exit. Refuses a port
    that is already taken: the health check would reach whatever listens there."""

    def __init__(self, command: list[str], env: dict[str, str], log_file: Path, port: int, timeout: float):
        self.command, self.env, self.log_file, self.port, self.timeout = command, env, log_file, port, timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        if port_in_use(self.port):
            raise BenchError(f"port {self.port} is already in use: another server would answer for vllm serve")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_file, "w")
        self._log.write("$ " + " ".join(self.command) + "\n")
        self._log.flush()
        self.proc = _start(self.command, self.env, self._log)
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.__exit__(None, None, None)
                raise BenchError(f"vllm serve exited with {self.proc.returncode} before it was ready:\n"
                                 + "\n".join(self.log().splitlines()[-30:]))
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as resp:
                    if resp.status == 200 and self.proc.poll() is None:
                        return self
            except OSError:
                pass
            time.sleep(2)
        self.__exit__(None, None, None)
        raise BenchError(f"vllm serve was not ready within {self.timeout:.0f} s (log: {self.log_file})")

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            _stop(self.proc)
        self._log.close()


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise BenchError(f"{path} was not written")
    return json.loads(path.read_text())

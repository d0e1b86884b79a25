"""Starts and stops a real `vllm serve` process on 127.0.0.1 for the HTTP tests.

Shared by the serve tests so that every one runs the command users run (the venv's `vllm` CLI, the plugin
found through its entry point) and cleans up the same way: the server is started in its own session, so a
signal to its process group reaches the API server and the engine-core process it spawns.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from conversion import ConvertOptions, convert
from tests.helpers import TinySpec
from vllm_mha2mla.tools.bench.vllm_tools import free_port

# Wide enough for 8 MLA heads at a 576-value budget; the same spec in every serve test, so the session's
# tiny_model_factory builds the source checkpoint once.
SERVED_SPEC = TinySpec(num_heads=8, num_kv_heads=8, head_dim=64, hidden_size=512)
SERVED_NAME = "mla"
STARTUP_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0


@dataclass
class Server:
    """A running `vllm serve`: its process (leader of its own process group), URL and log file."""

    proc: subprocess.Popen
    base_url: str
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's log, for assertion messages that must say what the server did."""
        return self.log_path.read_text(errors="replace")[-chars:]


def convert_served_checkpoint(tiny_model_factory, folder: Path) -> Path:
    """Converts the tiny source model to MLA in ``folder`` (float32, so CPU serving is exact greedy)."""
    src = tiny_model_factory(SERVED_SPEC)
    convert(src, folder, ConvertOptions(rope_dim=16, strategy="uniform", kv_budget=576, dtype="float32"),
            show_progress=False)
    return folder


def serve_command(model: Path, port: int, max_model_len: int, extra_args: Sequence[str],
                  kv_cache_bytes: int = 32 << 20) -> list[str]:
    """The `vllm serve` command line: float32, eager (no compile time on CPU), a small KV cache."""
    vllm_cli = Path(sys.executable).parent / "vllm"  # the command users run
    return [str(vllm_cli), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "float32", "--max-model-len", str(max_model_len), "--enforce-eager",
            "--kv-cache-memory-bytes", str(kv_cache_bytes), "--served-model-name", SERVED_NAME, *extra_args]


def wait_until_healthy(server: Server, timeout_s: float) -> None:
    """Polls /health until it answers 200; raises with the log tail if the server exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited early (rc {server.proc.returncode}):\n{server.log_tail()}")
        try:
            if requests.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(1)  # polling interval while the engine loads, not a synchronisation
    raise RuntimeError(f"vllm serve did not become healthy in {timeout_s:.0f} s:\n{server.log_tail()}")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGINT to the server's process group (a clean shutdown), SIGKILL if it is still there after 60 s.

    Safe to call on a server a test already stopped: the group may be gone by then.
    """
    try:
        os.killpg(proc.pid, signal.SIGINT)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT_S)


@contextmanager
def running_server(model: Path, log_path: Path, max_model_len: int = 512, extra_args: Sequence[str] = (),
                   extra_env: Mapping[str, str] | None = None, kv_cache_bytes: int = 32 << 20) -> Iterator[Server]:
    """Runs `vllm serve MODEL` on a free loopback port for the duration of the block.

    ``extra_env`` is added to this process's environment for the server (and the processes it starts).
    """
    port = free_port()
    env = {**os.environ, **(extra_env or {})}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(serve_command(model, port, max_model_len, extra_args, kv_cache_bytes), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env)
        server = Server(proc=proc, base_url=f"http://127.0.0.1:{port}", log_path=log_path)
        try:
            wait_until_healthy(server, STARTUP_TIMEOUT_S)
            yield server
        finally:
            stop_server(proc)

"""Fresh engine processes without vLLM's import time: a server process imports vLLM once and forks one child
per engine, which runs a module as ``python -m MODULE ARGS`` would (opt-in for the engine runner:
``MHA2MLA_RUNNER_FORK_SERVER=1``; the test suite turns it on).

:func:`vllm_mha2mla.tools.runner.run_engine_in_subprocess` runs every engine in a process of its own, because
vLLM engines hold global state that two engines must not share. Starting that process costs ~10 s on 2 CPU
cores before the engine does anything (``from vllm import LLM``), most of a small test engine's time. A child
forked from a process that has only imported vLLM is just as fresh — no engine, no distributed group, no CUDA
context has existed in it — and starts at once. The server forks only while CUDA is uninitialised in it, one
child at a time, and the child runs the module as ``python -m`` would, in the caller's working directory and
environment. (The server never calls CUDA itself: a driver
initialised before a fork is unusable in the child.)

Environment variables that code reads when the module is imported (vLLM's logging, OpenMP's thread count)
must be the same for the server and every child: a request whose environment differs from the server's in
anything but the variables read later (``MHA2MLA_*``, pytest's ``PYTEST_CURRENT_TEST``) or whose working
directory differs gets a new server.

The caller sends the first job only once the server has finished its imports, and a child is killed when its
server ends (its parent-death signal): a server given up on (slow to start, out of step, interrupted) is
killed and leaves no engine running beside the plain process that replaces it.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import threading
import time
import traceback

START_TIMEOUT_S = 600.0
"""How long the server may take to import vLLM (~10 s on 2 idle cores, over 60 s on busy ones) before the
caller gives up on it and starts a plain process."""
LATE_ENV_PREFIXES = ("MHA2MLA_", "PYTEST_CURRENT_TEST")
"""Variables read only after the fork (by this project's code, which the server does not import)."""


def _early_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith(LATE_ENV_PREFIXES)}


class ForkServer:
    """The parent's handle: one server process, used by one caller at a time."""

    def __init__(self, env: dict[str, str], cwd: str):
        self.env, self.cwd = _early_env(env), cwd
        self.proc = subprocess.Popen([sys.executable, "-m", "vllm_mha2mla.tools.fork_server"], env=env, cwd=cwd,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._buffer = b""
        self._eof = self._is_ready = False

    def fits(self, env: dict[str, str], cwd: str) -> bool:
        return self.proc.poll() is None and self.cwd == cwd and self.env == _early_env(env)

    def _read_line(self, deadline: float | None) -> dict | None:
        """The server's next reply, or None at its end (``_eof``) or past ``deadline``."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], wait)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                self._eof = True
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _ready(self) -> bool:
        """Waits (once) for the server to finish its imports: no job is sent before, so a server given up on
        here has no child to leave behind."""
        if not self._is_ready:
            hello = self._read_line(time.monotonic() + START_TIMEOUT_S)
            self._is_ready = bool(hello) and "ready" in hello
        return self._is_ready

    def run(self, module: str, argv: list[str], env: dict[str, str], log_file: str, timeout: float) -> int | None:
        """Runs ``python -m module *argv`` in a forked child, its output to ``log_file``; its exit code, or None
        if the server could not (it did not start or has died: the caller starts a plain process). Raises
        TimeoutExpired after ``timeout`` seconds of the child's (the child is killed)."""
        job = {"module": module, "argv": argv, "env": env, "cwd": self.cwd, "log": log_file}
        pid = None
        try:
            if not self._ready():
                self.close(kill=True)
                return None
            self.proc.stdin.write((json.dumps(job) + "\n").encode())
            self.proc.stdin.flush()
            started = self._read_line(time.monotonic() + 60)
            if not started or "pid" not in started:
                self.close(kill=True)
                return None
            pid = started["pid"]
            done = self._read_line(time.monotonic() + timeout)
            if done is None and self.proc.poll() is None and not self._eof:  # past its time
                self._kill(pid)
                if self._read_line(time.monotonic() + 60) is None:  # the server reaps it and reports
                    self.close(kill=True)
                raise subprocess.TimeoutExpired(argv, timeout)
            if done is None or "rc" not in done:  # the server died under it (its child went with it)
                self.close(kill=True)
                return None
            return done["rc"]
        except (OSError, ValueError):  # a broken pipe or a garbled reply: this server is out of step
            if pid is not None:
                self._kill(pid)
            self.close(kill=True)
            return None
        except subprocess.TimeoutExpired:
            raise
        except BaseException:  # Ctrl-C while waiting: the engine goes too, and so does this server
            if pid is not None:
                self._kill(pid)
            self.close(kill=True)
            raise

    @staticmethod
    def _kill(pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self, kill: bool = False) -> None:
        """Ends the server: at the end of its input (it exits once its child, if any, has), or at once with
        ``kill`` (a child it has forked is killed with it: the child's parent-death signal)."""
        if not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()  # the server exits at the end of its input
            except OSError:
                pass
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


_server: ForkServer | None = None
_lock = threading.Lock()


@atexit.register
def _close_server() -> None:
    if _server is not None:
        _server.close()


def run_forked(module: str, argv: list[str], env: dict[str, str], log_file: str, timeout: float) -> int | None:
    """``python -m module *argv`` in a child forked from this process's fork server (started, or replaced when
    the environment differs, here): its exit code; None where no server could run it (another thread is using
    it, or it died)."""
    global _server
    if not _lock.acquire(blocking=False):
        return None
    try:
        cwd = os.getcwd()
        if _server is None or not _server.fits(env, cwd):
            _close_server()
            _server = ForkServer(env, cwd)
        try:
            code = _server.run(module, argv, env, log_file, timeout)
        finally:
            if _server.proc.poll() is not None or _server.proc.stdin.closed:
                _server = None  # it died or was closed: the next call starts another
        return code
    finally:
        _lock.release()


# ----------------------------------------------------------------------------- the server process

def _die_with_server(server_pid: int) -> None:
    """The child is killed when its server ends (a server killed by its caller leaves no engine behind)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass
    if os.getppid() != server_pid:  # the server ended before the line above
        os._exit(1)


def _child(job: dict, server_pid: int, replies: int) -> None:
    """In the forked child: the caller's directory, environment and output file, then the module as ``-m``."""
    code = 1
    try:
        _die_with_server(server_pid)
        os.close(replies)  # the caller sees the server's end, not the child's
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        sys.argv = [job["module"], *job["argv"]]
        runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()  # what a process at its end runs
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve() -> int:
    """Imports vLLM, replies ``{"ready": ...}``, then reads one job per line, forks a child for it and replies
    ``{"pid": ...}`` and then ``{"rc": ...}``. The replies go out on a descriptor of their own: whatever the
    imports print to stdout goes to stderr instead, never into the replies."""
    replies = os.dup(1)
    os.dup2(2, 1)
    out = os.fdopen(replies, "w", buffering=1)

    import torch
    from vllm import LLM, SamplingParams  # noqa: F401  (what every engine process imports first)

    print(json.dumps({"ready": os.getpid()}), file=out, flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        if torch.cuda.is_initialized():
            return 1  # a forked child could not use CUDA: the caller falls back to a plain process
        sys.stdout.flush()
        sys.stderr.flush()
        server_pid = os.getpid()
        pid = os.fork()
        if pid == 0:
            _child(job, server_pid, replies)
        print(json.dumps({"pid": pid}), file=out, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), file=out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(serve())

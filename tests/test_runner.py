"""The engine runner's two ways to start a fresh engine process: a plain ``python -m`` subprocess (the demo's and
the benchmarks') and a child forked from the fork server (the test suite's, ``MHA2MLA_RUNNER_FORK_SERVER``)."""

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import TinySpec
from vllm_mha2mla.tools import fork_server
from vllm_mha2mla.tools.runner import FORK_SERVER_ENV, EngineRequest, engine_env, run_engine_in_subprocess

pytestmark = pytest.mark.vllm


def _missing_model_error(tmp_path) -> str:
    with pytest.raises(RuntimeError) as info:
        run_engine_in_subprocess(EngineRequest(model=str(tmp_path / "no-such-model"), prompt_token_ids=[[1, 2]]),
                                 timeout=600)
    return str(info.value)


def test_both_ways_report_a_failed_engine_with_its_output(tmp_path, monkeypatch):
    monkeypatch.setenv(FORK_SERVER_ENV, "1")
    forked = _missing_model_error(tmp_path)
    monkeypatch.delenv(FORK_SERVER_ENV)
    plain = _missing_model_error(tmp_path)
    for message in (forked, plain):
        assert message.startswith(f"vLLM engine for {tmp_path / 'no-such-model'} failed (exit 1):")
        assert "no-such-model" in message.split("\n", 1)[1]  # the child's own error, from its output
    assert forked.splitlines()[-1] == plain.splitlines()[-1]


def test_a_forked_engine_past_its_time_is_killed_and_the_server_goes_on(tmp_path, monkeypatch, tiny_model_factory):
    monkeypatch.setenv(FORK_SERVER_ENV, "1")
    request = EngineRequest(model=str(tiny_model_factory(TinySpec())), prompt_token_ids=[[1, 2, 3]], max_tokens=4,
                            dtype="float32", enforce_eager=True, kv_cache_memory_bytes=16 << 20)
    with pytest.raises(subprocess.TimeoutExpired):
        run_engine_in_subprocess(request, timeout=0.5)
    server = fork_server._server
    assert server is not None and server.proc.poll() is None
    result = run_engine_in_subprocess(request, timeout=600)
    assert fork_server._server is server and len(result["outputs"][0]["token_ids"]) == 4
    # a new server for another environment read at import; none for the variables read after the fork
    env = engine_env(request)
    assert server.fits({**env, "MHA2MLA_CACHE": str(tmp_path), "PYTEST_CURRENT_TEST": "x"}, os.getcwd())
    assert not server.fits({**env, "VLLM_LOGGING_LEVEL": "DEBUG"}, os.getcwd())
    assert not server.fits(env, str(tmp_path))


def test_a_server_killed_mid_run_takes_its_child_along_and_the_caller_falls_back(tmp_path):
    """A server that dies (or is killed by its caller: slow to start, out of step, interrupted) leaves no
    forked child running beside the plain process that replaces it: the server's end is the child's death
    signal."""
    env = engine_env(EngineRequest(model="x"))  # the engine tests' server, if one is up already
    pid_file, log = tmp_path / "child.pid", str(tmp_path / "child.log")
    assert fork_server.run_forked("timeit", ["-n", "1", "-r", "1", "pass"], env, log, 600) == 0
    server = fork_server._server

    def kill_server_once_the_child_runs():
        deadline = time.monotonic() + 60
        while not pid_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        server.proc.kill()

    killer = threading.Thread(target=kill_server_once_the_child_runs)
    killer.start()
    setup = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid()))"
    assert fork_server.run_forked("timeit", ["-n", "1", "-r", "1", "-s", setup, "time.sleep(300)"], env, log,
                                  600) is None
    killer.join()
    assert fork_server._server is None
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(child), "the forked child outlived its server"


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False

"""`vllm serve` with a converted checkpoint, over real HTTP on 127.0.0.1."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from conversion import ConvertOptions, convert
from tests.helpers import TinySpec
from vllm_mha2mla.runner import EngineRequest, run_engine_in_subprocess

pytestmark = pytest.mark.vllm

PROMPT = "ROMEO: What light through yonder"
MESSAGES = [{"role": "user", "content": "Speak, good Horatio."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_model_factory, tmp_path_factory):
    src = tiny_model_factory(TinySpec(num_heads=8, num_kv_heads=8, head_dim=64, hidden_size=512))
    model = tmp_path_factory.mktemp("serve") / "mla"
    convert(src, model, ConvertOptions(rope_dim=16, strategy="uniform", kv_budget=576, dtype="float32"),
            show_progress=False)
    port = _free_port()
    log = open(model.parent / "server.log", "w")
    vllm_cli = Path(sys.executable).parent / "vllm"  # the command users run
    cmd = [str(vllm_cli), "serve", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
           "--kv-cache-memory-bytes", str(32 << 20), "--served-model-name", "mla"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited early:\n{Path(log.name).read_text()[-3000:]}")
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise RuntimeError("vllm serve did not become healthy in 300 s")
    yield {"base": base, "model": model, "proc": proc}
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _offline_text(model: Path, prompt: str) -> str:
    result = run_engine_in_subprocess(EngineRequest(model=str(model), prompts=[prompt], max_tokens=16,
                                                    dtype="float32", enforce_eager=True,
                                                    kv_cache_memory_bytes=32 << 20))
    return result["outputs"][0]["text"]


def test_completions_and_chat_over_http_equal_offline_greedy(served):
    base, model = served["base"], served["model"]
    assert requests.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"] == "mla"
    resp = requests.post(f"{base}/v1/completions", timeout=120, json={
        "model": "mla", "prompt": PROMPT, "max_tokens": 16, "temperature": 0})
    assert resp.status_code == 200, resp.text
    completion = resp.json()["choices"][0]["text"]
    resp = requests.post(f"{base}/v1/chat/completions", timeout=120, json={
        "model": "mla", "messages": MESSAGES, "max_tokens": 16, "temperature": 0})
    assert resp.status_code == 200, resp.text
    chat = resp.json()["choices"][0]["message"]["content"]

    from transformers import AutoTokenizer

    chat_prompt = AutoTokenizer.from_pretrained(str(model)).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=False)
    assert completion == _offline_text(model, PROMPT)
    assert chat == _offline_text(model, chat_prompt)
    assert len(completion) > 0


def test_server_stops_cleanly(served):
    proc = served["proc"]
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 0 or proc.returncode in (-signal.SIGINT,)

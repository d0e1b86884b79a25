"""`vllm serve` with a converted checkpoint, over real HTTP on 127.0.0.1."""

import os
import signal
from pathlib import Path

import pytest
import requests

from tests.serving import convert_served_checkpoint, running_server
from vllm_mha2mla.tools.runner import EngineRequest, run_engine_in_subprocess

pytestmark = pytest.mark.vllm

PROMPT = "ROMEO: What light through yonder"
MESSAGES = [{"role": "user", "content": "Speak, good Horatio."}]


@pytest.fixture(scope="module")
def served(tiny_model_factory, tmp_path_factory):
    model = convert_served_checkpoint(tiny_model_factory, tmp_path_factory.mktemp("serve") / "mla")
    with running_server(model, model.parent / "server.log") as server:
        yield {"base": server.base_url, "model": model, "proc": server.proc}


def _offline_texts(model: Path, prompts: list[str]) -> list[str]:
    """The prompts' greedy texts from one offline engine (one engine start for all of them)."""
    result = run_engine_in_subprocess(EngineRequest(model=str(model), prompts=prompts, max_tokens=16,
                                                    dtype="float32", enforce_eager=True,
                                                    kv_cache_memory_bytes=32 << 20))
    return [out["text"] for out in result["outputs"]]


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
    assert [completion, chat] == _offline_texts(model, [PROMPT, chat_prompt])
    assert len(completion) > 0


def test_server_stops_cleanly(served):
    proc = served["proc"]
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 0 or proc.returncode in (-signal.SIGINT,)

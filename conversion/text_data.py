"""Text the project ships with or finds beside it, split so calibration never sees eval text.

The shared corpus lives outside the repository (``../shared/data`` from the repository
root); a missing file is a clear error, never a download.
"""

from __future__ import annotations

import os
from pathlib import Path

from conversion.errors import ConversionError

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_TEXT = "tinyshakespeare.txt"
HELD_OUT_FRACTION = 0.1


def shared_text_path(name: str = SHARED_TEXT) -> Path:
    """Path of a text file in ``../shared/data`` (override the folder with MHA2MLA_DATA)."""
    folder = Path(os.environ.get("MHA2MLA_DATA", REPO_ROOT.parent / "shared" / "data"))
    path = folder / name
    if not path.is_file():
        raise ConversionError(
            f"{path} is missing: the project reads its sample text from ../shared/data beside the "
            "repository (or the folder named by MHA2MLA_DATA)"
        )
    return path


def split_text(text: str, held_out_fraction: float = HELD_OUT_FRACTION) -> tuple[str, str]:
    """(calibration, held-out): the last fraction, cut at a line break, is held out."""
    cut = int(len(text) * (1 - held_out_fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    return text[:cut], text[cut:]

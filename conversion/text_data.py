"""Text the project ships with or finds beside it, split so calibration never sees eval text.

The shared corpus lives outside the repository (``../shared/data`` from the repository
root); a missing file is a clear error, never a download.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
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


def token_slot(unit_tokens: Sequence[int], depth: float) -> int:
    """Where ``depth`` falls among units (paragraphs, sentences) of these token counts: the unit boundary
    nearest to ``depth`` of their tokens (the number of units before it). Shared by the evaluation's
    long-context prompts and the retrieval calibration's, so a fact "at 30% depth" means the same in both."""
    target, used, best, best_gap = depth * sum(unit_tokens), 0, 0, float("inf")
    for i in range(len(unit_tokens) + 1):
        if abs(used - target) < best_gap:
            best, best_gap = i, abs(used - target)
        if i < len(unit_tokens):
            used += unit_tokens[i]
    return best

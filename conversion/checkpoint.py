"""Writing a converted checkpoint folder atomically.

Everything goes into a hidden sibling folder first and is renamed into place at the end:
a crash or an error never leaves a half checkpoint at the destination.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from conversion.errors import ConversionError

MAX_SHARD_BYTES = 2 * 1024**3


class ShardWriter:
    """Buffers tensors and writes ``model-0000i-of-0000n.safetensors`` shards plus an index
    (or a single ``model.safetensors``), so memory stays bounded for large models."""

    def __init__(self, folder: Path, dtype: torch.dtype, max_shard_bytes: int = MAX_SHARD_BYTES):
        self.folder, self.dtype, self.max_shard_bytes = folder, dtype, max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to(self.dtype).contiguous()
        self._buffer[name] = tensor
        self._buffer_bytes += tensor.numel() * tensor.element_size()
        if self._buffer_bytes >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        index = len(self._shards)
        save_file(self._buffer, str(self.folder / f"shard-{index}.tmp"), metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> list[str]:
        """Finalises shard names; returns the file names written."""
        self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self.folder / "shard-0.tmp", self.folder / "model.safetensors")
            return ["model.safetensors"]
        names, weight_map = [], {}
        for i, keys in enumerate(self._shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / f"shard-{i}.tmp", self.folder / name)
            names.append(name)
            weight_map.update({k: name for k in keys})
        total = sum((self.folder / nm).stat().st_size for nm in names)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names + ["model.safetensors.index.json"]


@contextlib.contextmanager
def atomic_output_folder(dst: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary folder that becomes ``dst`` only if the block succeeds."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise ConversionError(f"output folder {dst} already exists (pass --overwrite to replace it)")
    if not dst.parent.exists():
        raise ConversionError(f"parent folder of the output, {dst.parent}, does not exist")
    tmp = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")

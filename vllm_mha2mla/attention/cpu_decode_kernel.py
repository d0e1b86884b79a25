"""The plugin's compiled CPU kernels (``csrc/latent_decode_cpu.cpp``), built on first use.

:func:`cpu_kernels` returns the ops of the extension: ``latent_decode`` — the same contract as
:func:`vllm_mha2mla.attention.paged_attention.paged_latent_decode` for a bf16 query and cache, read in place
through the block table — and ``write_latent_rows`` (the cache write), or ``None`` where they cannot
run, and the caller keeps the PyTorch paths:

* the CPU lacks AVX-512 (F, BW, VL, DQ), or this is not x86-64;
* ``MHA2MLA_CPU_DECODE=torch`` (``kernel`` makes a failed build an error instead of a fallback);
* the build fails (no C++ compiler, no ninja): one warning, then the PyTorch path.

The build (about 10 s on the 2-core test machine, once per machine and CPU feature set) goes through
``torch.utils.cpp_extension`` (a C++ compiler and ninja; vLLM's CPU backend compiles with the same
compiler through torch.compile) into its cache (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``); the extension's name carries the instruction-set flags it was compiled
with, so machines sharing a home directory never load one built for other instructions. With
AVX512-BF16 (``avx512_bf16`` in ``/proc/cpuinfo``) the query·key and p·V products use bf16 dot products
(exact products, float32 sums; the softmax weights rounded to bf16 for p·V); without it, float32 FMAs.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ENV = "MHA2MLA_CPU_DECODE"
SOURCE = Path(__file__).with_name("csrc") / "latent_decode_cpu.cpp"
_BASE_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def build_flags(bf16: bool | None = None) -> list[str] | None:
    """Compiler flags for this CPU, or ``None`` when it cannot run the kernel. ``bf16``: force the variant
    with (True) or without (False) AVX512-BF16 dot products; default: whatever this CPU has."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    flags = _cpu_flags()
    if not {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
        return None
    if bf16 is None:
        bf16 = "avx512_bf16" in flags
    elif bf16 and "avx512_bf16" not in flags:
        return None
    return _BASE_FLAGS + (["-mavx512bf16"] if bf16 else [])


def load_variant(bf16: bool | None = None):
    """Builds (if needed) and loads one variant; returns its ops (``latent_decode``, ``write_latent_rows``),
    or ``None`` if this CPU cannot run it. Raises what the build raises."""
    cflags = build_flags(bf16)
    if cflags is None:
        return None
    name = "mha2mla_latent_decode_" + ("avx512bf16" if "-mavx512bf16" in cflags else "avx512")
    ops = getattr(torch.ops, name)
    if not hasattr(ops, "latent_decode"):
        from torch.utils import cpp_extension

        cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=cflags + [f"-DMHA2MLA_OPS={name}"],
                           extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    return ops


@functools.lru_cache(maxsize=1)
def cpu_kernels():
    """This CPU's kernels (built if needed), or ``None`` (see the module doc):

    * ``latent_decode(q, q_pe, kv_cache, block_table, seq_lens, scale, kv_lora_rank)`` with ``q`` ``[B, H, D]``
      and ``q_pe`` ``None``, or ``q`` the latent part ``[B, H, C]`` and ``q_pe`` the rope part; bf16;
      returns ``[B, H, kv_lora_rank]``;
    * ``write_latent_rows(kv_c, k_pe, kv_cache, slot_mapping)``: each token's ``[kv_c | k_pe]`` row into its
      cache slot (slots < 0 skipped), any dtype the rows and the cache share.
    """
    mode = os.environ.get(ENV, "auto").lower()
    if mode not in ("auto", "kernel", "torch"):
        raise ValueError(f"{ENV}={mode!r}: expected auto, kernel or torch")
    if mode == "torch":
        return None
    try:
        ops = load_variant()
    except Exception as exc:  # no compiler / ninja / headers: the PyTorch path still serves
        if mode == "kernel":
            raise
        logger.warning("mha2mla: CPU decode kernel unavailable (%s: %s); using the PyTorch decode",
                       type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None
    if ops is None and mode == "kernel":
        raise RuntimeError(f"{ENV}=kernel, but this CPU lacks AVX-512 (F, BW, VL, DQ)")
    return ops


def kernel_name(ops) -> str:
    """``cpu-kernel(avx512bf16)`` / ``cpu-kernel(avx512)`` for loaded kernels, ``torch`` for ``None``.
    The bf16-only condition (other dtypes take the PyTorch path) is the caller's."""
    if ops is None:
        return "torch"
    return "cpu-kernel(" + getattr(ops, "name", "?").removeprefix("mha2mla_latent_decode_") + ")"

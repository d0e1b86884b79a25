"""Nsight Compute profiles of one decode call: the plugin's Triton kernel against vLLM's FlashMLA on
the same paged cache (issue 11, item 5: what holds the plugin at ~2.2 TB/s where FlashMLA reads ~2.7).

  profile OUT_DIR [CASE ...]   for each case (default: all of CASES) run this script's ``run`` under
                               ``ncu --set full`` and keep the raw CSV, then write OUT_DIR/profile.json
                               (every metric of every kernel of the call) and print the metrics that say
                               where the time goes. Needs ncu on the path; FlashMLA cases need vLLM.
  run KERNEL LATENT ROPE HEADS BATCH CONTEXT
                               warm the kernel up, then bracket one call with cudaProfilerStart/Stop
                               (ncu runs with ``--profile-from-start off``: only that call is profiled)

On the lent GPU (vLLM staged as for ``gpu_recovery.sh bench``; the plugin cases alone need no vLLM):
  bash benchmarks/gpu_recovery.sh script benchmarks/profile_decode.py profile $OUT/ncu

KERNEL is ``plugin`` (``vllm_mha2mla.triton_decode.mla_paged_decode`` with its own plan) or ``flashmla``
(vLLM's ``flash_mla_with_kvcache``, 576-value rows only). Pages of 64 tokens in random order (FlashMLA's
block size; the plugin takes any multiple of 16), each request 90–100% of CONTEXT, bf16. The clocks are
left alone (``--clock-control none``): the device library asks it, and the engines run unlocked too.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package and benchmarks/, run as a script

CASES = {
    # name: (kernel, latent, rope, heads, batch, context) at the 8K/1K engines' decode batches
    "plugin-576": ("plugin", 512, 64, 32, 310, 8704),
    "flashmla-576": ("flashmla", 512, 64, 32, 310, 8704),
    "plugin-1024": ("plugin", 512, 512, 32, 212, 8704),
    "plugin-2560": ("plugin", 2048, 512, 32, 40, 8704),
}
PAGE = 64
SCALE = 0.07
HEADLINE = (  # (section, metric) pairs printed per kernel; profile.json keeps every metric
    ("GPU Speed Of Light Throughput", "Duration"),
    ("GPU Speed Of Light Throughput", "DRAM Throughput"),
    ("GPU Speed Of Light Throughput", "Compute (SM) Throughput"),
    ("Memory Workload Analysis", "Memory Throughput"),
    ("Memory Workload Analysis", "L2 Hit Rate"),
    ("Memory Workload Analysis", "Local Memory Spilling Requests"),  # the 576 plan spills (h100-ncu-decode/)
    ("Compute Workload Analysis", "Issue Slots Busy"),
    ("Launch Statistics", "Registers Per Thread"),
    ("Launch Statistics", "Dynamic Shared Memory Per Block"),
    ("Occupancy", "Achieved Occupancy"),
    ("Scheduler Statistics", "No Eligible"),
    ("Warp State Statistics", "Warp Cycles Per Issued Instruction"),
)


def _call(kernel: str, latent: int, q, cache, table, lens, context: int):
    """A function that runs one decode call of ``kernel`` on these inputs."""
    if kernel == "plugin":
        from vllm_mha2mla.triton_decode import mla_paged_decode

        return lambda: mla_paged_decode(q, cache, table, lens, SCALE, latent, context)
    if kernel == "flashmla":
        if q.shape[-1] != 576:
            raise SystemExit(f"flashmla serves 576-value rows only, not {q.shape[-1]}")
        from vllm.v1.attention.ops.flashmla import flash_mla_with_kvcache, get_mla_metadata

        sched, _ = get_mla_metadata(lens, q.shape[1], 1, is_fp8_kvcache=False)  # as gpu_anyshape.py (timed there)
        return lambda: flash_mla_with_kvcache(q=q.unsqueeze(1), k_cache=cache.unsqueeze(-2), block_table=table,
                                              cache_seqlens=lens, head_dim_v=latent, tile_scheduler_metadata=sched,
                                              softmax_scale=SCALE, causal=True, is_fp8_kvcache=False)
    raise SystemExit(f"kernel must be plugin or flashmla, not {kernel!r}")


def run(kernel: str, latent: int, rope: int, heads: int, batch: int, context: int) -> None:
    import torch

    from benchmarks.decode_kernel_sweep import paged_inputs

    q, cache, table, lens = paged_inputs(latent, rope, heads, batch, context, page=PAGE)
    call = _call(kernel, latent, q, cache, table, lens, context)
    for _ in range(3):  # compile and warm up outside the profiled range
        call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    gbytes = float(lens.sum()) * (latent + rope) * cache.element_size() / 1e9
    print(json.dumps({"kernel": kernel, "latent": latent, "rope": rope, "heads": heads, "batch": batch,
                      "context": context, "cache_gbytes": gbytes}))


def parse_details(text: str) -> list[dict]:
    """ncu's ``--csv --page details`` output → one dict per profiled kernel:
    ``{"kernel": name, "id": n, "metrics": {"Section / Metric (unit)": value}}`` (values as ncu prints
    them; numbers without thousands separators become floats)."""
    start = text.find('"ID"')
    if start < 0:
        raise ValueError("no ncu CSV table in the output (was anything profiled?)")
    kernels: dict[str, dict] = {}
    for row in csv.DictReader(io.StringIO(text[start:])):
        if not row.get("Metric Name") or not row.get("ID", "").isdigit():  # ==PROF== lines among the rows
            continue
        entry = kernels.setdefault(row["ID"], {"kernel": row["Kernel Name"], "id": int(row["ID"]),
                                               "grid": row.get("Grid Size"), "block": row.get("Block Size"),
                                               "metrics": {}})
        unit = f" ({row['Metric Unit']})" if row.get("Metric Unit") else ""
        value = row["Metric Value"]
        try:
            value = float(value.replace(",", ""))
        except ValueError:
            pass
        entry["metrics"][f"{row['Section Name']} / {row['Metric Name']}{unit}"] = value
    return list(kernels.values())


def headline(kernel: dict) -> dict:
    """The HEADLINE metrics of one profiled kernel, by section and name (any unit)."""
    found = {}
    for section, name in HEADLINE:
        prefix = f"{section} / {name}"
        for key, value in kernel["metrics"].items():
            if key == prefix or key.startswith(prefix + " ("):
                found[key] = value
    return found


def profile(out_dir: Path, names: list[str]) -> dict:
    ncu = shutil.which("ncu")
    if ncu is None:
        raise SystemExit("ncu (Nsight Compute) is not on the path")
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"cases": {}}
    for name in names:
        kernel, *shape = CASES[name]
        profiler = [ncu, "--clock-control", "none", "--profile-from-start", "off", "--set", "full", "--csv",
                    "--page", "details"]
        run_args = ["run", kernel, *map(str, shape)]
        done = subprocess.run([*profiler, sys.executable, str(Path(__file__).resolve()), *run_args],
                              capture_output=True, text=True)
        (out_dir / f"{name}.csv").write_text(done.stdout)
        (out_dir / f"{name}.stderr.txt").write_text(done.stderr[-20000:])
        case: dict = {"command": " ".join([*profiler, "python3", "benchmarks/profile_decode.py", *run_args]),
                      "returncode": done.returncode}
        try:
            case["kernels"] = parse_details(done.stdout)
            call = next((json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"kernel"')), None)
            case["call"] = call
        except ValueError as exc:
            case["error"] = f"{exc}; stderr: {done.stderr[-1500:]}"
        results["cases"][name] = case
        print(f"== {name} (rc {done.returncode})", flush=True)
        for k in case.get("kernels", []):
            print(f"   {k['kernel'][:70]}  grid {k['grid']} block {k['block']}")
            for key, value in headline(k).items():
                print(f"      {key}: {value}")
        if "error" in case:
            print("   " + case["error"][:1500])
        (out_dir / "profile.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "run" and len(sys.argv) == 8:
        run(sys.argv[2], *map(int, sys.argv[3:]))
    elif len(sys.argv) >= 3 and sys.argv[1] == "profile":
        unknown = [n for n in sys.argv[3:] if n not in CASES]
        if unknown:
            raise SystemExit(f"unknown cases {unknown}; known: {', '.join(CASES)}")
        profile(Path(sys.argv[2]), sys.argv[3:] or list(CASES))
    else:
        raise SystemExit(__doc__)

"""Nsight Compute profiles of one decode call: the plugin's Triton kernel against vLLM's FlashMLA on
the same paged cache, to see what holds the plugin's kernel below FlashMLA's bandwidth (waves,
occupancy, spills, DRAM and issue utilisation) rather than guess from timings.

  profile OUT_DIR [CASE ...]   for each case (default: all of CASES) run this module's ``run`` under
                               ``ncu --set full`` and keep the raw CSV, then write OUT_DIR/profile.json
                               (every metric of every kernel of the call) and print the metrics that say
                               where the time goes. Needs ncu on the path; FlashMLA cases need vLLM.
  run KERNEL LATENT ROPE HEADS BATCH CONTEXT
                               warm the kernel up, then bracket one call with cudaProfilerStart/Stop
                               (ncu runs with ``--profile-from-start off``: only that call is profiled)

On the lent GPU (vLLM staged as for ``benchmarks/gpu/jobs.sh bench``; the plugin cases alone need no vLLM):
  bash benchmarks/gpu/jobs.sh script benchmarks.kernels.profile_decode profile $OUT/ncu
Elsewhere: python -m benchmarks.kernels.profile_decode profile OUT_DIR [CASE ...]

KERNEL is ``plugin`` (``vllm_mha2mla.attention.triton_decode.mla_paged_decode`` with its own plan) or ``flashmla``
(vLLM's ``flash_mla_with_kvcache``, 576-value rows only). Pages of 64 tokens in random order (FlashMLA's
block size; the plugin takes any multiple of 16), each request 90–100% of CONTEXT, bf16. The clocks are
left alone (``--clock-control none``): the device library asks it, and the engines run unlocked too.
Results: benchmarks/README.md lists the folders this script wrote.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.common import cli_args, decode_call, paged_inputs

REPO = Path(__file__).resolve().parents[2]
MODULE = "benchmarks.kernels.profile_decode"  # the child ncu profiles runs this module

CASES = {
    # name: (kernel, latent, rope, heads, batch, context) at the 8K/1K engines' decode batches
    "plugin-576": ("plugin", 512, 64, 32, 310, 8704),
    "flashmla-576": ("flashmla", 512, 64, 32, 310, 8704),
    "plugin-1024": ("plugin", 512, 512, 32, 212, 8704),
    "plugin-2560": ("plugin", 2048, 512, 32, 40, 8704),
}
PAGE = 64
HEADLINE = (  # (section, metric) pairs printed per kernel; profile.json keeps every metric
    ("GPU Speed Of Light Throughput", "Duration"),
    ("GPU Speed Of Light Throughput", "DRAM Throughput"),
    ("GPU Speed Of Light Throughput", "Compute (SM) Throughput"),
    ("Memory Workload Analysis", "Memory Throughput"),
    ("Memory Workload Analysis", "L2 Hit Rate"),
    ("Memory Workload Analysis", "Local Memory Spilling Requests"),
    ("Compute Workload Analysis", "Issue Slots Busy"),
    ("Launch Statistics", "Registers Per Thread"),
    ("Launch Statistics", "Dynamic Shared Memory Per Block"),
    ("Occupancy", "Achieved Occupancy"),
    ("Scheduler Statistics", "No Eligible"),
    ("Warp State Statistics", "Warp Cycles Per Issued Instruction"),
)


def run(kernel: str, latent: int, rope: int, heads: int, batch: int, context: int) -> None:
    import torch

    q, cache, table, lens = paged_inputs(latent, rope, heads, batch, context, page=PAGE)
    call = decode_call(kernel, latent, q, cache, table, lens, context)
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
        done = subprocess.run([*profiler, sys.executable, "-m", MODULE, *run_args],
                              capture_output=True, text=True, cwd=REPO)
        (out_dir / f"{name}.csv").write_text(done.stdout)
        (out_dir / f"{name}.stderr.txt").write_text(done.stderr[-20000:])
        case: dict = {"command": " ".join([*profiler, "python3", "-m", MODULE, *run_args]),
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
    args = cli_args(__doc__, min_args=2)
    if args[0] == "run" and len(args) == 7:
        run(args[1], *map(int, args[2:]))
    elif args[0] == "profile":
        unknown = [n for n in args[2:] if n not in CASES]
        if unknown:
            raise SystemExit(f"unknown cases {unknown}; known: {', '.join(CASES)}")
        profile(Path(args[1]).resolve(), args[2:] or list(CASES))
    else:
        raise SystemExit(__doc__)

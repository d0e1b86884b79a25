"""The MLA prefill attention of one layer, as each backend runs it: where the plugin's prefill loses
time against FLASH_ATTN_MLA's when both run FlashAttention varlen on the same tokens (building the
keys, compacting the heads, padding, copying the output back).

From the same inputs — ``k_nope`` (a strided view of ``kv_b_proj``'s output, as vLLM splits it),
``k_pe`` ``[T, 1, qk_rope]``, ``v`` (the other half of that view) and q ``[T, H, qk_nope + qk_rope]``
laid out by MHA2MLA's layout — each path builds its keys and runs FlashAttention varlen:

- ``vllm``: what FLASH_ATTN_MLA's prefill does (native dims only): the full ``[k_nope | k_pe]`` key
  (vLLM's ``_concat_k_nope_k_pe``) and FA3 on 192-wide q/k with 128-wide values;
- ``before``: the plugin's prefill up to this change: the same full key, each head's q and k
  compacted to its nope columns + own rotary columns (a cat and a gather each), q, k and v
  zero-padded to a multiple of 8, values sliced back (a copy);
- ``now``: keys written compact from ``k_nope`` and ``k_pe`` (:func:`compact_keys`), queries
  gathered in one ``index_select`` (:func:`compact_heads`), the native layout's zero nope columns
  dropped: 128-wide heads for both Llama-2 shapes, no padding, no copy of the output.

Each path is checked against ``now`` (bf16 outputs, max |difference|) and timed with
``triton.testing.do_bench`` (median). Workloads: new tokens only (causal) as in one engine step of
the 8K and 1K runs, and a context chunk (queries against 8K cached tokens, unmasked).

Usage (GPU, vLLM importable): python -m benchmarks.kernels.prefill_attention_sweep OUT.json
Results: benchmarks/README.md lists the folders this script wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks.common import cli_args
from conversion.mla_format.layout import plan_exact_layout, plan_native_layout
from vllm_mha2mla.attention.head_compaction import (compact_heads, compact_keys, head_compaction, pad_last,
                                                    round_up)

SHAPES = {  # name: layout of the engines' Llama-2-7B rows
    "native_576": lambda: plan_native_layout(32, 32, 128, 2, 16, 576),
    "r16-d16_1024": lambda: plan_exact_layout(32, 32, 128, 16, 16),
}
WORKLOADS = {  # name: (query lengths, context length per sequence, causal)
    "new_2x8192": ([8192, 8192], 0, True),
    "new_16x1024": ([1024] * 16, 0, True),
    "chunk_8192_on_8192": ([8192], 8192, False),
}
SCALE = 0.0625


def _inputs(layout, q_lens: list[int], context: int, seed: int = 0, device: str = "cuda"):
    """q ``[Tq, H, qk]`` zero where MHA2MLA's layout puts zeros; k_nope, v as views of one
    ``[Tk, H, qk_nope + v]`` tensor; k_pe ``[Tk, 1, qk_rope]``; cumulative lengths."""
    g = torch.Generator(device=device).manual_seed(seed)
    h, nope, rope, v_dim = layout.num_heads, layout.qk_nope_head_dim, layout.qk_rope_head_dim, layout.v_head_dim
    tq = sum(q_lens)
    k_lens = [context or n for n in q_lens]
    tk = sum(k_lens)
    q = torch.randn(tq, h, nope + rope, device=device, generator=g, dtype=torch.bfloat16)
    q[..., layout.nope_columns_used : nope] = 0
    mask = torch.zeros(h, rope, dtype=torch.bool)
    mask.scatter_(1, layout.rope_slot_columns(0, h), True)
    q[..., nope:] *= mask.to(device)
    kv_nope = torch.randn(tk, h, nope + v_dim, device=device, generator=g, dtype=torch.bfloat16)
    kv_nope[..., layout.nope_columns_used : nope] = 0
    k_nope, v = kv_nope.split([nope, v_dim], dim=-1)
    k_pe = torch.randn(tk, 1, rope, device=device, generator=g, dtype=torch.bfloat16)
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=device, dtype=torch.int32)
    return q, k_nope, k_pe, v, cu(q_lens), cu(k_lens), max(q_lens), max(k_lens)


def _full_key(k_nope, k_pe):
    """vLLM's ``_concat_k_nope_k_pe`` (its fallback copies; flashinfer's concat kernel is for 128 + 64 too)."""
    k = torch.empty(*k_nope.shape[:-1], k_nope.shape[-1] + k_pe.shape[-1], dtype=k_nope.dtype, device=k_nope.device)
    k[..., : k_nope.shape[-1]] = k_nope
    k[..., k_nope.shape[-1] :] = k_pe
    return k


def _before_compact(x, nope, columns):
    """The plugin's compaction before this change: all ``qk_nope`` columns, then a gather of the own rope columns."""
    index = columns[None].expand(x.shape[0], -1, -1)
    return torch.cat([x[..., :nope], torch.gather(x[..., nope:], -1, index)], dim=-1)


def paths(layout, flash, version_for, device: str = "cuda"):
    """name -> fn(q, k_nope, k_pe, v, cu_q, cu_k, max_q, max_k, causal) -> out ``[Tq, H, v]``."""
    h, nope, rope, v_dim = layout.num_heads, layout.qk_nope_head_dim, layout.qk_rope_head_dim, layout.v_head_dim
    now_heads = head_compaction(layout, 0, h, v_dim, pad_to=8)
    columns = layout.rope_slot_columns(0, h).to(device)
    before_width = round_up(max(nope + columns.shape[1], v_dim), 8)

    def attend(q, k, v, cu_q, cu_k, max_q, max_k, causal, width_v):
        return flash(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
                     softmax_scale=SCALE, causal=causal, fa_version=version_for(q.shape[-1], width_v))

    def now(q, k_nope, k_pe, v, *meta):
        out = attend(compact_heads(q, now_heads), compact_keys(k_nope, k_pe, now_heads),
                     pad_last(v, now_heads.padded_dim), *meta, now_heads.padded_dim)
        return out if out.shape[-1] == v_dim else out[..., :v_dim].contiguous()

    def before(q, k_nope, k_pe, v, *meta):
        k = _full_key(k_nope, k_pe)
        qc, kc = (pad_last(_before_compact(x, nope, columns), before_width) for x in (q, k))
        return attend(qc, kc, pad_last(v, before_width), *meta, before_width)[..., :v_dim].contiguous()

    def vllm(q, k_nope, k_pe, v, *meta):
        return attend(q, _full_key(k_nope, k_pe), v, *meta, v_dim)

    found = {"now": now, "before": before}
    if (nope, rope, v_dim) == (128, 64, 128):
        found["vllm"] = vllm
    return found


def main(out_file: Path) -> None:
    from triton.testing import do_bench
    from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func, get_flash_attn_version

    def version_for(qk: int, v: int):
        return get_flash_attn_version(head_size=qk, head_size_v=v)

    results = {"device": torch.cuda.get_device_name(0), "scale": SCALE, "rows": []}
    for shape, make in SHAPES.items():
        layout = make()
        candidates = paths(layout, flash_attn_varlen_func, version_for)
        for workload, (q_lens, context, causal) in WORKLOADS.items():
            q, k_nope, k_pe, v, cu_q, cu_k, max_q, max_k = _inputs(layout, q_lens, context)
            args = (q, k_nope, k_pe, v, cu_q, cu_k, max_q, max_k, causal)
            want = candidates["now"](*args)
            timed = {}
            for name, run in candidates.items():
                got = run(*args)
                ms = do_bench(lambda: run(*args), warmup=25, rep=200)
                timed[name] = ms
                row = {"shape": shape, "workload": workload, "path": name, "ms": round(ms, 4),
                       "max_abs_diff_vs_now": float((got.float() - want.float()).abs().max()),
                       "query_tokens": int(cu_q[-1]), "key_tokens": int(cu_k[-1])}
                results["rows"].append(row)
            base = timed.get("vllm", timed["before"])
            for row in results["rows"][-len(timed):]:
                row["speed_vs_" + ("vllm" if "vllm" in timed else "before")] = round(base / row["ms"], 3)
                print(json.dumps(row), flush=True)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(results, indent=2))
    print(f"{'shape':14} {'workload':20} " + " ".join(f"{p:>8}" for p in ("vllm", "before", "now")))
    for shape in SHAPES:
        for workload in WORKLOADS:
            ms = {r["path"]: r["ms"] for r in results["rows"] if r["shape"] == shape and r["workload"] == workload}
            print(f"{shape:14} {workload:20} " + " ".join(f"{ms[p]:8.3f}" if p in ms else f"{'-':>8}"
                                                     for p in ("vllm", "before", "now")))


if __name__ == "__main__":
    main(Path(cli_args(__doc__)[0]))

"""The plugin's decode and prefill kernels alone, at any shape: correctness against PyTorch and speed
against vLLM's own MLA decode kernels. Why: the plugin serves MLA rows vLLM's kernels do not (any
latent/rope width), so its kernels must match the PyTorch decode on every path an engine takes and
be timed beside FlashMLA and Triton MLA where those apply.

  kernel:        the Triton paged decode against PyTorch (bf16, fp8 cache, CUDA-graph replay with
                 new lengths and padding rows, the balanced kernel's batches), the prefill backend's
                 FlashAttention path against PyTorch, and decode kernel timings against vLLM's own MLA
                 decode kernels (FlashMLA, Triton MLA) at 576 values, plus the plugin kernel at 1024 /
                 192 values; a small tile sweep.
  kerneltimings: the same without the tile sweep.
  kernelcheck:   the decode correctness checks alone (no vLLM, no timings); exits non-zero on a failure.

(These modes were ``gpu_anyshape.py kernel|kerneltimings|kernelcheck`` before the benchmarks were grouped;
the engine checks stay in ``benchmarks.end_to_end.gpu_anyshape``.)

Usage (GPU): python -m benchmarks.kernels.anyshape_kernels {kernel,kerneltimings,kernelcheck} OUT.json
Results: benchmarks/README.md lists the folders this script wrote.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import cli_args
from conversion.mla_format.layout import plan_exact_layout
from vllm_mha2mla.attention.paged_attention import paged_latent_decode
from vllm_mha2mla.attention.triton_decode import mla_paged_decode, plan_launch

SHAPES = {"576": (512, 64), "1024_llama2_paper": (512, 512), "192_smollm2_demo": (96, 96)}


def _save(out_file: Path, results: dict) -> None:
    out_file.write_text(json.dumps(results, indent=2))


# -- kernel ----------------------------------------------------------------------------------------
def _paged_inputs(batch, heads, latent, rope, seq_len, page, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    per_req = -(-seq_len // page)
    num_pages = batch * per_req + 7
    cache = (torch.randn(num_pages, page, latent + rope, device="cuda", generator=g) * 0.5).to(dtype)
    table = torch.randperm(num_pages, device="cuda", generator=g)[: batch * per_req].view(batch, per_req)
    q = (torch.randn(batch, heads, latent + rope, device="cuda", generator=g) * 0.5).to(torch.bfloat16)
    lens = torch.randint(max(1, seq_len // 2), seq_len + 1, (batch,), device="cuda", generator=g)
    lens[0] = seq_len
    return q, cache, table.to(torch.int32), lens.to(torch.int32)


def _kernel_correctness() -> dict:
    out: dict = {}
    for name, (latent, rope) in SHAPES.items():
        for heads, batch, seq_len in ((32, 8, 777), (9, 3, 2100), (64, 2, 40), (32, 128, 3000), (9, 120, 900)):
            # the last two: batches the balanced kernel takes
            q, cache, table, lens = _paged_inputs(batch, heads, latent, rope, seq_len, 16, torch.bfloat16)
            got, _ = mla_paged_decode(q, cache, table, lens, 0.07, latent, seq_len)
            want = paged_latent_decode(q.float(), cache.float(), table, lens, 0.07, latent)
            err = float((got.float() - want).abs().max())
            out[f"{name}_h{heads}_b{batch}_L{seq_len}_bf16"] = {"max_abs_err": err, "ok": err < 2e-2}
        # fp8 cache with a per-tensor scale
        q, cache, table, lens = _paged_inputs(8, 32, latent, rope, 500, 16, torch.bfloat16)
        k_scale = torch.tensor([0.05], device="cuda")
        fp8 = (cache.float() / k_scale).to(torch.float8_e4m3fn)
        got, _ = mla_paged_decode(q, fp8, table, lens, 0.07, latent, 500, k_scale=k_scale)
        want = paged_latent_decode(q.float(), fp8.float() * k_scale, table, lens, 0.07, latent)
        err = float((got.float() - want).abs().max())
        out[f"{name}_fp8_cache"] = {"max_abs_err": err, "ok": err < 3e-2}
    # CUDA graph: capture once (planned for the longest length), replay with other lengths and padding rows; 16 run
    # the fixed splits, 160 the balanced kernel (its chunks come from the lengths on the device)
    for label, shape, batch in (("", "1024_llama2_paper", 16), ("_balanced", "576", 160),
                                ("_balanced_1024", "1024_llama2_paper", 160)):
        latent, rope = SHAPES[shape]
        q, cache, table, lens = _paged_inputs(batch, 32, latent, rope, 1500, 16, torch.bfloat16)
        static_lens = lens.clone()
        mla_paged_decode(q, cache, table, static_lens, 0.07, latent, 1500)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            g_out, g_lse = mla_paged_decode(q, cache, table, static_lens, 0.07, latent, 1500)
        errs = []
        for seed in range(3):
            gen = torch.Generator(device="cuda").manual_seed(seed)
            new = torch.randint(1, 1501, (batch,), device="cuda", generator=gen)
            new[-(batch // 8):] = 0  # vLLM pads a graph's batch with rows of length 0
            static_lens.copy_(new.to(torch.int32))
            graph.replay()
            real = static_lens > 0
            want = paged_latent_decode(q[real].float(), cache.float(), table[real], static_lens[real], 0.07, latent)
            errs.append(float((g_out[real].float() - want).abs().max()))
            padding_ok = bool((g_out[~real] == 0).all() and (g_lse[~real] == float("-inf")).all())
        out[f"cuda_graph_replay_new_lengths{label}"] = {"max_abs_err": max(errs), "padding_rows_zero": padding_ok,
                                                        "ok": max(errs) < 2e-2 and padding_ok,
                                                        "batch": batch, "values": latent + rope}
    return out


def kernel_check(out_file: Path) -> dict:
    """``_kernel_correctness`` alone (no vLLM, no timings)."""
    results = {"device": torch.cuda.get_device_name(0), "correctness": _kernel_correctness()}
    _save(out_file, results)
    bad = {k: v for k, v in results["correctness"].items() if not v["ok"]}
    print(json.dumps(results["correctness"]), flush=True)
    if bad:
        raise SystemExit(f"kernel check failed: {bad}")
    return results


def _prefill_correctness() -> dict:
    from types import SimpleNamespace

    from vllm_mha2mla.attention.prefill import MHA2MLAPrefillBackend, varlen_attention_reference  # imports vLLM: kernelcheck runs without

    layout = plan_exact_layout(32, 32, 128, 16, 16)
    hf = SimpleNamespace(mha2mla={"format_version": 1, "layout": layout.to_dict(), "rope_pairs": [],
                                  "rope_theta": 1e4})
    backend = MHA2MLAPrefillBackend(32, 0.08, layout.kv_lora_rank, layout.qk_nope_head_dim,
                                    layout.qk_rope_head_dim, layout.v_head_dim,
                                    SimpleNamespace(model_config=SimpleNamespace(hf_config=hf)))
    lens = [300, 17, 1000]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    t = sum(lens)
    q = torch.randn(t, 32, layout.qk_nope_head_dim + layout.qk_rope_head_dim, device="cuda", dtype=torch.bfloat16)
    # zero each head's query outside its own rope columns, as the layout guarantees
    mask = torch.zeros(32, layout.qk_rope_head_dim, device="cuda", dtype=torch.bool)
    mask.scatter_(1, layout.rope_slot_columns(0, 32).cuda(), True)
    q[..., layout.qk_nope_head_dim:] *= mask
    k = torch.randn_like(q)
    v = torch.randn(t, 32, layout.v_head_dim, device="cuda", dtype=torch.bfloat16)
    backend.prepare_metadata(SimpleNamespace(query_start_loc=cu, max_query_len=max(lens), chunked_context=None))
    got, lse = backend.run_prefill_new_tokens(q, k, v, return_softmax_lse=True)
    want, want_lse = varlen_attention_reference(q, k, v, cu, cu, 0.08, causal=True)
    res = {"kernel": backend.kernel_name, "max_abs_err": float((got.float() - want.float()).abs().max()),
           "max_lse_err": float((lse.float() - want_lse).abs().max())}
    res["ok"] = res["max_abs_err"] < 2e-2 and res["max_lse_err"] < 1e-2
    # timing: FA on compacted 128-dim heads vs PyTorch SDPA (causal, per sequence) on the full 624 dims
    from triton.testing import do_bench

    fa_ms = do_bench(lambda: backend.run_prefill_new_tokens(q, k, v, return_softmax_lse=False), return_mode="median")

    def sdpa_full():
        for i in range(len(lens)):
            s, e = int(cu[i]), int(cu[i + 1])
            torch.nn.functional.scaled_dot_product_attention(
                q[s:e].transpose(0, 1), k[s:e].transpose(0, 1),
                torch.nn.functional.pad(v[s:e], [0, q.shape[-1] - v.shape[-1]]).transpose(0, 1),
                is_causal=True, scale=0.08)

    res["timing_ms"] = {"flash_attn_compacted": fa_ms, "sdpa_full_dims": do_bench(sdpa_full, return_mode="median")}
    return res


def _decode_timings() -> dict:
    """Decode attention alone (one layer), ms per call (median, L2 flushed by do_bench)."""
    from triton.testing import do_bench

    results: dict = {}
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    workloads = [(32, 1024), (128, 2048), (256, 1024), (16, 8192)]
    for name, (latent, rope) in SHAPES.items():
        for batch, seq_len in workloads:
            key = f"{name}_b{batch}_L{seq_len}"
            q, cache, table, lens = _paged_inputs(batch, 32, latent, rope, seq_len, 64, torch.bfloat16)
            lens.fill_(seq_len)
            bytes_read = batch * seq_len * (latent + rope) * 2
            row: dict = {}
            row["mha2mla_triton"] = do_bench(lambda: mla_paged_decode(q, cache, table, lens, 0.07, latent, seq_len,
                                                                     num_sms=sms), return_mode="median")
            if name == "576":
                row.update(_vllm_decode_timings(q, cache, table, lens, latent, seq_len, sms))
            row["mha2mla_triton_GBps"] = bytes_read / row["mha2mla_triton"] / 1e6
            row["plan"] = plan_launch(batch, 32, latent, rope, seq_len, sms).__dict__
            results[key] = row
            print(key, json.dumps(row), flush=True)
    return results


def _vllm_decode_timings(q, cache, table, lens, latent, seq_len, sms) -> dict:
    from triton.testing import do_bench

    row: dict = {}
    try:
        from vllm.v1.attention.backends.mla.triton_mla import _compute_num_kv_splits
        from vllm.v1.attention.ops.triton_decode_attention import decode_attention_fwd

        splits = _compute_num_kv_splits(seq_len, sms)
        o = torch.empty(q.shape[0], q.shape[1], latent, dtype=q.dtype, device="cuda")
        lse = torch.empty(q.shape[0], q.shape[1], dtype=q.dtype, device="cuda")
        logits = torch.empty(q.shape[0], q.shape[1], splits, latent + 1, dtype=torch.float32, device="cuda")
        kv = cache.unsqueeze(2)
        one = torch.ones(1, device="cuda")
        row["vllm_triton_mla"] = do_bench(lambda: decode_attention_fwd(
            q, kv, kv[..., :latent], o, lse, table, lens, logits, splits, 0.07, cache.shape[1],
            k_scale=one, v_scale=one, is_mla=True), return_mode="median")
    except Exception as exc:  # report, keep measuring the others
        row["vllm_triton_mla_error"] = repr(exc)[:300]
    try:
        from vllm.v1.attention.ops.flashmla import flash_mla_with_kvcache, get_mla_metadata

        sched, _ = get_mla_metadata(lens, q.shape[1], 1, is_fp8_kvcache=False)

        def flashmla():
            return flash_mla_with_kvcache(q=q.unsqueeze(1), k_cache=cache.unsqueeze(-2), block_table=table,
                                          cache_seqlens=lens, head_dim_v=latent, tile_scheduler_metadata=sched,
                                          softmax_scale=0.07, causal=True, is_fp8_kvcache=False)

        row["vllm_flashmla"] = do_bench(flashmla, return_mode="median")
    except Exception as exc:
        row["vllm_flashmla_error"] = repr(exc)[:300]
    return row


def _tile_sweep() -> dict:
    from triton.testing import do_bench

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out: dict = {}
    for name in ("576", "1024_llama2_paper"):
        latent, rope = SHAPES[name]
        for batch, seq_len in ((128, 2048), (16, 8192)):
            q, cache, table, lens = _paged_inputs(batch, 32, latent, rope, seq_len, 64, torch.bfloat16)
            lens.fill_(seq_len)
            base = plan_launch(batch, 32, latent, rope, seq_len, sms)
            timings = []
            for block_h in (16, 32):
                for block_n in (16, 32, 64):
                    for warps in (4, 8):
                        for stages in (1, 2):
                            plan = replace(base, block_h=block_h, block_n=block_n, num_warps=warps,
                                           num_stages=stages)
                            try:
                                ms = do_bench(lambda: mla_paged_decode(q, cache, table, lens, 0.07, latent,
                                                                       seq_len, launch=plan), return_mode="median")
                            except Exception:  # noqa: BLE001 - out of registers/shared memory
                                continue
                            timings.append((ms, block_h, block_n, warps, stages))
            timings.sort()
            out[f"{name}_b{batch}_L{seq_len}"] = {"default": base.__dict__, "best": timings[:5],
                                                  "default_ms": do_bench(lambda: mla_paged_decode(
                                                      q, cache, table, lens, 0.07, latent, seq_len),
                                                      return_mode="median")}
            print(name, batch, seq_len, json.dumps(out[f"{name}_b{batch}_L{seq_len}"]), flush=True)
    return out


def kernel(out_file: Path, sweep: bool = True) -> dict:
    results = {"device": torch.cuda.get_device_name(0)}
    results["decode_correctness"] = _kernel_correctness()
    print(json.dumps(results["decode_correctness"], indent=1), flush=True)
    _save(out_file, results)
    results["prefill"] = _prefill_correctness()
    print(json.dumps(results["prefill"]), flush=True)
    _save(out_file, results)
    results["decode_ms"] = _decode_timings()
    _save(out_file, results)
    if sweep:
        results["tile_sweep"] = _tile_sweep()
        _save(out_file, results)
    return results


if __name__ == "__main__":
    mode, out = cli_args(__doc__, min_args=2)[:2]
    modes = {"kernel": kernel, "kerneltimings": lambda o: kernel(o, sweep=False), "kernelcheck": kernel_check}
    if mode not in modes:
        raise SystemExit(f"unknown mode {mode!r}\n{__doc__}")
    modes[mode](Path(out))

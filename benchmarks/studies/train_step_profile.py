"""Where a distillation training step spends its time on the GPU, and what each speed-up buys. Why: the
global recovery stage is bounded by tokens per second on a lent GPU; this says which part of a step to
make faster and checks each speed-up like for like.

Times the global stage's whole step (student forward, teacher forward, distillation loss,
backward, AdamW on the trainable parameters; bf16 autocast, attention-only training, as
``mha2mla finetune`` runs it) for each variant, in one process on one GPU, so the ratios are
like for like:

  checkpointed   the loss as first shipped: logits projected per chunk under activation
                 checkpointing (each chunk's student and teacher projections run twice)
  fused          the shipped loss: gradients taken in the forward pass, nothing recomputed
  fused+compile  the same with student, teacher and the loss's per-chunk softmax passes under
                 torch.compile (what ``--compile`` does)

plus the parts of one step (student forward + backward, teacher forward, loss) and a
torch.profiler table of the CUDA kernels of the fastest variant's step.

Usage (GPU machine):
  python3 -m benchmarks.studies.train_step_profile OUT.json --model MLA_DIR --teacher TEACHER_DIR [--batch 16 32]
  python3 -m benchmarks.studies.train_step_profile OUT.json --random LLAMA_CONFIG_DIR --rope-dim 32 --d-kv 32
(``--random``: the models of a Llama config.json with random weights; speed does not depend on the values.)
On the lent GPU: bash benchmarks/gpu/jobs.sh profile|profile-random NAME ROPE DKV [args]
Results: benchmarks/README.md lists the folders this script wrote.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from benchmarks.common import mla_config_for
from conversion.recovery.global_stage import H100_BF16_DENSE_FLOPS, training_flops_per_token
from conversion.recovery.losses import fused_distillation_loss
from conversion.reference_model import MHA2MLAForCausalLM, load_reference


def checkpointed_distillation_loss(h_s, w_s, h_t, w_t, chunk_tokens: int = 4096):
    """The distillation loss as first shipped (activation checkpointing per chunk): the baseline."""

    def chunk_kl(a, wa, b, wb):
        log_p_s = F.log_softmax((a @ wa.T).float(), dim=-1)
        log_p_t = F.log_softmax((b @ wb.T).float(), dim=-1)
        return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum")

    hs, ht = h_s.reshape(-1, h_s.shape[-1]), h_t.reshape(-1, h_t.shape[-1])
    total = hs.new_zeros((), dtype=torch.float32)
    for i in range(0, hs.shape[0], chunk_tokens):
        total = total + checkpoint(chunk_kl, hs[i : i + chunk_tokens], w_s, ht[i : i + chunk_tokens], w_t,
                                   use_reentrant=False)
    return total / hs.shape[0]


def timed(fn, reps: int = 6, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` (CUDA events, after warm-up)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def random_models(config_dir: Path, rope_dim: int, d_kv: int):
    """Student (exact-layout MHA2MLA of the config) and teacher with random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(config_dir)), attn_implementation="sdpa")
    mla = Path(tempfile.mkdtemp()) / "mla"
    mla.mkdir()
    (mla / "config.json").write_text(json.dumps(mla_config_for(config_dir, rope_dim, d_kv, cache_size=None)))
    student = MHA2MLAForCausalLM(AutoConfig.from_pretrained(str(mla)))
    return student, teacher


def real_models(mla_dir: Path, teacher_dir: Path):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32, attn_implementation="sdpa")
    return load_reference(mla_dir), teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--model")
    ap.add_argument("--teacher")
    ap.add_argument("--random")
    ap.add_argument("--rope-dim", type=int, default=32)
    ap.add_argument("--d-kv", type=int, default=32)
    ap.add_argument("--batch", type=int, nargs="+", default=[16])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--variants", default="checkpointed,fused,fused+compile")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.random:
        student, teacher = random_models(Path(args.random), args.rope_dim, args.d_kv)
    else:
        student, teacher = real_models(Path(args.model), Path(args.teacher))
    student = student.float().cuda().train()
    teacher = teacher.float().cuda().eval().requires_grad_(False)
    for name, p in student.named_parameters():
        p.requires_grad_(".self_attn." in name)
    params = [p for p in student.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), fused=True)
    w_s, w_t = student.get_output_embeddings().weight, teacher.get_output_embeddings().weight
    auto = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "seq_len": args.seq_len,
                     "weights": "random" if args.random else "real", "variants": {}, "parts_ms": {}}
    flops_per_token = training_flops_per_token(student, args.seq_len, teacher)
    results["flops_per_token"] = flops_per_token
    compiled = {}

    def bodies(compile_them: bool):
        if not compile_them:
            return student.model, teacher.model
        if not compiled:
            compiled["s"], compiled["t"] = torch.compile(student.model), torch.compile(teacher.model)
        return compiled["s"], compiled["t"]

    def make_step(ids, loss_fn, compile_them):
        s_body, t_body = bodies(compile_them)
        loss_kwargs = {"compiled": True} if compile_them and loss_fn is fused_distillation_loss else {}

        def step():
            with auto():
                hidden = s_body(input_ids=ids, use_cache=False).last_hidden_state
                with torch.no_grad():
                    t_hidden = t_body(input_ids=ids, use_cache=False).last_hidden_state
                loss = loss_fn(hidden[:, :-1], w_s, t_hidden[:, :-1], w_t, **loss_kwargs)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            optim.zero_grad(set_to_none=True)
        return step

    losses = {"checkpointed": checkpointed_distillation_loss, "fused": fused_distillation_loss}
    best = None
    for batch in args.batch:
        ids = torch.randint(0, student.config.vocab_size, (batch, args.seq_len), device="cuda")
        tokens = batch * args.seq_len
        for variant in args.variants.split(","):
            key = f"{variant}@batch{batch}"
            torch.cuda.reset_peak_memory_stats()
            try:
                t0 = time.perf_counter()
                step = make_step(ids, losses[variant.split("+")[0]], variant.endswith("+compile"))
                ms = timed(step)
                rate = tokens / (ms / 1e3)
                results["variants"][key] = {
                    "step_ms": ms, "tokens_per_s": rate, "mfu": flops_per_token * rate / H100_BF16_DENSE_FLOPS,
                    "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9,
                    "first_steps_s": time.perf_counter() - t0}
                if best is None or rate > best[1]:
                    best = (key, rate, step)
            except torch.OutOfMemoryError as exc:
                results["variants"][key] = {"error": str(exc).splitlines()[0][:160]}
            optim.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            print(key, json.dumps(results["variants"][key]), flush=True)
            Path(args.out).write_text(json.dumps(results, indent=2))

    # the parts of one step, eager and compiled, at the first batch size
    ids = torch.randint(0, student.config.vocab_size, (args.batch[0], args.seq_len), device="cuda")
    for compile_them in (False, True):
        s_body, t_body = bodies(compile_them)
        tag = "compiled" if compile_them else "eager"

        def student_fwd_bwd():
            with auto():
                hidden = s_body(input_ids=ids, use_cache=False).last_hidden_state
            hidden.float().square().mean().backward()

        def teacher_fwd():
            with torch.no_grad(), auto():
                t_body(input_ids=ids, use_cache=False)

        results["parts_ms"][f"student_fwd_bwd[{tag}]"] = timed(student_fwd_bwd)
        results["parts_ms"][f"teacher_fwd[{tag}]"] = timed(teacher_fwd)
        optim.zero_grad(set_to_none=True)
    with torch.no_grad(), auto():
        t_hidden = teacher.model(input_ids=ids, use_cache=False).last_hidden_state
    s_hidden = t_hidden.detach().clone().requires_grad_(True)
    loss_variants = {**{name: (fn, {}) for name, fn in losses.items()},
                     "fused+compile": (fused_distillation_loss, {"compiled": True})}
    for name, (fn, kwargs) in loss_variants.items():
        def loss_fwd_bwd(fn=fn, kwargs=kwargs):
            with auto():
                fn(s_hidden[:, :-1], w_s, t_hidden[:, :-1], w_t, **kwargs).backward()
        results["parts_ms"][f"loss_fwd_bwd[{name}]"] = timed(loss_fwd_bwd)
    print(json.dumps(results["parts_ms"], indent=1), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2))

    if best is not None:  # CUDA kernels of the fastest variant's step
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            best[2]()
            torch.cuda.synchronize()
        events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
        total = sum(e.device_time_total for e in events if e.device_time_total > 0 and not e.key.startswith("aten::"))
        results["kernels_of"] = best[0]
        results["kernels"] = [{"kernel": e.key[:120], "calls": e.count, "ms": e.device_time_total / 1e3,
                               "share": e.device_time_total / total if total else None}
                              for e in events[:25]]
        print(prof.key_averages().table(sort_by="device_time_total", row_limit=25), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

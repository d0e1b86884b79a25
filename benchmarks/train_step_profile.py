"""Where a global-stage training step spends its time on the GPU (one batch, CUDA events).

Usage (GPU machine, after `gpu_recovery.sh` converted a model): python3 benchmarks/train_step_profile.py
MLA_DIR TEACHER_DIR OUT.json [batch] [seq_len]. Times, for one batch under bf16 autocast: the
student's forward + backward with a plain LM loss, the teacher's forward, the distillation loss
forward + backward on logits and its fused form on hidden states, and the student's attention
under each SDPA kernel that accepts it.
"""

from __future__ import annotations

import json
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conversion.recovery.losses import distillation_loss, fused_distillation_loss, next_token_loss
from conversion.reference_model import load_reference


def timed(fn, reps: int = 5, warmup: int = 2) -> float:
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


def main() -> None:
    from transformers import AutoModelForCausalLM

    mla_dir, teacher_dir, out = sys.argv[1:4]
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 16
    seq = int(sys.argv[5]) if len(sys.argv) > 5 else 2048
    student = load_reference(mla_dir).cuda().train()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32, attn_implementation="sdpa")
    teacher = teacher.cuda().eval().requires_grad_(False)
    for name, p in student.named_parameters():
        p.requires_grad_(".self_attn." in name)
    ids = torch.randint(0, student.config.vocab_size, (batch, seq), device="cuda")
    auto = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731

    def student_step():
        with auto():
            loss = next_token_loss(student(input_ids=ids, use_cache=False).logits, ids)
        loss.backward()

    def teacher_forward():
        with torch.no_grad(), auto():
            teacher(input_ids=ids, use_cache=False)

    with torch.no_grad(), auto():
        t_logits = teacher(input_ids=ids, use_cache=False).logits
    s_logits = t_logits.detach().float().clone().requires_grad_(True)

    def kd_step():
        distillation_loss(s_logits[:, :-1], t_logits[:, :-1]).backward()

    with torch.no_grad(), auto():
        t_hidden = teacher.model(input_ids=ids, use_cache=False).last_hidden_state
    s_hidden = t_hidden.detach().clone().requires_grad_(True)
    w_t = teacher.get_output_embeddings().weight

    def kd_fused_step():  # the same loss from hidden states, logits projected chunk by chunk
        with auto():
            fused_distillation_loss(s_hidden[:, :-1], w_t, t_hidden[:, :-1], w_t).backward()

    results = {"device": torch.cuda.get_device_name(), "batch": batch, "seq_len": seq, "tokens": batch * seq,
               "ms": {"student_fwd_bwd_lm": timed(student_step), "teacher_fwd": timed(teacher_forward),
                      "kd_loss_fwd_bwd": timed(kd_step), "kd_fused_loss_fwd_bwd": timed(kd_fused_step)}}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                results["ms"][f"student_fwd_bwd_lm[{backend.name}]"] = timed(student_step, reps=3, warmup=1)
        except RuntimeError as exc:
            results["ms"][f"student_fwd_bwd_lm[{backend.name}]"] = f"refused: {str(exc).splitlines()[0][:120]}"
    results["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print(json.dumps(results, indent=2))
    with open(out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

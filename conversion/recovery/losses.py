"""Training losses of the global stage (pure functions of logits).

Both work in float32 over chunks of tokens: the vocabulary is large (49k for SmolLM2, 128k
for Llama-3), and a full-sequence float32 softmax of student and teacher at once would
dominate memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("kd", "lm", "kd+lm")


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean causal-LM cross-entropy: position t predicts token t+1 (``[B, T, V]``, ``[B, T]``)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, chunk_tokens: int = 4096
) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) of the softened next-token distributions.

    Forward KL (the teacher's distribution weights the log-ratio), as in classic
    distillation: the student is pushed to cover everything the teacher finds likely.
    Scaled by ``temperature²`` so its gradients keep their size when softening.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}")
    vocab = student_logits.shape[-1]
    s, t = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    total = student_logits.new_zeros((), dtype=torch.float32)
    for i in range(0, s.shape[0], chunk_tokens):
        log_p_s = F.log_softmax(s[i : i + chunk_tokens].float() / temperature, dim=-1)
        log_p_t = F.log_softmax(t[i : i + chunk_tokens].float() / temperature, dim=-1)
        total = total + F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum")
    return total * temperature**2 / s.shape[0]

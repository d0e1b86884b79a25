"""Training losses of the global stage (pure functions of logits).

Both work in float32 over chunks of tokens: the vocabulary is large (49k for SmolLM2, 128k
for Llama-3), and a full-sequence float32 softmax of student and teacher at once would
dominate memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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


def _chunk_kl_sum(h_student: torch.Tensor, w_student: torch.Tensor, h_teacher: torch.Tensor,
                  w_teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p_s = F.log_softmax((h_student @ w_student.T).float() / temperature, dim=-1)
    log_p_t = F.log_softmax((h_teacher @ w_teacher.T).float() / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum")


def fused_distillation_loss(
    h_student: torch.Tensor, w_student: torch.Tensor, h_teacher: torch.Tensor, w_teacher: torch.Tensor,
    temperature: float = 1.0, chunk_tokens: int = 4096,
) -> torch.Tensor:
    """:func:`distillation_loss` of ``h_student @ w_studentᵀ`` against ``h_teacher @ w_teacherᵀ``
    (final hidden states ``[..., D]`` and output embeddings ``[V, D]``) without ever holding the
    full logits: each chunk of tokens is projected, scored and dropped, and recomputed in the
    backward pass (activation checkpointing). Two full ``[tokens, V]`` float32 logit tensors and
    their log-softmaxes were most of a step's memory and, near the card's limit, of its time.
    """
    hs, ht = h_student.reshape(-1, h_student.shape[-1]), h_teacher.reshape(-1, h_teacher.shape[-1])
    if hs.shape[0] != ht.shape[0]:
        raise ValueError(f"token counts differ: {hs.shape[0]} vs {ht.shape[0]}")
    total = hs.new_zeros((), dtype=torch.float32)
    for i in range(0, hs.shape[0], chunk_tokens):
        total = total + checkpoint(_chunk_kl_sum, hs[i : i + chunk_tokens], w_student, ht[i : i + chunk_tokens],
                                   w_teacher, temperature, use_reentrant=False)
    return total * temperature**2 / hs.shape[0]


def _chunk_ce_sum(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((h @ w.T).float(), targets, reduction="sum")


def fused_next_token_loss(hidden: torch.Tensor, w_out: torch.Tensor, input_ids: torch.Tensor,
                          chunk_tokens: int = 4096) -> torch.Tensor:
    """:func:`next_token_loss` of ``hidden @ w_outᵀ`` (``[B, T, D]``, ``[V, D]``), projected chunk by
    chunk like :func:`fused_distillation_loss`."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = input_ids[:, 1:].reshape(-1)
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk_tokens):
        total = total + checkpoint(_chunk_ce_sum, h[i : i + chunk_tokens], w_out, targets[i : i + chunk_tokens],
                                   use_reentrant=False)
    return total / h.shape[0]

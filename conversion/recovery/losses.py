"""Training losses of the global stage (pure functions of logits).

Both work in float32 over chunks of tokens: the vocabulary is large (49k for SmolLM2, 128k
for Llama-3), and a full-sequence float32 softmax of student and teacher at once would
dominate memory.
"""

from __future__ import annotations

import math

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


class _FusedLinearLoss(torch.autograd.Function):
    """A summed loss of ``logits = h @ wᵀ`` whose gradient is computed in the forward pass.

    Liger-style: for each chunk of tokens the logits are projected, the loss and its gradient
    with respect to the logits are taken in float32 (both have closed forms: softmax minus the
    target distribution), and that gradient is pushed through the projection at once
    (``dh = g @ w``; ``dw += gᵀ h`` only when ``w`` trains). Nothing of size ``[tokens, V]``
    outlives its chunk, and unlike activation checkpointing no projection is computed twice:
    per chunk, the student's and teacher's projections plus one gradient matmul (two when the
    output embedding trains), instead of five or six.

    ``target_fn(logits, *per_token_chunk, *shared) -> (loss_sum, grad_logits)`` sees each
    ``per_token`` tensor cut to the chunk's rows, so it has no index arguments and compiles
    once (``torch.compile`` fuses its float32 softmax passes, most of the loss's time).
    """

    @staticmethod
    def forward(ctx, h, w, target_fn, scale, chunk_tokens, per_token, shared):
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(w, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total = h.new_zeros((), dtype=torch.float32)
        for i in range(0, h.shape[0], chunk_tokens):
            h_i = h[i : i + chunk_tokens]
            logits = h_i @ w.T  # bf16 under autocast: the gradient matmuls use the same precision
            loss_sum, grad_logits = target_fn(logits, *(t[i : i + chunk_tokens] for t in per_token), *shared)
            total += loss_sum
            grad_logits = grad_logits.mul_(scale).to(logits.dtype)
            grad_h[i : i + h_i.shape[0]] = (grad_logits @ w.to(logits.dtype)).to(h.dtype)
            if grad_w is not None:
                grad_w += (grad_logits.T @ h_i.to(logits.dtype)).float()
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else h.new_empty(0))
        ctx.has_grad_w = grad_w is not None
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out if ctx.has_grad_w else None, None, None, None, None, None


def _kl_chunk(student_logits, h_teacher, w_teacher, temperature):
    """Sum over a chunk of KL(teacher ‖ student) and its gradient w.r.t. the student's logits."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax((h_teacher @ w_teacher.T).float() / temperature, dim=-1)
    p_t = log_p_t.exp()
    loss_sum = (p_t * (log_p_t - log_p_s)).sum()
    return loss_sum, (log_p_s.exp() - p_t) / temperature


def _ce_chunk(logits, targets):
    """Summed cross-entropy of a chunk and its gradient w.r.t. the logits."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    loss_sum = -log_p.gather(-1, targets[:, None]).sum()
    return loss_sum, log_p.exp() - F.one_hot(targets, log_p.shape[-1]).to(log_p.dtype)


_COMPILED: dict = {}


def _chunk_fn(fn, compiled: bool):
    """``fn`` itself, or its ``torch.compile``d form (built once per process)."""
    if not compiled:
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def fused_distillation_loss(
    h_student: torch.Tensor, w_student: torch.Tensor, h_teacher: torch.Tensor, w_teacher: torch.Tensor,
    temperature: float = 1.0, chunk_tokens: int = 4096, compiled: bool = False,
) -> torch.Tensor:
    """:func:`distillation_loss` of ``h_student @ w_studentᵀ`` against ``h_teacher @ w_teacherᵀ``
    (final hidden states ``[..., D]`` and output embeddings ``[V, D]``) without ever holding the
    full logits: each chunk of tokens is projected, scored, differentiated and dropped
    (:class:`_FusedLinearLoss`). Two full ``[tokens, V]`` float32 logit tensors and their
    log-softmaxes were most of a step's memory and, near the card's limit, of its time.
    The teacher's side carries no gradient. ``compiled``: fuse each chunk's softmax passes.
    """
    hs, ht = h_student.reshape(-1, h_student.shape[-1]), h_teacher.reshape(-1, h_teacher.shape[-1])
    if hs.shape[0] != ht.shape[0]:
        raise ValueError(f"token counts differ: {hs.shape[0]} vs {ht.shape[0]}")
    scale = temperature**2 / hs.shape[0]
    return _FusedLinearLoss.apply(hs, w_student, _chunk_fn(_kl_chunk, compiled), scale, chunk_tokens,
                                  (ht.detach(),), (w_teacher.detach(), temperature))


def fused_next_token_loss(hidden: torch.Tensor, w_out: torch.Tensor, input_ids: torch.Tensor,
                          chunk_tokens: int = 4096, compiled: bool = False) -> torch.Tensor:
    """:func:`next_token_loss` of ``hidden @ w_outᵀ`` (``[B, T, D]``, ``[V, D]``), projected chunk by
    chunk like :func:`fused_distillation_loss`."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = input_ids[:, 1:].reshape(-1)
    return _FusedLinearLoss.apply(h, w_out, _chunk_fn(_ce_chunk, compiled), 1.0 / h.shape[0], chunk_tokens,
                                  (targets,), ())


def generalized_jsd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5, temperature: float = 1.0,
) -> torch.Tensor:
    """Mean over rows of the generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024).

    ``beta`` = 0 is the forward KL(teacher ‖ student) of classic distillation (mass-covering),
    ``beta`` = 1 the reverse KL(student ‖ teacher) (mode-seeking: the student is penalised for
    putting mass where the teacher puts none, e.g. on echoing its system prompt), and in between
    ``beta·KL(teacher ‖ M) + (1−beta)·KL(student ‖ M)`` with ``M = beta·teacher + (1−beta)·student``,
    as TRL's ``GKDTrainer`` defines it. Rows are token positions (``[N, V]`` logits); float32.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0.0:
        per_row = (log_t.exp() * (log_t - log_s)).sum(-1)
    elif beta == 1.0:
        per_row = (log_s.exp() * (log_s - log_t)).sum(-1)
    else:
        log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log(1 - beta)]), dim=0)
        kl_t = (log_t.exp() * (log_t - log_m)).sum(-1)
        kl_s = (log_s.exp() * (log_s - log_m)).sum(-1)
        per_row = beta * kl_t + (1 - beta) * kl_s
    return per_row.mean()

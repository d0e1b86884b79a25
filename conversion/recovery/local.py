"""The local recovery stage: layer-wise attention distillation (no end-to-end backward pass).

Conversion replaces each attention layer by a low-rank MLA approximation independently of
the others, so the cheapest repair is also per layer: feed each converted attention layer
the same inputs the original layer sees and fit its weights (``q_proj``,
``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``) so that its output matches the original
attention output. The partial-RoPE pairs and the MLA layout stay fixed (a
:class:`StructureGuard` pins ``kv_b_proj``'s padding and identity rows), so the result is
servable by vLLM unchanged.

The teacher runs layer by layer over the windows (its residual stream is carried from one
layer to the next), so only one layer's inputs and outputs are ever held in memory: this
scales to 7B models on a CPU. Each layer starts from the SVD solution the converter wrote
and is trained with Adam on the squared relative output error under a cosine learning-rate
decay. The error before and after is measured on held-out windows never trained on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from conversion.recovery.structure import StructureGuard


@dataclass
class LocalOptions:
    steps_per_layer: int = 100
    """Adam steps per layer (each on ``batch_windows`` windows)."""
    batch_windows: int = 4
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    time_budget_s: float | None = None
    """If set, each layer stops early at its share of this budget (so the stage ends on time)."""
    chunk_windows: int = 8
    """Windows per forward chunk when streaming the teacher (bounds peak memory)."""
    seed: int = 0


@dataclass
class LocalReport:
    layers: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    train_tokens: int = 0
    held_out_tokens: int = 0
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        def mean(key: str) -> float:
            return sum(layer[key] for layer in self.layers) / max(1, len(self.layers))

        return {
            "seconds": round(self.seconds, 2),
            "train_tokens": self.train_tokens,
            "held_out_tokens": self.held_out_tokens,
            "options": self.options,
            "mean_held_out_error_before": mean("held_out_error_before"),
            "mean_held_out_error_after": mean("held_out_error_after"),
            "layers": self.layers,
        }


def relative_error(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """‖prediction − target‖ / ‖target‖ over all elements (float64 accumulation)."""
    diff = (prediction.double() - target.double()).norm()
    return float(diff / target.double().norm().clamp_min(1e-30))


def cosine_lr_factor(step: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier: cosine from 1 at step 0 to ``min_ratio`` at ``total``."""
    if total <= 1:
        return 1.0
    progress = min(1.0, step / (total - 1))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _in_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([fn(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)])


class TeacherStream:
    """Walks a Hugging Face Llama-family model layer by layer over fixed windows.

    Computes each decoder layer exactly as the model's own forward does (``h + attn(norm(h))``,
    then ``h + mlp(norm(h))``) with causal attention over each window, so the captured
    attention inputs and outputs are what the full model computes (checked by a test).
    """

    def __init__(self, teacher: nn.Module, input_ids: torch.Tensor, chunk: int):
        self.model = teacher.model
        self.chunk = chunk
        self.seq_len = input_ids.shape[1]
        positions = torch.arange(self.seq_len, device=input_ids.device)[None]
        with torch.no_grad():
            self.hidden = _in_chunks(self.model.embed_tokens, input_ids, chunk).float()
            self.position_embeddings = self.model.rotary_emb(self.hidden[:1], positions)

    @torch.no_grad()
    def attention_io(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed input, attention output) of layer ``layer_idx``, each ``[n, T, D]``."""
        layer = self.model.layers[layer_idx]
        x = _in_chunks(layer.input_layernorm, self.hidden, self.chunk)
        y = _in_chunks(
            lambda xs: layer.self_attn(hidden_states=xs, position_embeddings=self.position_embeddings,
                                       attention_mask=None)[0],
            x,
            self.chunk,
        )
        return x, y

    @torch.no_grad()
    def advance(self, layer_idx: int, attention_output: torch.Tensor) -> None:
        """Moves the residual stream past layer ``layer_idx`` (its attention output given)."""
        layer = self.model.layers[layer_idx]
        self.hidden = self.hidden + attention_output
        self.hidden = self.hidden + _in_chunks(
            lambda h: layer.mlp(layer.post_attention_layernorm(h)), self.hidden, self.chunk
        )


def _student_attention_fn(attn: nn.Module, seq_len: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(seq_len, device=x.device)[None].expand(x.shape[0], -1)
        return attn(x, positions, None)  # no mask: causal over the whole window

    return run


def fit_attention_layer(
    attn: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    options: LocalOptions,
    deadline: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[int, list[float]]:
    """Fits one student attention layer to map ``x`` to ``y`` (both ``[n, T, D]``).

    Adam on ``‖attn(x) − y‖² / ‖y‖²`` per batch of windows, cosine learning-rate decay.
    Returns (steps taken, loss per step). The attention's parameters must be trainable.
    """
    run = _student_attention_fn(attn, x.shape[1])
    params = [p for p in attn.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=options.lr)
    n, b = x.shape[0], min(options.batch_windows, x.shape[0])
    order = torch.randperm(n, generator=generator)
    cursor, losses = 0, []
    for step in range(options.steps_per_layer):
        if deadline is not None and step > 0 and time.perf_counter() > deadline:
            break
        if cursor + b > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        idx = order[cursor : cursor + b]
        cursor += b
        for group in optimizer.param_groups:
            group["lr"] = options.lr * cosine_lr_factor(step, options.steps_per_layer, options.min_lr_ratio)
        target = y[idx]
        loss = (run(x[idx]) - target).pow(2).sum() / target.pow(2).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return len(losses), losses


def run_local_stage(
    student: nn.Module,
    teacher: nn.Module,
    train_ids: torch.Tensor,
    held_out_ids: torch.Tensor,
    options: LocalOptions,
    show_progress: bool = True,
) -> LocalReport:
    """Layer-wise distillation of every attention layer of ``student`` (in place).

    ``train_ids`` / ``held_out_ids``: ``[n, T]`` token windows. The teacher must be the
    original model (same layers, same hidden size). Returns per-layer relative output
    errors before and after on both sets.
    """
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(options.seed)
    teacher.eval()
    was_training = student.training
    student.eval()  # no dropout; gradients still flow
    requires = {p: p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    guard = None
    report = LocalReport(train_tokens=train_ids.numel(), held_out_tokens=held_out_ids.numel(),
                         options=vars(options).copy())
    n_train = train_ids.shape[0]
    stream = TeacherStream(teacher, torch.cat([train_ids, held_out_ids]), options.chunk_windows)
    layers = student.model.layers
    try:
        for layer_idx in tqdm(range(len(layers)), desc="local stage", unit="layer", disable=not show_progress):
            attn = layers[layer_idx].self_attn
            for p in attn.parameters():
                p.requires_grad_(True)
            guard = StructureGuard(attn)
            x, y = stream.attention_io(layer_idx)
            x_train, y_train, x_held, y_held = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
            run = _student_attention_fn(attn, x.shape[1])
            with torch.no_grad():
                train_before = relative_error(_in_chunks(run, x_train, options.chunk_windows), y_train)
                held_before = relative_error(_in_chunks(run, x_held, options.chunk_windows), y_held)
            deadline = None
            if options.time_budget_s is not None:
                deadline = start + options.time_budget_s * (layer_idx + 1) / len(layers)
            t0 = time.perf_counter()
            steps, losses = fit_attention_layer(attn, x_train, y_train, options, deadline, generator)
            guard.restore()
            with torch.no_grad():
                train_after = relative_error(_in_chunks(run, x_train, options.chunk_windows), y_train)
                held_after = relative_error(_in_chunks(run, x_held, options.chunk_windows), y_held)
            guard.remove()
            for p in attn.parameters():
                p.requires_grad_(False)
            report.layers.append({
                "layer": layer_idx, "steps": steps, "seconds": round(time.perf_counter() - t0, 2),
                "train_error_before": train_before, "train_error_after": train_after,
                "held_out_error_before": held_before, "held_out_error_after": held_after,
                "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            })
            stream.advance(layer_idx, y)
    finally:
        for p, flag in requires.items():
            p.requires_grad_(flag)
        student.train(was_training)
    report.seconds = time.perf_counter() - start
    return report

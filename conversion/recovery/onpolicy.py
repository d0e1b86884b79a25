"""The on-policy recovery stage: the student answers, the teacher scores, the student learns.

Distillation on teacher-written text teaches the student the teacher's next token *on the
teacher's path*. At serving time the student walks its own path, and once it drifts (an empty
answer, its system prompt echoed back) nothing in off-policy training ever showed it how to
get back. On-policy distillation (GKD, Agarwal et al. 2024; "on-policy distillation") trains on
the student's own samples: each round the current student, served in vLLM through this
project's plugin, samples answers to fresh chat prompts; the frozen teacher scores every
position of those answers; the student is moved towards the teacher's token distribution
there (generalised JSD, reverse KL at ``beta`` = 1). A share of each round (``1 - lmbda``) is
teacher-written conversations, as GKD alternates on- and off-policy batches.

Why rounds and not TRL's ``GKDTrainer``: GKDTrainer samples with Hugging Face ``generate``
inside every training step, from the training copy of the model. Here generation is the slow
part and must run through the plugin that serves the converted checkpoint (its MLA attention
and latent cache), so each round writes the student as a checkpoint, samples a whole round in
one vLLM engine, then trains on it with Hugging Face's ``Trainer`` (mixed precision, clipping,
schedule). The round's checkpoint is also what ``--resume`` restarts from.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from conversion.errors import ConversionError
from conversion.recovery.chat_data import ChatPrompt
from conversion.recovery.engine_hooks import EngineHooks
from conversion.recovery.global_stage import select_trainable
from conversion.recovery.losses import generalized_jsd
from conversion.recovery.structure import StructureGuard

ROUND_PREFIX = "round-"
DONE_MARKER = "round_done.json"


@dataclass
class OnPolicyOptions:
    rounds: int = 4
    prompts_per_round: int = 256
    max_new_tokens: int = 192
    temperature: float = 1.0
    """Sampling temperature of the student (1: its own distribution, as GKD samples)."""
    beta: float = 0.5
    """Generalised JSD interpolation: 0 forward KL, 1 reverse KL."""
    lmbda: float = 0.5
    """Share of each round's sequences that are the student's own samples (the rest teacher-written)."""
    lr: float = 5e-5
    batch_size: int = 16
    epochs: int = 1
    """Passes over each round's sequences."""
    train: str = "attention"
    seed: int = 0
    time_budget_s: float | None = None
    """Start no new round once this much time has passed (the current round finishes)."""

    def validate(self) -> None:
        if self.rounds < 1 or self.prompts_per_round < 1 or self.max_new_tokens < 1:
            raise ConversionError("--onpolicy-rounds, --onpolicy-prompts and --onpolicy-max-tokens must be positive")
        if not 0.0 <= self.beta <= 1.0:
            raise ConversionError(f"--onpolicy-beta must be in [0, 1], got {self.beta}")
        if not 0.0 < self.lmbda <= 1.0:
            raise ConversionError(f"--onpolicy-lambda must be in (0, 1], got {self.lmbda}")


@dataclass
class OnPolicyReport:
    rounds: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    sampling_seconds: float = 0.0
    sequences: int = 0
    tokens_trained: int = 0

    def to_dict(self) -> dict:
        return dict(vars(self))


def completion_mask(prompt_len: int, total_len: int) -> list[int]:
    """Positions whose next-token distribution is trained: those predicting a completion token.

    Position ``t`` predicts token ``t + 1``, so a sequence of ``prompt_len`` prompt tokens and
    ``total_len - prompt_len`` completion tokens is scored at ``prompt_len - 1 … total_len - 2``.
    """
    if not 0 < prompt_len <= total_len:
        raise ValueError(f"need 0 < prompt_len <= total_len, got {prompt_len}, {total_len}")
    return [1 if prompt_len - 1 <= t < total_len - 1 else 0 for t in range(total_len)]


def onpolicy_examples(prompt_ids: Sequence[list[int]], completions: Sequence[list[int]], max_len: int) -> list[dict]:
    """Training examples of prompt + the student's completion, scored on the completion only.
    Empty completions carry nothing to score and are left out; long ones are cut at ``max_len``."""
    examples = []
    for prompt, completion in zip(prompt_ids, completions):
        if not completion or len(prompt) >= max_len:
            continue
        ids = (list(prompt) + list(completion))[:max_len]
        examples.append({"input_ids": ids, "loss_mask": completion_mask(len(prompt), len(ids))})
    return examples


def teacher_examples(sequences: Sequence[list[int]], count: int, max_len: int, rng: random.Random) -> list[dict]:
    """``count`` teacher-written conversations (whole sequences scored), drawn without replacement
    while they last."""
    if count <= 0 or not sequences:
        return []
    picks = rng.sample(range(len(sequences)), min(count, len(sequences)))
    out = []
    for i in picks:
        ids = list(sequences[i])[:max_len]
        if len(ids) >= 2:
            out.append({"input_ids": ids, "loss_mask": [1] * (len(ids) - 1) + [0]})
    return out


class _Collate:
    """Right-pads a batch (the pad id's positions are masked out; causal attention keeps them
    from influencing real positions, so no attention mask is needed)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.bool)
        for i, b in enumerate(batch):
            ids[i, : len(b["input_ids"])] = torch.tensor(b["input_ids"])
            mask[i, : len(b["loss_mask"])] = torch.tensor(b["loss_mask"], dtype=torch.bool)
        return {"input_ids": ids, "loss_mask": mask}


def masked_divergence(student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                      beta: float, chunk_rows: int = 2048) -> torch.Tensor:
    """Generalised JSD of student and teacher at the masked positions (mean over them).

    Only the masked rows are projected onto the vocabulary, chunk by chunk."""
    hidden = student(input_ids=input_ids, use_cache=False, skip_logits=True).hidden_states[-1]
    with torch.no_grad():
        teacher_hidden = teacher.model(input_ids=input_ids, use_cache=False).last_hidden_state
    rows_s, rows_t = hidden[loss_mask], teacher_hidden[loss_mask]
    w_s = student.get_output_embeddings().weight
    w_t = teacher.get_output_embeddings().weight
    n = rows_s.shape[0]
    if n == 0:
        return hidden.sum() * 0.0
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk_rows):
        s_logits = rows_s[i: i + chunk_rows] @ w_s.T
        with torch.no_grad():
            t_logits = rows_t[i: i + chunk_rows] @ w_t.T
        total = total + generalized_jsd(s_logits, t_logits, beta) * s_logits.shape[0]
    return total / n


class OnPolicyTrainer(Trainer):
    def __init__(self, *args, teacher: nn.Module, beta: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.beta = beta

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = masked_divergence(model, self.teacher, inputs["input_ids"], inputs["loss_mask"], self.beta)
        return (loss, None) if return_outputs else loss


def _training_args(opts: OnPolicyOptions, work_dir: Path, steps: int, round_index: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(work_dir / "trainer"), max_steps=steps, per_device_train_batch_size=opts.batch_size,
        learning_rate=opts.lr, lr_scheduler_type="constant", adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
        save_strategy="no", eval_strategy="no", logging_steps=max(1, steps // 5), report_to="none",
        seed=opts.seed + round_index, bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0,
    )


def latest_round(work_dir: Path) -> int | None:
    """The last round whose starting checkpoint was written completely (its config.json exists:
    checkpoints are written atomically)."""
    done = [int(p.name[len(ROUND_PREFIX):]) for p in work_dir.glob(f"{ROUND_PREFIX}*")
            if p.name[len(ROUND_PREFIX):].isdigit() and (p / "config.json").is_file()]
    return max(done, default=None)


@torch.no_grad()
def divergence_on(student: nn.Module, teacher: nn.Module, examples: Sequence[dict], beta: float, pad_id: int,
                  batch_size: int = 16) -> float:
    """Mean generalised JSD over the scored positions of ``examples`` (token-weighted)."""
    was = student.training
    student.eval()
    collate, total, count = _Collate(pad_id), 0.0, 0
    device = next(student.parameters()).device
    for i in range(0, len(examples), batch_size):
        batch = collate(list(examples[i: i + batch_size]))
        n = int(batch["loss_mask"].sum())
        if n:
            total += float(masked_divergence(student, teacher, batch["input_ids"].to(device),
                                             batch["loss_mask"].to(device), beta)) * n
            count += n
    student.train(was)
    return total / count if count else float("nan")


def run_onpolicy_stage(
    student: nn.Module, teacher: nn.Module, tokenizer, hooks: EngineHooks, prompts_for_round: Callable[[int], list[ChatPrompt]],
    save_student: Callable[[Path], None], load_student: Callable[[Path], None], opts: OnPolicyOptions, work_dir: Path,
    teacher_sequences: Sequence[list[int]] = (), max_len: int = 1024, resume: bool = False, log=print,
) -> OnPolicyReport:
    """Runs ``opts.rounds`` rounds of sample → score → train on ``student`` in place.

    ``prompts_for_round(k)``: round k's chat prompts (fresh each round); ``save_student(path)``
    writes the student as a servable checkpoint; ``load_student(path)`` reads one back (resume).
    """
    opts.validate()
    if not getattr(tokenizer, "chat_template", None):
        raise ConversionError("the on-policy stage samples chat answers, but the model's tokenizer has no chat "
                              "template; use --stage global (with --synthesize for continuations) for a base model")
    work_dir.mkdir(parents=True, exist_ok=True)
    start_round = 0
    if resume:
        last = latest_round(work_dir)
        if last is None:
            raise ConversionError(f"--resume: no complete on-policy round under {work_dir}")
        load_student(work_dir / f"{ROUND_PREFIX}{last}")
        start_round = last
        log(f"on-policy: resuming at round {last + 1} from {work_dir / f'{ROUND_PREFIX}{last}'}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    report = OnPolicyReport()
    t0 = time.perf_counter()
    rng = random.Random(opts.seed)
    select_trainable(student, opts.train)
    guard = StructureGuard(student)
    try:
        for k in range(start_round, opts.rounds):
            if opts.time_budget_s is not None and time.perf_counter() - t0 > opts.time_budget_s and k > start_round:
                log(f"on-policy: time budget reached after {k - start_round} rounds")
                break
            ckpt = work_dir / f"{ROUND_PREFIX}{k}"
            if not (ckpt / "config.json").is_file():
                save_student(ckpt)
            prompts = prompts_for_round(k)
            prompt_ids = [tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=True)
                          for p in prompts]
            prompt_ids = [list(ids["input_ids"] if hasattr(ids, "keys") else ids) for ids in prompt_ids]
            prompt_ids = [ids for ids in prompt_ids if len(ids) + opts.max_new_tokens <= max_len]
            if not prompt_ids:
                raise ConversionError(f"on-policy round {k}: every prompt is longer than {max_len} - "
                                      f"{opts.max_new_tokens} tokens; raise --seq-len or lower --onpolicy-max-tokens")
            ts = time.perf_counter()
            try:
                completions = hooks.sample_completions(ckpt, prompt_ids, opts.max_new_tokens, opts.temperature,
                                                       opts.seed + k)
            except Exception as exc:  # noqa: BLE001 - engine death, OOM: keep the resumable state, say so
                raise ConversionError(
                    f"on-policy round {k}: sampling the student in {hooks.name} failed ({type(exc).__name__}: "
                    f"{str(exc)[-400:]}); the student before this round is saved in {ckpt}: rerun with --resume "
                    f"and --work-dir {work_dir.parent}") from None
            sampling = time.perf_counter() - ts
            on = onpolicy_examples(prompt_ids, completions, max_len)
            n_teacher = round(len(on) * (1 - opts.lmbda) / opts.lmbda) if opts.lmbda < 1 else 0
            off = teacher_examples(teacher_sequences, n_teacher, max_len, rng)
            examples = on + off
            random.Random(opts.seed + k).shuffle(examples)
            before = divergence_on(student, teacher, on[: 4 * opts.batch_size], opts.beta, pad_id)
            steps = max(1, math.ceil(len(examples) * opts.epochs / opts.batch_size))
            trainer = OnPolicyTrainer(model=student, args=_training_args(opts, work_dir, steps, k),
                                      train_dataset=examples, data_collator=_Collate(pad_id), teacher=teacher,
                                      beta=opts.beta)
            trainer.train()
            guard.restore()
            after = divergence_on(student, teacher, on[: 4 * opts.batch_size], opts.beta, pad_id)
            empty = sum(1 for c in completions if not _visible(tokenizer, c)) / max(1, len(completions))
            row = {"round": k, "prompts": len(prompts), "onpolicy_sequences": len(on), "teacher_sequences": len(off),
                   "mean_completion_tokens": sum(map(len, completions)) / max(1, len(completions)),
                   "empty_answers": empty, "divergence_before": before, "divergence_after": after,
                   "steps": steps, "sampling_seconds": round(sampling, 1)}
            report.rounds.append(row)
            report.sampling_seconds += sampling
            report.sequences += len(examples)
            report.tokens_trained += sum(len(e["input_ids"]) for e in examples) * opts.epochs
            log(f"on-policy round {k}: {len(on)} student + {len(off)} teacher sequences, empty answers "
                f"{100 * empty:.1f}%, divergence on its samples {before:.4f} -> {after:.4f} ({sampling:.0f} s sampling)")
            (ckpt / DONE_MARKER).write_text(json.dumps(row) + "\n")
    finally:
        guard.remove()
        shutil.rmtree(work_dir / "trainer", ignore_errors=True)
    guard.restore()
    report.seconds = round(time.perf_counter() - t0, 1)
    return report


def _visible(tokenizer, ids: Sequence[int]) -> bool:
    return bool(tokenizer.decode(list(ids), skip_special_tokens=True).strip())

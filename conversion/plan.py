"""Planning a conversion: options checked against the source model, the output layout fixed.

:func:`plan_conversion` turns :class:`ConvertOptions` into a :class:`ConversionPlan` (no output
yet); :func:`select_rope_pairs` picks the rotary pairs each layer keeps; :func:`plan_config` is
the converted model's config.json (the format's writer, :func:`conversion.mla_format.spec.build_config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from conversion import rope
from conversion.calibration import DEFAULT_CALIB_SEQ_LEN, DEFAULT_CALIB_TOKENS, CalibrationStats
from conversion.errors import ConversionError
from conversion.lowrank import SVD_METHODS
from conversion.mla_format.layout import (
    DEFAULT_NATIVE_HEAD_SIZE,
    NATIVE_HEAD_SIZES,
    MLALayout,
    max_d_kv_for_cache,
    plan_exact_layout,
    plan_native_layout,
)
from conversion.mla_format.spec import build_config
from conversion.retrieval import (
    DEFAULT_RETRIEVAL_BAND,
    DEFAULT_RETRIEVAL_HEADS,
    DEFAULT_RETRIEVAL_PAIRS,
    DEFAULT_RETRIEVAL_PROMPTS,
    DEFAULT_RETRIEVAL_TOKENS,
    MIN_RETRIEVAL_TOKENS,
)
from conversion.source import TOKENIZER_VOCAB_FILES, SourceSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ConvertOptions:
    rope_dim: int
    strategy: str = "2-norm"
    d_kv: int | None = None
    kv_budget: int | None = None
    svd: str = "joint"
    calib_text: Path | None = None
    dtype: str | None = None
    calib_tokens: int = DEFAULT_CALIB_TOKENS
    calib_seq_len: int = DEFAULT_CALIB_SEQ_LEN
    uniform_offset: int = 0
    overwrite: bool = False
    cache_dir: Path | None = None
    layout: str = "auto"
    """auto: vLLM-native 576 when it fits and costs at most NATIVE_PADDING_TOLERANCE more cache
    than the exact sizes, else exact sizes; native; exact."""
    force: bool = False
    """Allow a layout or budget whose cache is larger than the original MHA cache."""
    kv_budget_total: int | None = None
    """Cached values per token summed over layers (latent + rotary keys), for ``allocate``."""
    allocate: str = "uniform"
    """uniform: every layer the same latent; measured: per-layer latents where a measured
    truncation cost says they matter most (``conversion.sensitivity``), same total."""
    rank_step: int = 16
    """Per-layer latents are multiples of this (aligned kernel tiles)."""
    sensitivity_tokens: int = 2048
    """Calibration tokens on which ``allocate=measured`` measures each layer's truncation cost."""
    allocation_passes: int = 1
    """``allocate=measured``: passes of measure → allocate, each around the last allocation; with
    more than one, the allocation of lowest measured KL among those visited is kept."""
    layer_latent: list[int] | None = None
    """Each layer's latent width, given outright (instead of ``d_kv`` and an allocation)."""
    layer_rope: list[int] | None = None
    """Each layer's rotary dims per head, given outright with ``layer_latent`` (``rope_dim`` is
    then ignored): layers differ in how much their keys need rotation kept exact."""
    rope_choices: list[int] | None = None
    """``allocate=measured``: rotary dims per head each layer may take (``rope_dim`` is the uniform
    operating point the costs are measured around), chosen with the latent widths under the same
    total of cached values."""
    retrieval_heads: float = DEFAULT_RETRIEVAL_HEADS
    """``strategy=retrieval``: share of all kv-heads (highest retrieval score first) that keep
    their lowest-frequency pairs."""
    retrieval_pairs: float = DEFAULT_RETRIEVAL_PAIRS
    """``strategy=retrieval``: share of a retrieval head's kept pairs forced from ``retrieval_band``;
    the rest go by 2-norm score."""
    retrieval_band: str = DEFAULT_RETRIEVAL_BAND
    """``strategy=retrieval``: ``low`` (the slowest pairs, the default) or ``high`` (the fastest)."""
    retrieval_prompts: int = DEFAULT_RETRIEVAL_PROMPTS
    """``strategy=retrieval``: calibration prompts (a fact buried in training paragraphs, then a
    question about it) on which the retrieval scores are measured."""
    retrieval_tokens: int | None = None
    """``strategy=retrieval``: length of each calibration prompt in tokens (None:
    ``DEFAULT_RETRIEVAL_TOKENS``, or the model's context where that is shorter)."""


LAYOUTS = ("auto", "native", "exact")
CALIBRATED_STRATEGIES = ("2-norm", "retrieval")
"""Strategies whose pairs come from calibration statistics (``retrieval`` uses the 2-norm scores too)."""
ALLOCATIONS = ("uniform", "measured", "retrieval-band")
WIDE_FACTOR = 2
"""``allocate=measured`` lets a layer take at most this many times the average latent."""
NATIVE_PER_LAYER = "per-layer latent widths are written with exact sizes; drop --layout native"
NATIVE_PADDING_TOLERANCE = 0.10
"""``--layout auto`` pads to a vLLM-native row (for vLLM's own MLA kernels) only while the padding
costs at most this share of the essential values."""


def max_latent_rank(spec: SourceSpec, rope_dim: int) -> int:
    """The widest latent a layer can use: the rank of its stacked non-rotary key and value rows."""
    return min(spec.num_kv_heads * (2 * spec.head_dim - rope_dim), spec.hidden_size)


def _refuse_larger_cache(cache_values: int, original_values: int, what: str, force: bool) -> None:
    """A conversion exists to shrink the KV cache: one that grows it needs ``--force``."""
    if cache_values > original_values and not force:
        raise ConversionError(
            f"{what} makes vLLM cache {cache_values} values per token per layer, more than the original model's "
            f"{original_values} (+{100 * (cache_values / original_values - 1):.1f}%): the converted model would "
            "hold fewer tokens in the same memory. Use --d-kv with --layout exact (or auto), or pass --force"
        )


@dataclass
class ConversionPlan:
    spec: SourceSpec
    layout: MLALayout
    options: ConvertOptions
    dtype: torch.dtype
    notes: list[str] = field(default_factory=list)
    latent_total: int | None = None
    """Latent dims summed over layers that a per-layer allocation hands out (None: uniform)."""
    layer_latent: list[int] | None = None
    """Each layer's latent once allocated (None: every layer has ``layout.latent_width``)."""
    layer_rope: list[int] | None = None
    """Each layer's rotary dims per head (None: every layer has ``layout.rope_dim``)."""

    @property
    def needs_calibration(self) -> bool:
        return self.options.strategy in CALIBRATED_STRATEGIES or self.options.svd == "aw-joint" \
            or self.latent_total is not None

    def layer_layout(self, layer: int) -> MLALayout:
        return self.layout.for_layer(None if self.layer_latent is None else self.layer_latent[layer],
                                     None if self.layer_rope is None else self.layer_rope[layer])

    @property
    def layer_layouts(self) -> list[MLALayout]:
        return [self.layer_layout(i) for i in range(self.spec.num_layers)]


def plan_conversion(spec: SourceSpec, options: ConvertOptions) -> ConversionPlan:
    """Checks every option against the model and fixes the output layout."""
    h, g, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    rope.check_rope_dim(options.rope_dim, d)
    if options.strategy not in rope.STRATEGIES:
        raise ConversionError(f"unknown --strategy {options.strategy!r}; choose one of {', '.join(rope.STRATEGIES)}")
    if options.svd not in SVD_METHODS:
        raise ConversionError(f"unknown --svd {options.svd!r}; choose one of {', '.join(SVD_METHODS)}")
    if options.strategy == "uniform":
        rope.select_pairs_fixed("uniform", options.rope_dim // 2, d // 2, options.uniform_offset)
    if options.strategy == "retrieval" or options.allocate == "retrieval-band":
        _check_retrieval_options(spec, options)
    if options.allocate not in ALLOCATIONS:
        raise ConversionError(f"unknown --allocate {options.allocate!r}; choose one of {', '.join(ALLOCATIONS)}")
    if options.layout not in LAYOUTS:
        raise ConversionError(f"unknown --layout {options.layout!r}; choose one of {', '.join(LAYOUTS)}")
    if options.layer_latent is not None:
        return _plan_given_widths(spec, options)
    if options.layer_rope is not None:
        raise ConversionError("--layer-rope goes with --layer-latent (each layer's latent width given too)")
    if options.rope_choices and options.allocate != "measured":
        raise ConversionError("--rope-choices goes with --allocate measured (it measures which rotary dims each "
                              "layer needs); to give them outright use --layer-latent with --layer-rope")
    if options.allocate != "uniform":
        return _plan_allocation(spec, options)
    if options.kv_budget_total is not None:
        raise ConversionError("--kv-budget-total is a budget for --allocate measured; with uniform layers give --d-kv")
    if (options.d_kv is None) == (options.kv_budget is None):
        raise ConversionError("give exactly one of --d-kv and --kv-budget")
    if options.kv_budget is not None and options.layout == "exact":
        raise ConversionError("--kv-budget fills a vLLM-native cache size; use --d-kv with --layout exact")
    notes: list[str] = []
    max_rank = max_latent_rank(spec, options.rope_dim)
    if options.kv_budget is not None:
        if options.kv_budget not in NATIVE_HEAD_SIZES:
            raise ConversionError(f"--kv-budget must be one of {NATIVE_HEAD_SIZES}, got {options.kv_budget}")
        d_kv = min(max_d_kv_for_cache(g, options.rope_dim, options.kv_budget), max_rank // g)
        if d_kv < 1:
            raise ConversionError(
                f"--kv-budget {options.kv_budget} is impossible for this model: {g} kv-heads × "
                f"rope_dim {options.rope_dim} leave no room for a latent; lower --rope-dim"
            )
        layout = plan_native_layout(h, g, d, options.rope_dim, d_kv, options.kv_budget)
        _refuse_larger_cache(layout.cache_values, 2 * g * d, f"--kv-budget {options.kv_budget}", options.force)
    else:
        d_kv = options.d_kv
        if d_kv < 1:
            raise ConversionError(f"--d-kv {d_kv} must be at least 1 (the latent's dims per kv-head); to keep more "
                                  "rotary dims instead, raise --rope-dim and lower --d-kv")
        if g * d_kv > max_rank:
            raise ConversionError(
                f"--d-kv {d_kv} is too large: the latent (kv-heads × d_kv = {g * d_kv}) cannot exceed "
                f"rank {max_rank} (min of hidden size and key+value rows); use --d-kv <= {max_rank // g}"
            )
        fits_native = d_kv <= max_d_kv_for_cache(g, options.rope_dim, DEFAULT_NATIVE_HEAD_SIZE) and d <= 192
        if options.layout == "native" and not fits_native:
            raise ConversionError(
                f"--d-kv {d_kv} with --rope-dim {options.rope_dim} needs {g * (d_kv + options.rope_dim)} values "
                f"per token, more than vLLM's native {DEFAULT_NATIVE_HEAD_SIZE}; lower them or use --layout exact"
            )
        essential = g * (d_kv + options.rope_dim)
        cheap_padding = DEFAULT_NATIVE_HEAD_SIZE <= (1 + NATIVE_PADDING_TOLERANCE) * essential
        if options.layout == "native" or (options.layout == "auto" and fits_native and cheap_padding):
            layout = plan_native_layout(h, g, d, options.rope_dim, d_kv, DEFAULT_NATIVE_HEAD_SIZE)
            _refuse_larger_cache(layout.cache_values, 2 * g * d, "--layout native", options.force)
        else:
            layout = plan_exact_layout(h, g, d, options.rope_dim, d_kv)
            if options.layout == "auto":
                why = (f"padding them to vLLM's native {DEFAULT_NATIVE_HEAD_SIZE} would cost "
                       f"{100 * (DEFAULT_NATIVE_HEAD_SIZE / essential - 1):.0f}% more cache") if fits_native else \
                    f"they do not fit vLLM's native MLA sizes {NATIVE_HEAD_SIZES}"
                notes.append(f"{layout.essential_values} values per token: {why}; written with exact sizes "
                             "(served by this plugin's own backend; --layout native to pad)")
    return ConversionPlan(spec, layout, options, _check_dtype_and_calibration(spec, options), notes + list(spec.warnings))


def _check_retrieval_options(spec: SourceSpec, options: ConvertOptions) -> None:
    rope.check_share(options.retrieval_heads, "--retrieval-heads")
    rope.check_share(options.retrieval_pairs, "--retrieval-pairs")
    if options.retrieval_band not in rope.RETRIEVAL_BANDS:
        raise ConversionError(f"unknown --retrieval-band {options.retrieval_band!r}; choose one of "
                              f"{', '.join(rope.RETRIEVAL_BANDS)}")
    if options.retrieval_prompts < 1:
        raise ConversionError(f"--retrieval-prompts must be at least 1, got {options.retrieval_prompts}")
    if options.retrieval_tokens is not None and \
            not MIN_RETRIEVAL_TOKENS <= options.retrieval_tokens <= spec.max_position_embeddings:
        raise ConversionError(
            f"--retrieval-tokens {options.retrieval_tokens} must lie in [{MIN_RETRIEVAL_TOKENS}, "
            f"{spec.max_position_embeddings}] (long enough to bury a fact in paragraphs, within the model's context)")


def _check_dtype_and_calibration(spec: SourceSpec, options: ConvertOptions) -> torch.dtype:
    if options.dtype is not None and options.dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {', '.join(DTYPES)}")
    dtype_name = options.dtype or (spec.torch_dtype if spec.torch_dtype in DTYPES else "float32")
    if options.strategy in CALIBRATED_STRATEGIES or options.svd == "aw-joint" or options.allocate != "uniform":
        if options.calib_text is not None and not Path(options.calib_text).is_file():
            raise ConversionError(f"calibration text {options.calib_text} does not exist")
        if options.calib_text is None and not any((spec.path / f).is_file() for f in TOKENIZER_VOCAB_FILES):
            raise ConversionError(
                f"--strategy {options.strategy} / --svd {options.svd} calibrate on text tokenised with the model's "
                f"tokenizer, and {spec.path} has none: add its tokenizer files, or choose options that need no "
                "calibration (--strategy high|low|uniform with --svd joint|split, --allocate uniform)"
            )
    return DTYPES[dtype_name]


def _plan_given_widths(spec: SourceSpec, options: ConvertOptions) -> ConversionPlan:
    """``--layer-latent R1,R2,...``: one latent width per layer, exact layout."""
    widths = list(options.layer_latent)
    if options.d_kv is not None or options.kv_budget is not None or options.kv_budget_total is not None \
            or options.allocate != "uniform":
        raise ConversionError("--layer-latent gives every layer's width itself: drop --d-kv / --kv-budget / "
                              "--kv-budget-total / --allocate")
    if options.layout == "native":
        raise ConversionError(NATIVE_PER_LAYER)
    if len(widths) != spec.num_layers:
        raise ConversionError(f"--layer-latent lists {len(widths)} widths for a model of {spec.num_layers} layers")
    ropes = [options.rope_dim] * spec.num_layers if options.layer_rope is None else list(options.layer_rope)
    if len(ropes) != spec.num_layers:
        raise ConversionError(f"--layer-rope lists {len(ropes)} rotary widths for a model of {spec.num_layers} layers")
    for r in set(ropes):
        rope.check_rope_dim(r, spec.head_dim)
    for i, (w, r) in enumerate(zip(widths, ropes)):
        max_rank = max_latent_rank(spec, r)
        if not 1 <= w <= max_rank:
            raise ConversionError(f"--layer-latent width {w} of layer {i} must lie in [1, {max_rank}] (the rank of "
                                  f"its key and value rows with {r} rotary dims per head)")
    _refuse_larger_total(spec, options, sum(widths), "--layer-latent", rope_total=spec.num_kv_heads * sum(ropes))
    plan = _per_layer_plan(spec, options, sum(widths), max(widths), [], layer_latent=widths)
    if options.layer_rope is not None:
        plan.layout = plan.layout.with_rope(max(ropes))
        plan.layer_rope = ropes
    return plan


def _refuse_larger_total(spec: SourceSpec, options: ConvertOptions, latent_total: int, what: str,
                         rope_total: int | None = None) -> None:
    """A per-layer budget may not cache more, summed over layers, than the original (``--force``).
    ``rope_total``: rotary values summed over layers (default: ``rope_dim`` in every layer)."""
    g, layers = spec.num_kv_heads, spec.num_layers
    rope_total = g * options.rope_dim * layers if rope_total is None else rope_total
    cache, original = latent_total + rope_total, 2 * g * spec.head_dim * layers
    if cache > original and not options.force:
        raise ConversionError(f"{what} caches {cache} values per token, more than the original model's "
                              f"{original}; lower it or pass --force")


def _per_layer_plan(spec: SourceSpec, options: ConvertOptions, latents: int, widest: int, notes: list[str],
                    **fields) -> ConversionPlan:
    """What both per-layer planners end with: the exact layout, ``layout`` describing the widest
    layer and ``d_kv`` the average per kv-head of ``latents`` (summed over layers)."""
    g = spec.num_kv_heads
    layout = plan_exact_layout(spec.num_heads, g, spec.head_dim, options.rope_dim,
                               max(1, latents // spec.num_layers // g)).with_latent(widest)
    return ConversionPlan(spec, layout, options, _check_dtype_and_calibration(spec, options),
                          notes + list(spec.warnings), **fields)


def _plan_allocation(spec: SourceSpec, options: ConvertOptions) -> ConversionPlan:
    """Checks a per-layer budget: exact layout, a total that gives every layer at least one
    aligned group, no layer past the rank its key/value rows allow, no cache past the original's."""
    g, layers = spec.num_kv_heads, spec.num_layers
    step, rope_total = options.rank_step, g * options.rope_dim
    if options.kv_budget is not None or (options.d_kv is None) == (options.kv_budget_total is None):
        raise ConversionError(f"--allocate {options.allocate} takes its budget from exactly one of --d-kv (the "
                              "average per kv-head) and --kv-budget-total (values per token summed over layers)")
    if options.allocate == "retrieval-band" and (options.rope_choices or options.allocation_passes != 1):
        raise ConversionError("--rope-choices and --allocation-passes measure costs: they go with --allocate measured, "
                              "not retrieval-band")
    if options.layout == "native":
        raise ConversionError(NATIVE_PER_LAYER)
    if step < 1:
        raise ConversionError(f"--rank-step must be positive, got {step}")
    if options.allocation_passes < 1:
        raise ConversionError(f"--allocation-passes must be at least 1, got {options.allocation_passes}")
    if options.rope_choices:
        for r in options.rope_choices:
            rope.check_rope_dim(r, spec.head_dim)
        if options.allocation_passes > 1:
            raise ConversionError("--allocation-passes > 1 refines latent widths only; drop it with --rope-choices")
    total = g * options.d_kv * layers if options.d_kv is not None else options.kv_budget_total - rope_total * layers
    if total < step * layers:
        raise ConversionError(
            f"a budget of {total + rope_total * layers} cached values per token ({total} latent dims after "
            f"{rope_total} rotary dims in each of {layers} layers) cannot give every layer one group of {step} "
            f"latent dims; give at least {(step + rope_total) * layers}")
    _refuse_larger_total(spec, options, total, "this budget")
    max_rank = max_latent_rank(spec, options.rope_dim) // step * step
    notes = []
    if total % step:
        notes.append(f"latent budget {total} rounded down to {total // step * step}, a multiple of --rank-step {step}")
        total = total // step * step
    if total > max_rank * layers:
        raise ConversionError(f"a latent budget of {total} dims exceeds what {layers} layers can use "
                              f"({max_rank} each: the rank of their key and value rows)")
    widest = min(max_rank, max(step, WIDE_FACTOR * total // layers // step * step))
    return _per_layer_plan(spec, options, total, widest, notes, latent_total=total)


def select_rope_pairs(plan: ConversionPlan, stats: CalibrationStats | None) -> list[list[list[int]]]:
    """``[layer][kv_head] → pairs`` for the chosen strategy."""
    spec, opts = plan.spec, plan.options
    n = spec.head_dim // 2
    kept = [plan.layer_layout(i).rope_dim // 2 for i in range(spec.num_layers)]
    if opts.strategy == "2-norm":
        assert stats is not None
        return [rope.select_pairs_by_score(stats.pair_scores[i], r).tolist() for i, r in enumerate(kept)]
    if opts.strategy == "retrieval":
        assert stats is not None and stats.retrieval is not None
        mask = rope.retrieval_head_mask(stats.retrieval.head_scores, opts.retrieval_heads)
        return [rope.select_pairs_retrieval(stats.pair_scores[i], mask[i], r, opts.retrieval_pairs,
                                            opts.retrieval_band).tolist()
                for i, r in enumerate(kept)]
    return [[rope.select_pairs_fixed(opts.strategy, r, n, opts.uniform_offset) for _ in range(spec.num_kv_heads)]
            for r in kept]


def retrieval_tokens(spec: SourceSpec, options: ConvertOptions) -> int:
    """Length of the retrieval calibration prompts: as given, else the default within the model's context."""
    if options.retrieval_tokens is not None:
        return options.retrieval_tokens
    return min(DEFAULT_RETRIEVAL_TOKENS, spec.max_position_embeddings)


def retrieval_report(plan: ConversionPlan, stats: CalibrationStats | None) -> dict | None:
    """What ``--strategy retrieval`` chose, for the report: the retrieval heads (layer, kv-head,
    score), best first, how many pairs of its band each keeps, and the calibration it measured."""
    opts = plan.options
    if opts.strategy != "retrieval" or stats is None or stats.retrieval is None:
        return None
    scores = stats.retrieval.head_scores
    mask = rope.retrieval_head_mask(scores, opts.retrieval_heads)
    heads = sorted(((float(scores[i, j]), i, j) for i, j in mask.nonzero().tolist()), reverse=True)
    return {"retrieval_heads": opts.retrieval_heads, "retrieval_pairs": opts.retrieval_pairs,
            "retrieval_band": opts.retrieval_band,
            "heads": [{"layer": i, "kv_head": j, "score": round(s, 5),
                       "forced_pairs": rope.retrieval_forced_pairs(plan.layer_layout(i).rope_dim // 2,
                                                                   opts.retrieval_pairs)}
                      for s, i, j in heads],
            "head_scores": scores.round(decimals=5).tolist(), **stats.retrieval.summary()}


def plan_config(plan: ConversionPlan, pairs: list[list[list[int]]]) -> dict:
    """config.json of the model ``plan`` converts to (the format's writer, :func:`build_config`)."""
    opts = plan.options
    return build_config(plan.spec, plan.layout, pairs, {v: k for k, v in DTYPES.items()}[plan.dtype],
                        strategy=opts.strategy, svd=opts.svd, layer_latent=plan.layer_latent,
                        layer_rope=plan.layer_rope,
                        allocation="given" if opts.layer_latent is not None else opts.allocate)

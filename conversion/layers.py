"""Converting every layer of a plan: the per-layer math and the checkpoint it writes.

:func:`convert_attention` is one layer's MHA → MLA attention weights (pure);
:func:`write_checkpoint` converts every layer of a :class:`~conversion.plan.ConversionPlan` into
the MLA checkpoint folder (written atomically) with its report.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from conversion import rope
from conversion.accounting import KVAccounting
from conversion.calibration import CalibrationStats
from conversion.checkpoint import ShardWriter, atomic_output_folder, write_json
from conversion.lowrank import factorize_kv, relative_output_error, relative_weight_error
from conversion.mla_format.layout import MLALayout
from conversion.plan import ConversionPlan, plan_config, retrieval_report
from conversion.source import TOKENIZER_FILES, SourceWeights


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
    low = factorize_kv(w_k_nope, w_v, lay.latent_width, svd, second_moment)
    out = {
        "q_proj.weight": w_q[q_rows],
        "kv_a_proj_with_mqa.weight": torch.cat([low.w_down, w_k[k_rope_rows]]),
        "kv_b_proj.weight": lay.build_kv_b_proj(low.w_up_k, low.w_up_v),
        "o_proj.weight": w_o,
    }
    if b_q is not None:
        out["q_proj.bias"] = b_q[q_rows]
    if b_k is not None:
        out["kv_a_proj_with_mqa.bias"] = torch.cat([b_k.new_zeros(lay.latent_width), b_k[k_rope_rows]])
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
        errors["latent_energy_kept"] = float(low.energy[: lay.latent_width].sum() / low.energy.sum().clamp_min(1e-300))
    return out, errors, low.energy


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
            layer_errors.append({"layer": i, "latent": plan.layer_layout(i).latent_width, **errors})
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
        if (retrieval := retrieval_report(plan, stats)) is not None:
            report["retrieval"] = retrieval
        write_json(tmp / "mha2mla_report.json", report)
    return report

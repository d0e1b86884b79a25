"""Per-layer latent widths (issue 13): the allocation math, the measured truncation costs,
conversion with ``--allocate measured``, the format, and serving each layer at its own width."""

import itertools
import json
import random

import pytest
import torch

from conversion import ConvertOptions, convert, load_reference
from conversion.accounting import KVAccounting
from conversion.allocation import allocate_by_cost, allocate_options, interpolate_cost
from conversion.errors import ConversionError
from conversion.mla_format.layout import MLALayout, plan_exact_layout
from conversion.mla_format.spec import MHA2MLASpec
from conversion.validate import check_checkpoint
from tests.helpers import TinySpec, short_prompts
from tests.helpers import prompts_sharing_a_prefix as prompts_sharing_a_prefix_of  # the fixture's name

SPEC = TinySpec(num_heads=4, num_kv_heads=2, head_dim=32, hidden_size=128, num_layers=4)
OPTIONS = dict(rope_dim=8, strategy="2-norm", svd="aw-joint", d_kv=16, allocate="measured", rank_step=8,
               calib_tokens=2048, sensitivity_tokens=512, dtype="float32")


# -- pure pieces ---------------------------------------------------------------------------

def test_allocation_by_cost_is_optimal():
    """Exhaustive search over every allocation of the budget agrees with the DP, costs not convex."""
    rng = random.Random(0)
    for _ in range(20):
        costs = [{r: rng.random() * (5 - r / 8) for r in range(8, 41, 8)} for _ in range(4)]
        for c in costs:
            c[40] = 0.0
        total = rng.choice([64, 80, 96, 112])
        got = allocate_by_cost(costs, total, step=8)
        assert sum(got) == total and all(r % 8 == 0 and 8 <= r <= 40 for r in got)
        best = min((combo for combo in itertools.product(range(8, 41, 8), repeat=4) if sum(combo) == total),
                   key=lambda combo: sum(c[r] for c, r in zip(costs, combo)))
        assert sum(c[r] for c, r in zip(costs, got)) == pytest.approx(sum(c[r] for c, r in zip(costs, best)))


def test_allocation_over_measured_options_is_optimal():
    """Each layer picks one of its own measured option sizes (uneven, e.g. rotary + latent values);
    exhaustive search over every pick within the budget agrees with the DP."""
    rng = random.Random(1)
    for _ in range(20):
        costs = [{size: rng.random() * 5 for size in rng.sample([24, 40, 48, 56, 72, 88, 96, 120], 4)}
                 for _ in range(4)]
        total = sum(min(c) for c in costs) + rng.choice([0, 8, 40, 100, 400])
        got = allocate_options(costs, total)
        assert all(size in c for c, size in zip(costs, got)) and sum(got) <= total
        best = min((combo for combo in itertools.product(*(sorted(c) for c in costs)) if sum(combo) <= total),
                   key=lambda combo: sum(c[s] for c, s in zip(costs, combo)))
        assert sum(c[s] for c, s in zip(costs, got)) == pytest.approx(sum(c[s] for c, s in zip(costs, best)))
    with pytest.raises(ConversionError, match="below the narrowest option of every layer"):
        allocate_options([{24: 1.0, 48: 0.5}, {40: 1.0}], 60)
    with pytest.raises(ConversionError, match="at least one measured option"):
        allocate_options([{24: 1.0}, {}], 100)


def test_cost_interpolation_and_budget_errors():
    measured = {16: 2.0, 32: 1.0, 64: 0.0}
    assert interpolate_cost(measured, 24) == pytest.approx(1.5)
    assert interpolate_cost(measured, 48) == pytest.approx(0.5)
    assert interpolate_cost(measured, 8) == pytest.approx(2.5)  # extrapolated below the narrowest
    assert interpolate_cost(measured, 80) == 0.0
    with pytest.raises(ConversionError, match="cannot give each of 2 layers 16"):
        allocate_by_cost([measured, measured], 16, step=16)
    with pytest.raises(ConversionError, match="exceeds what the layers can use"):
        allocate_by_cost([measured, measured], 160, step=16)
    with pytest.raises(ConversionError, match="not a multiple"):
        allocate_by_cost([measured, measured], 40, step=16)


def test_layout_latent_width_and_old_configs():
    lay = plan_exact_layout(4, 2, 32, 8, 16)
    assert lay.latent_width == 32 and lay.kv_lora_rank == 32
    old = {k: v for k, v in lay.to_dict().items() if k != "latent_dim"}  # written before per-layer widths
    assert MLALayout.from_dict(old) == lay
    narrow = lay.with_latent(8)
    assert (narrow.latent_width, narrow.kv_lora_rank, narrow.cache_values) == (8, 8, 8 + 16)
    assert narrow.kv_gather_index.tolist()[:8] == list(range(8))
    acc = KVAccounting.from_layouts([lay.with_latent(8), lay.with_latent(24)])
    assert acc.essential_values == 16 + 16 and acc.original_values == 128


@pytest.mark.slow
def test_spec_refuses_inconsistent_per_layer_widths(per_layer):
    config = json.loads((per_layer / "config.json").read_text())
    section = config["mha2mla"]
    spec = MHA2MLASpec.from_config(config)
    assert spec.per_layer and [spec.layer_layout(i).latent_width for i in range(4)] == section["layer_kv_lora_rank"]
    for bad, message in (([8, 8, 8], "has 3 entries for 4 layers"), ([8, 8, 8, 999], "must lie in")):
        with pytest.raises(ValueError, match=message):
            MHA2MLASpec.from_config({**config, "mha2mla": {**section, "layer_kv_lora_rank": bad}})


def test_layer_width_view():
    from vllm_mha2mla.attention.metadata import layer_width_view

    workspace = torch.arange(4 * 6.0).view(4, 6)
    view = layer_width_view(workspace, 4)
    assert view.shape == (4, 4) and view.data_ptr() == workspace.data_ptr()
    view[1] = -1  # row 1 of the narrow view is elements 4..7 of the storage
    assert workspace.view(-1)[4:8].tolist() == [-1.0] * 4
    with pytest.raises(ValueError, match="cannot hold rows of 7"):
        layer_width_view(workspace, 7)


# -- measured costs and conversion ---------------------------------------------------------

@pytest.fixture(scope="module")
def wide_model(tiny_model_factory, tmp_path_factory, calib_text_file):
    dst = tmp_path_factory.mktemp("wide") / "wide"
    convert(tiny_model_factory(SPEC), dst, ConvertOptions(rope_dim=8, d_kv=32, strategy="high", layout="exact",
                                                          dtype="float32"), show_progress=False)
    return load_reference(dst)


@pytest.mark.slow
def test_truncation_costs_equal_a_directly_truncated_model(wide_model):
    """The cached-prefix fast path gives exactly KL(wide ‖ wide with one layer cut)."""
    from conversion.sensitivity import truncation_costs

    torch.manual_seed(0)
    windows = torch.randint(0, SPEC.vocab_size, (3, 24))
    costs = truncation_costs(wide_model, windows, [16, 48], batch_size=2, show_progress=False)
    assert all(c[64] == 0.0 for c in costs) and all(c[16] >= c[48] >= 0 for c in costs)
    with torch.no_grad():
        reference = wide_model(windows).logits.log_softmax(-1)
        weight = wide_model.model.layers[2].self_attn.kv_a_proj_with_mqa.weight
        saved = weight.clone()
        weight[16:64] = 0
        cut = wide_model(windows).logits.log_softmax(-1)
        weight.copy_(saved)
    direct = torch.nn.functional.kl_div(cut, reference, log_target=True, reduction="sum").item() / windows.numel()
    assert costs[2][16] == pytest.approx(direct, rel=1e-4)
    with pytest.raises(ConversionError, match="must lie in"):
        truncation_costs(wide_model, windows, [80], show_progress=False)


@pytest.fixture(scope="module")
def per_layer(tiny_model_factory, tmp_path_factory, calib_text_file):
    dst = tmp_path_factory.mktemp("per-layer") / "mla"
    convert(tiny_model_factory(SPEC), dst, ConvertOptions(**OPTIONS, calib_text=calib_text_file), show_progress=False)
    return dst


@pytest.mark.slow
def test_measured_allocation_writes_per_layer_widths(per_layer):
    dst = per_layer
    config = json.loads((dst / "config.json").read_text())
    report = json.loads((dst / "mha2mla_report.json").read_text())
    ranks = config["mha2mla"]["layer_kv_lora_rank"]
    assert sum(ranks) == 4 * 2 * 16 and all(r % 8 == 0 and 8 <= r <= 64 for r in ranks)
    assert config["kv_lora_rank"] == max(ranks)  # the widest layer: a safe size for anything generic
    allocation = report["allocation"]
    assert allocation["layer_latent"] == ranks
    assert allocation["predicted_kl"]["allocated"] <= allocation["predicted_kl"]["uniform"] + 1e-12
    assert report["kv_cache"]["essential_values"] == 2 * 16 + 2 * 8  # the budget's mean, rope keys included
    assert [e["latent"] for e in report["layer_errors"]] == ranks
    check_checkpoint(dst)
    assert [p.name for p in dst.parent.iterdir()] == ["mla"]  # the scratch wide conversion is gone


@pytest.mark.slow
def test_per_layer_checkpoint_equals_the_truncated_wide_conversion(tiny_model_factory, tmp_path, per_layer,
                                                                    calib_text_file):
    """A layer converted at rank r is the wide conversion with its trailing latent rows zeroed
    (the SVD dims are nested), so the reference model reproduces that function."""
    dst = per_layer
    ranks = json.loads((dst / "config.json").read_text())["mha2mla"]["layer_kv_lora_rank"]
    wide_dst = tmp_path / "wide-again"
    convert(tiny_model_factory(SPEC), wide_dst, ConvertOptions(**{**OPTIONS, "allocate": "uniform", "d_kv": 32,
                                                                   "layout": "exact",
                                                                   "calib_text": calib_text_file}),
            show_progress=False)
    wide, per_layer = load_reference(wide_dst), load_reference(dst)
    with torch.no_grad():
        for layer, r in zip(wide.model.layers, ranks):
            layer.self_attn.kv_a_proj_with_mqa.weight[r:64] = 0
        ids = torch.randint(0, SPEC.vocab_size, (2, 40))
        torch.testing.assert_close(per_layer(ids).logits, wide(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("extra, message", [
    (["--d-kv", "2"], "cannot give every layer one group of 8"),
    (["--kv-budget-total", "100000"], "more than the original model's"),
    (["--d-kv", "16", "--layout", "native"], "drop --layout native"),
    (["--kv-budget", "576"], "exactly one of --d-kv"),
])
def test_bad_budgets_are_refused(tiny_model_factory, tmp_path, capsys, extra, message):
    from conversion.cli import main

    dst = tmp_path / "out"
    rc = main(["convert", str(tiny_model_factory(SPEC)), str(dst), "--rope-dim", "8", "--strategy", "high",
               "--allocate", "measured", "--rank-step", "8", *extra])
    assert rc == 2 and message in capsys.readouterr().err
    assert not dst.exists()


# -- served by vLLM, each layer at its own width -------------------------------------------

KV_BYTES = 16 << 20


@pytest.fixture(scope="module")
def prompts_sharing_a_prefix(tiny_model_factory):
    """5 prompts of 70–122 tokens sharing a 40-token prefix (2 full cache blocks of 16)."""
    return prompts_sharing_a_prefix_of(tiny_model_factory(SPEC))


@pytest.fixture(scope="module")
def per_layer_run(per_layer_rope, tiny_model_factory, prompts_sharing_a_prefix):
    """One engine (torch.compile on) for the three tests below, on the checkpoint whose layers differ in both
    latent width and rotary dims (:func:`per_layer_rope`), in 32-token scheduling steps: 8 short prompts first,
    several whole prompts to a step, then the prompts sharing a prefix, split into chunks that attend to cached
    context, later ones starting from the cached prefix. 16 tokens each, past the end-of-sequence token (this
    random model ends some short prompts at once), to compare them all in full."""
    from vllm_mha2mla.tools.runner import EngineRequest, run_engine_in_subprocess

    prompts = short_prompts(tiny_model_factory(SPEC)) + prompts_sharing_a_prefix
    return prompts, run_engine_in_subprocess(EngineRequest(
        model=str(per_layer_rope), prompt_token_ids=prompts, max_tokens=16, ignore_eos=True, dtype="float32",
        kv_cache_memory_bytes=KV_BYTES, enable_chunked_prefill=True, enable_prefix_caching=True,
        max_num_batched_tokens=32))


@pytest.mark.vllm
def test_vllm_serves_each_layer_at_its_own_width(per_layer_rope, per_layer_run):
    """Greedy tokens equal the reference model's, for whole prompts batched in one step and for prompts prefilled
    in chunks; every layer's paged cache has its own row width, latent + rotary (no padding to the widest); the KV
    capacity is the memory over the summed widths."""
    config = json.loads((per_layer_rope / "config.json").read_text())
    section = config["mha2mla"]
    widths = [w + 2 * r for w, r in zip(section["layer_kv_lora_rank"], section["layer_rope_dim"])]
    assert len(set(widths)) > 1, "the layers should have different widths"
    prompts, result = per_layer_run
    assert "CUSTOM" in result["attention_backends"]
    assert result["kv_cache_widths"] == widths
    assert abs(result["kv_cache_tokens"] * sum(widths) * 4 / KV_BYTES - 1) < 0.05
    ref = load_reference(per_layer_rope)
    assert len(result["outputs"]) == len(prompts) == 13
    for prompt, out in zip(prompts, result["outputs"]):
        assert out["token_ids"] == ref.greedy_generate(torch.tensor([prompt]), 16)[0].tolist()


@pytest.mark.vllm
def test_vllm_serves_each_layer_at_its_own_width_in_chunks_from_a_prefix_cache(per_layer_run):
    """With 32-token steps, later chunks attend to cached context through each layer's own-width workspace view,
    and prompts reuse the cached prefix (their greedy tokens: the test above)."""
    prompts, result = per_layer_run
    assert result["scheduling"] == {"enable_chunked_prefill": True, "max_num_batched_tokens": 32,
                                    "enable_prefix_caching": True}
    assert max(out["num_cached_tokens"] for out in result["outputs"][8:]) >= 32
    assert all(len(p) > 32 for p in prompts[8:])


def test_a_vllm_that_merges_widths_is_made_to_keep_them_apart(monkeypatch):
    """vLLM 0.26's MLAAttentionSpec.merge copies the first layer's head size without comparing;
    the plugin's hook wraps it so that layers of different widths get per-layer specs."""
    from vllm.v1 import kv_cache_interface as kv

    from vllm_mha2mla import compat, patches

    def careless_merge(cls, specs):  # what 0.26 does: no comparison of head sizes
        return specs[0]

    monkeypatch.setattr(kv.MLAAttentionSpec, "merge", classmethod(careless_merge))
    assert not compat.merge_refuses_different_widths()
    patches.keep_layer_widths_apart()
    assert compat.merge_refuses_different_widths()
    same = [kv.MLAAttentionSpec(block_size=16, num_kv_heads=1, head_size=40, dtype=torch.float32)] * 2
    assert kv.MLAAttentionSpec.merge(same) is same[0]  # layers of one width still merge


def test_a_vllm_without_per_layer_specs_refuses_per_layer_checkpoints(monkeypatch):
    from vllm.v1 import kv_cache_interface as kv

    from vllm_mha2mla import patches

    monkeypatch.delattr(kv, "UniformTypeKVCacheSpecs")
    with pytest.raises(ValueError, match="no per-layer KV cache specs"):
        patches.require_per_layer_kv_cache()


@pytest.mark.slow
def test_given_widths_round_trip(tiny_model_factory, tmp_path, capsys):
    """--layer-latent writes exactly the widths asked for; a list of the wrong length is refused."""
    from conversion.cli import main

    src, dst = tiny_model_factory(SPEC), tmp_path / "given"
    assert main(["convert", str(src), str(dst), "--rope-dim", "8", "--strategy", "high", "--layer-latent",
                 "8,40,24,16", "--dtype", "float32"]) == 0
    config = json.loads((dst / "config.json").read_text())
    assert config["mha2mla"]["layer_kv_lora_rank"] == [8, 40, 24, 16] and config["kv_lora_rank"] == 40
    model = load_reference(dst)
    assert [layer.self_attn.kv_b_proj.weight.shape[1] for layer in model.model.layers] == [8, 40, 24, 16]
    check_checkpoint(dst)
    capsys.readouterr()
    rc = main(["convert", str(src), str(tmp_path / "bad"), "--rope-dim", "8", "--strategy", "high",
               "--layer-latent", "8,40,24"])
    assert rc == 2 and "lists 3 widths for a model of 4 layers" in capsys.readouterr().err


@pytest.mark.slow
def test_costs_around_an_operating_point(wide_model):
    """With every other layer held at a base width, a layer's cost is the KL of that model from
    the wide one (measured directly here); the weights come back untouched."""
    from conversion.sensitivity import truncation_costs

    torch.manual_seed(1)
    windows = torch.randint(0, SPEC.vocab_size, (2, 20))
    before = [layer.self_attn.kv_a_proj_with_mqa.weight.clone() for layer in wide_model.model.layers]
    base = [32, 32, 32, 32]
    costs = truncation_costs(wide_model, windows, [16, 64], show_progress=False, base_ranks=base)
    with torch.no_grad():
        reference = wide_model(windows).logits.log_softmax(-1)
        weights = [layer.self_attn.kv_a_proj_with_mqa.weight for layer in wide_model.model.layers]
        for w, b, r in zip(weights, before, [32, 16, 32, 32]):
            w.copy_(b)
            w[r:64] = 0
        cut = wide_model(windows).logits.log_softmax(-1)
        for w, b in zip(weights, before):
            w.copy_(b)
    direct = torch.nn.functional.kl_div(cut, reference, log_target=True, reduction="sum").item() / windows.numel()
    assert costs[1][16] == pytest.approx(direct, rel=1e-4)
    assert all(c[64] < c[16] for c in costs)
    assert all(torch.equal(layer.self_attn.kv_a_proj_with_mqa.weight, b)
               for layer, b in zip(wide_model.model.layers, before))


@pytest.mark.slow
def test_allocation_kl_is_the_cut_models_kl_and_passes_never_end_worse(wide_model):
    """``allocation_kl`` equals the KL of the model with every layer cut at once (measured directly);
    refining in passes returns one of the allocations it measured, the one of lowest KL, never
    one worse than uniform, and leaves the weights as they were."""
    from conversion.sensitivity import allocation_kl, measured_allocation

    torch.manual_seed(2)
    windows = torch.randint(0, SPEC.vocab_size, (2, 20))
    before = [layer.self_attn.kv_a_proj_with_mqa.weight.clone() for layer in wide_model.model.layers]
    widths = [16, 48, 32, 32]
    with torch.no_grad():
        reference = wide_model(windows).logits.log_softmax(-1)
        for layer, b, r in zip(wide_model.model.layers, before, widths):
            layer.self_attn.kv_a_proj_with_mqa.weight[r:64] = 0
        cut = wide_model(windows).logits.log_softmax(-1)
        for layer, b in zip(wide_model.model.layers, before):
            layer.self_attn.kv_a_proj_with_mqa.weight.copy_(b)
    direct = torch.nn.functional.kl_div(cut, reference, log_target=True, reduction="sum").item() / windows.numel()
    assert allocation_kl(wide_model, windows, widths) == pytest.approx(direct, rel=1e-4)
    with pytest.raises(ConversionError, match="must give each of 4 layers"):
        allocation_kl(wide_model, windows, [16, 16])

    ranks, history = measured_allocation(wide_model, windows, [16, 32, 48, 64], 128, 16, passes=3, show_progress=False)
    measured = {tuple(h["base"]): h["base_kl"] for h in history}
    assert sum(ranks) == 128 and tuple(ranks) in measured
    assert measured[tuple(ranks)] == min(measured.values()) <= measured[(32, 32, 32, 32)]
    assert measured[(32, 32, 32, 32)] == pytest.approx(allocation_kl(wide_model, windows, [32] * 4), rel=1e-4)
    one_pass, _ = measured_allocation(wide_model, windows, [16, 32, 48, 64], 128, 16, passes=1, show_progress=False)
    assert one_pass == history[0]["allocated"]
    assert all(torch.equal(layer.self_attn.kv_a_proj_with_mqa.weight, b)
               for layer, b in zip(wide_model.model.layers, before))


# -- rotary dims per layer too -------------------------------------------------------------

LATENTS, ROPES = [8, 40, 24, 16], [8, 4, 12, 8]
"""Per-layer latent widths and rotary dims per head of the tiny model (head_dim 32, 2 kv-heads)."""


@pytest.fixture(scope="module")
def per_layer_rope(tiny_model_factory, tmp_path_factory):
    from conversion.cli import main

    dst = tmp_path_factory.mktemp("per-layer-rope") / "mla"
    assert main(["convert", str(tiny_model_factory(SPEC)), str(dst), "--rope-dim", "8", "--strategy", "high",
                 "--layer-latent", ",".join(map(str, LATENTS)), "--layer-rope", ",".join(map(str, ROPES)),
                 "--dtype", "float32"]) == 0
    return dst


@pytest.mark.slow
def test_per_layer_rope_layers_equal_uniform_conversions_at_their_rotary_dims(per_layer_rope, tiny_model_factory,
                                                                              tmp_path):
    """Each attention layer is converted on its own, so layer i of a checkpoint with per-layer rotary
    dims holds exactly the tensors of a uniform conversion at layer i's rotary dims; config and
    report name every layer's widths and the widest layer's layout."""
    from safetensors.torch import load_file

    config = json.loads((per_layer_rope / "config.json").read_text())
    section = config["mha2mla"]
    assert section["layer_rope_dim"] == ROPES and section["layer_kv_lora_rank"] == LATENTS
    assert (config["qk_rope_head_dim"], config["kv_lora_rank"]) == (2 * max(ROPES), max(LATENTS))
    assert [len(heads[0]) for heads in section["rope_pairs"]] == [r // 2 for r in ROPES]
    report = json.loads((per_layer_rope / "mha2mla_report.json").read_text())
    assert report["kv_cache"]["essential_values"] == sum(w + 2 * r for w, r in zip(LATENTS, ROPES)) / 4
    check_checkpoint(per_layer_rope)
    mixed = load_file(str(next(per_layer_rope.glob("*.safetensors"))))
    for rope_dim in sorted(set(ROPES)):
        uniform = tmp_path / f"rope{rope_dim}"
        convert(tiny_model_factory(SPEC), uniform, ConvertOptions(rope_dim=rope_dim, strategy="high",
                                                                  layer_latent=LATENTS, dtype="float32"),
                show_progress=False)
        tensors = load_file(str(next(uniform.glob("*.safetensors"))))
        for i in (i for i, r in enumerate(ROPES) if r == rope_dim):
            names = [n for n in tensors if n.startswith(f"model.layers.{i}.self_attn.")]
            assert len(names) == 4 and all(torch.equal(mixed[n], tensors[n]) for n in names)
    spec = MHA2MLASpec.from_config(config)
    assert spec.per_layer and [spec.layer_layout(i).cache_values for i in range(4)] == \
        [w + 2 * r for w, r in zip(LATENTS, ROPES)]


@pytest.mark.slow
def test_per_layer_rope_is_refused_when_inconsistent(per_layer_rope, tiny_model_factory, tmp_path, capsys):
    from conversion.cli import main

    config = json.loads((per_layer_rope / "config.json").read_text())
    section = config["mha2mla"]
    for bad, message in (({"layer_rope_dim": [8, 8, 12, 8]}, "layer 1 keep"),
                         ({"layer_rope_dim": [8, 4, 12]}, "has 3 entries for 4 layers"),
                         ({"layer_rope_dim": [8, 4, 14, 8]}, "must lie in")):
        with pytest.raises(ValueError, match=message):
            MHA2MLASpec.from_config({**config, "mha2mla": {**section, **bad}})
    src = tiny_model_factory(SPEC)
    base = ["--rope-dim", "8", "--strategy", "high"]
    for extra, message in ((["--d-kv", "8", "--layer-rope", "8,4,12,8"], "--layer-rope goes with --layer-latent"),
                           (["--layer-latent", "8,8,8,8", "--layer-rope", "8,4"], "lists 2 rotary widths"),
                           (["--layer-latent", "8,8,8,8", "--layer-rope", "8,5,8,8"], "--rope-dim 5")):
        dst = tmp_path / "out"
        assert main(["convert", str(src), str(dst), *base, *extra]) == 2
        assert message in capsys.readouterr().err and not dst.exists()


@pytest.mark.vllm
def test_vllm_serves_per_layer_rotary_dims(per_layer_run):
    """Layers of different rotary and latent widths (:data:`LATENTS`, :data:`ROPES`): every layer's cache row is
    its own latent + rotary width, and each layer's chunked prefill attends over its own rope columns (greedy
    tokens equal to the reference's, whole and chunked: the tests above, on the same engine)."""
    _, result = per_layer_run
    assert result["kv_cache_widths"] == [w + 2 * r for w, r in zip(LATENTS, ROPES)]
    assert len(set(ROPES)) > 1 and len(set(LATENTS)) > 1


@pytest.fixture(scope="module")
def rope_allocated(tiny_model_factory, tmp_path_factory, calib_text_file):
    dst = tmp_path_factory.mktemp("rope-allocated") / "mla"
    convert(tiny_model_factory(SPEC), dst, ConvertOptions(**{**OPTIONS, "rope_choices": [4, 8, 12]},
                                                          calib_text=calib_text_file), show_progress=False)
    return dst


@pytest.mark.slow
def test_option_costs_equal_directly_mixed_models(tiny_model_factory, tmp_path):
    """The cached-prefix fast path gives exactly KL(original ‖ model with every layer at base but one
    at (R, w)), that model built by taking the layer from the R conversion and cutting it; the
    whole-model KL is the same with several layers switched."""
    from transformers import AutoModelForCausalLM

    from conversion.sensitivity import MixedAttention, mixed_kl, option_costs, reference_logprobs

    src = tiny_model_factory(SPEC)
    models = {}
    for r in (4, 8):
        convert(src, tmp_path / f"r{r}", ConvertOptions(rope_dim=r, d_kv=24, strategy="high", layout="exact",
                                                        dtype="float32"), show_progress=False)
        models[r] = load_reference(tmp_path / f"r{r}")
    torch.manual_seed(3)
    windows = torch.randint(0, SPEC.vocab_size, (3, 20))
    reference = reference_logprobs(AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32), windows, 2)
    mixed = MixedAttention(models, host_rope=8)
    base = [(8, 32)] * 4
    costs = option_costs(mixed, reference, windows, {4: [16, 48], 8: [16, 32]}, base, batch_size=2,
                         show_progress=False)
    assert set(costs[0]) == {(4, 16), (4, 48), (8, 16), (8, 32)}
    for layer, option in ((1, (4, 48)), (3, (8, 16))):
        options = list(base)
        options[layer] = option
        assert costs[layer][option] == pytest.approx(mixed_kl(mixed, reference, windows, options, 2), rel=1e-4)
    with torch.no_grad():  # built by hand: layer 2 of the rope-4 conversion, latent cut to 16, in the rope-8 model
        direct = load_reference(tmp_path / "r8")
        for layer in direct.model.layers:
            layer.self_attn.kv_a_proj_with_mqa.weight[32:48] = 0
        direct.model.layers[2].self_attn = load_reference(tmp_path / "r4").model.layers[2].self_attn
        direct.model.layers[2].self_attn.kv_a_proj_with_mqa.weight[16:48] = 0
        logprobs = direct(windows).logits.log_softmax(-1)
    want = torch.nn.functional.kl_div(logprobs, torch.cat(reference), log_target=True, reduction="sum").item()
    options = list(base)
    options[2] = (4, 16)
    assert mixed_kl(mixed, reference, windows, options, 2) == pytest.approx(want / windows.numel(), rel=1e-4)
    with pytest.raises(ConversionError, match="must give each of 4 layers"):
        mixed_kl(mixed, reference, windows, [(12, 16)] * 4)


@pytest.mark.slow
def test_measured_rope_allocation_round_trips(rope_allocated, tiny_model_factory, tmp_path):
    """--rope-choices writes per-layer rotary dims and latents within the budget, reports measured
    KLs (allocated never above uniform), and the checkpoint is the conversion given those lists
    outright (same tensors to 1e-5); the scratch conversions are gone."""
    config = json.loads((rope_allocated / "config.json").read_text())
    allocation = json.loads((rope_allocated / "mha2mla_report.json").read_text())["allocation"]
    ropes, latents = config["mha2mla"]["layer_rope_dim"], config["mha2mla"]["layer_kv_lora_rank"]
    assert ropes == allocation["layer_rope"] and latents == allocation["layer_latent"]
    assert set(ropes) <= {4, 8, 12} and all(w % 8 == 0 for w in latents)
    assert sum(2 * r + w for r, w in zip(ropes, latents)) <= 4 * (2 * 8 + 2 * 16)  # the budget: rope 8, d_kv 16
    assert allocation["measured_kl"]["allocated"] <= allocation["measured_kl"]["uniform"]
    assert allocation["predicted_kl"]["allocated"] <= allocation["predicted_kl"]["uniform"] + 1e-12
    assert [p.name for p in rope_allocated.parent.iterdir()] == ["mla"]
    check_checkpoint(rope_allocated)
    from safetensors.torch import load_file

    given = tmp_path / "given"
    convert(tiny_model_factory(SPEC), given, ConvertOptions(
        rope_dim=8, strategy="2-norm", svd="aw-joint", calib_tokens=2048, dtype="float32", layer_latent=latents,
        layer_rope=ropes, calib_text=json.loads((rope_allocated / "mha2mla_report.json").read_text())
        ["options"]["calib_text"]), show_progress=False)
    a, b = (load_file(str(next(p.glob("*.safetensors")))) for p in (rope_allocated, given))
    assert a.keys() == b.keys() and all(a[n].shape == b[n].shape for n in a)
    # equal up to float32 rounding of the float64 activation-aware SVD (calibration statistics
    # collected in one process and read back from their cache in another differ in the last bits)
    differ = {n: (a[n] - b[n]).abs().max().item() for n in a if not torch.allclose(a[n], b[n], rtol=0, atol=1e-5)}
    assert not differ, differ


@pytest.mark.slow
@pytest.mark.parametrize("extra, message", [
    (["--d-kv", "16", "--rope-choices", "4,8"], "--rope-choices goes with --allocate measured"),
    (["--d-kv", "16", "--allocate", "measured", "--rope-choices", "4,7"], "--rope-dim 7"),
    (["--d-kv", "16", "--allocate", "measured", "--rope-choices", "4,8", "--allocation-passes", "2"],
     "drop it with --rope-choices"),
])
def test_bad_rope_choices_are_refused(tiny_model_factory, tmp_path, capsys, extra, message):
    from conversion.cli import main

    dst = tmp_path / "out"
    rc = main(["convert", str(tiny_model_factory(SPEC)), str(dst), "--rope-dim", "8", "--strategy", "high",
               "--rank-step", "8", *extra])
    assert rc == 2 and message in capsys.readouterr().err
    assert not dst.exists()


@pytest.mark.vllm
def test_vllm_serves_a_4bit_cache_at_each_layers_own_row_bytes(tiny_model_factory, tmp_path, prompts_sharing_a_prefix):
    """--kv-cache-dtype int4_per_token_head on per-layer widths 16/48/32/32 (rotary 16): each layer's page holds
    rows of its own bytes (int4 latent in groups of 64 + int8 rotary keys: 32/48/40/40), capacity is the memory
    over their sum, and greedy tokens (whole, chunked and prefix-cached prompts) equal the float64 reference with
    the same format (float64: see tests/test_vllm_plugin.py's int4_reference)."""
    from conversion.mla_format.cache_quant import CacheQuant
    from conversion.mla_format.cache_rows import RowLayout
    from conversion.reference_model import set_cache_quant
    from vllm_mha2mla.tools.runner import EngineRequest, run_engine_in_subprocess

    latents = [16, 48, 32, 32]
    dst = tmp_path / "mla"
    convert(tiny_model_factory(SPEC), dst, ConvertOptions(rope_dim=8, strategy="2-norm", layer_latent=latents,
                                                          dtype="float32"), show_progress=False)
    prompts = short_prompts(tiny_model_factory(SPEC)) + prompts_sharing_a_prefix
    result = run_engine_in_subprocess(EngineRequest(
        model=str(dst), prompt_token_ids=prompts, max_tokens=16, ignore_eos=True, dtype="float32",
        kv_cache_dtype="int4_per_token_head", kv_cache_memory_bytes=KV_BYTES, enable_chunked_prefill=True,
        enable_prefix_caching=True, max_num_batched_tokens=32))
    row_bytes = [RowLayout(CacheQuant(4, 8, 64), latent, 16).row_bytes for latent in latents]
    assert result["kv_cache_widths"] == row_bytes == [32, 48, 40, 40]
    assert abs(result["kv_cache_tokens"] * sum(row_bytes) / KV_BYTES - 1) < 0.02
    assert max(out["num_cached_tokens"] for out in result["outputs"][8:]) >= 32
    ref = set_cache_quant(load_reference(dst, dtype=torch.float64), CacheQuant(4, 8, 64))
    for prompt, out in zip(prompts, result["outputs"]):
        assert out["token_ids"] == ref.greedy_generate(torch.tensor([prompt]), 16)[0].tolist()

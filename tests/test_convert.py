"""End-to-end conversion: exactness, partial-RoPE cost, decoding with the latent cache, bad input."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conversion import ConvertOptions, convert, load_reference
from conversion.cli import main as cli_main
from conversion.rope import rope_dim_permutation
from tests.helpers import TinySpec


def _original(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


IDENTITY_SPECS = [
    TinySpec(num_heads=4, num_kv_heads=4, head_dim=64, hidden_size=256),  # MHA
    TinySpec(num_heads=4, num_kv_heads=2, head_dim=64, hidden_size=256),  # GQA
    TinySpec(num_heads=4, num_kv_heads=2, head_dim=128, hidden_size=512, tie=True),
    TinySpec(num_heads=4, num_kv_heads=2, head_dim=64, hidden_size=256, bias=True),  # Llama attention_bias
    TinySpec(model_type="qwen2", num_heads=6, num_kv_heads=2, head_dim=64, hidden_size=384),  # q/k/v biases
    TinySpec(model_type="qwen2", num_heads=4, num_kv_heads=4, head_dim=128, hidden_size=512),
]


@pytest.mark.slow
@pytest.mark.parametrize("spec", IDENTITY_SPECS, ids=lambda s: f"{s.model_type}-h{s.num_heads}g{s.num_kv_heads}d{s.head_dim}{'-bias' if s.bias else ''}")
def test_nothing_removed_reproduces_original_logits(tiny_model_factory, tmp_path, spec):
    src = tiny_model_factory(spec)
    d = spec.head_dim
    report = convert(src, tmp_path / "mla", ConvertOptions(rope_dim=d, strategy="high", d_kv=d, dtype="float32"),
                     show_progress=False)
    assert report["layer_errors"][0]["v_weight_error"] < 1e-10
    ids = torch.randint(0, spec.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = _original(src)(ids).logits
        got = load_reference(tmp_path / "mla")(ids).logits
    assert _rel(got, want) <= 1e-4


def test_converted_folder_is_a_deepseek_style_checkpoint(tiny_model_factory, tmp_path):
    src = tiny_model_factory(TinySpec())
    convert(src, tmp_path / "mla", ConvertOptions(rope_dim=8, strategy="uniform", kv_budget=576, dtype="bfloat16",
                                                  force=True),
            show_progress=False)
    cfg = json.loads((tmp_path / "mla" / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v2" and cfg["architectures"] == ["MHA2MLAForCausalLM"]
    assert cfg["q_lora_rank"] is None and cfg["first_k_dense_replace"] == cfg["num_hidden_layers"]
    assert cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] == 576
    assert (cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]) == (64, 64, 128)
    assert cfg["mha2mla"]["rope_pairs"] == [[[0, 8, 16, 24]] * 2] * 2
    weights = load_file(str(tmp_path / "mla" / "model.safetensors"))
    names = set(weights)
    for n in ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
        assert f"model.layers.0.self_attn.{n}.weight" in names
    assert weights["model.layers.0.self_attn.kv_b_proj.weight"].shape == (4 * (64 + 128), 512)
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    for f in ("tokenizer.json", "tokenizer_config.json", "mha2mla_report.json"):
        assert (tmp_path / "mla" / f).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


@pytest.mark.slow
def test_same_pairs_used_across_a_gqa_group(tiny_model_factory, tmp_path, calib_text_file):
    spec = TinySpec(num_heads=6, num_kv_heads=2, hidden_size=384)
    src = tiny_model_factory(spec)
    convert(src, tmp_path / "mla", ConvertOptions(rope_dim=8, strategy="2-norm", d_kv=32, calib_text=calib_text_file,
                                                  calib_tokens=2048, dtype="float32"), show_progress=False)
    cfg = json.loads((tmp_path / "mla" / "config.json").read_text())
    pairs = cfg["mha2mla"]["rope_pairs"]
    assert len(pairs) == spec.num_layers and all(len(p) == 2 and len(p[0]) == 4 for p in pairs)
    orig = load_file(str(src / "model.safetensors"))["model.layers.1.self_attn.q_proj.weight"]
    conv = load_file(str(tmp_path / "mla" / "model.safetensors"))["model.layers.1.self_attn.q_proj.weight"]
    d = spec.head_dim
    for j in range(spec.num_heads):  # each query head is permuted with its kv-head's pairs
        perm = torch.tensor(rope_dim_permutation(pairs[1][j // 3], d))
        torch.testing.assert_close(conv[j * d:(j + 1) * d], orig[j * d:(j + 1) * d][perm])


@pytest.mark.slow
@pytest.mark.parametrize("svd", ["joint", "split", "aw-joint"])
def test_partial_rope_and_compression_cost_is_measured(tiny_model_factory, tmp_path, calib_text_file, svd):
    """Compression changes the function: the change is reported and shrinks as the latent grows."""
    src = tiny_model_factory(TinySpec())
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = _original(src)(ids).logits
    changes = {}
    for d_kv in (24, 96):
        dst = tmp_path / f"mla{d_kv}"
        report = convert(src, dst, ConvertOptions(rope_dim=16, strategy="2-norm", d_kv=d_kv, svd=svd,
                                                  calib_text=calib_text_file, calib_tokens=2048, dtype="float32"),
                         show_progress=False)
        errs = report["layer_errors"][0]
        assert 0 < errs["k_nope_weight_error"] < 1 and 0 < errs["v_output_error"] < 1
        with torch.no_grad():
            changes[d_kv] = _rel(load_reference(dst)(ids).logits, want)
    print(f"svd={svd}: relative logit change by d_kv {changes}")
    assert 0 < changes[96] < changes[24]


@pytest.mark.slow
def test_incremental_decoding_equals_full_recompute(tiny_model_factory, tmp_path):
    from transformers.cache_utils import DynamicCache

    src = tiny_model_factory(TinySpec())
    convert(src, tmp_path / "mla", ConvertOptions(rope_dim=8, strategy="low", d_kv=40, dtype="float32"),
            show_progress=False)
    model = load_reference(tmp_path / "mla")
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache()
        steps = [model(ids[:, :12], past_key_values=cache, use_cache=True).logits]
        for t in range(12, 20):
            steps.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    lay = model.model.layers[0].self_attn.layout
    latent = cache.layers[0].keys
    assert latent.shape == (2, 1, 20, lay.kv_lora_rank)  # only the latent and k_pe are cached
    assert cache.layers[0].values.shape == (2, 1, 20, lay.qk_rope_head_dim)
    assert _rel(torch.cat(steps, 1), full) < 1e-5
    greedy = model.greedy_generate(ids[:1, :8], 6)
    with torch.no_grad():
        seq = ids[:1, :8]
        for _ in range(6):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
    assert greedy.tolist() == seq[:, 8:].tolist()


@pytest.mark.slow
def test_reference_model_trains(tiny_model_factory, tmp_path):
    src = tiny_model_factory(TinySpec())
    convert(src, tmp_path / "mla", ConvertOptions(rope_dim=8, strategy="high", d_kv=16, dtype="float32"),
            show_progress=False)
    model = load_reference(tmp_path / "mla").train()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# -- bad input: non-zero exit, a message naming the problem, no output folder ----------------

def _run_cli(capsys, *args):
    rc = cli_main(["convert", *map(str, args)])
    return rc, capsys.readouterr().err


def _assert_refused(capsys, tmp_path, src, extra, message):
    dst = tmp_path / "out"
    rc, err = _run_cli(capsys, src, dst, *extra)
    assert rc == 2 and message in err, err
    assert not dst.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_bad_options_are_refused(tiny_model_factory, tmp_path, capsys):
    src = tiny_model_factory(TinySpec())
    base = ["--strategy", "high"]
    _assert_refused(capsys, tmp_path, tmp_path / "missing", ["--rope-dim", "8", "--d-kv", "8", *base], "does not exist")
    _assert_refused(capsys, tmp_path, src, ["--rope-dim", "7", "--d-kv", "8", *base], "--rope-dim 7")
    _assert_refused(capsys, tmp_path, src, ["--rope-dim", "66", "--d-kv", "8", *base], "--rope-dim 66")
    _assert_refused(capsys, tmp_path, src, ["--rope-dim", "8", "--d-kv", "500", *base], "--d-kv 500 is too large")
    _assert_refused(capsys, tmp_path, src, ["--rope-dim", "8", "--d-kv", "0", *base], "--d-kv 0 must be at least 1")
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy2(src / f, no_tokenizer / f)
    _assert_refused(capsys, tmp_path, no_tokenizer, ["--rope-dim", "8", "--d-kv", "8", "--strategy", "2-norm"],
                    "--strategy high|low|uniform with --svd joint|split")


@pytest.mark.slow
def test_calibration_without_a_file_uses_the_default_corpus(tiny_model_factory, tmp_path, corpus_cache, monkeypatch):
    from conversion.recovery.corpus import default_calibration_text, load_default_corpus

    monkeypatch.setenv("MHA2MLA_CACHE", str(corpus_cache))
    src = tiny_model_factory(TinySpec())
    report = convert(src, tmp_path / "mla", ConvertOptions(rope_dim=8, d_kv=16, strategy="2-norm", svd="aw-joint",
                                                           calib_tokens=2048), show_progress=False)
    assert report["calibration_text"].startswith("default corpus") and report["calibration_tokens"] == 2048
    text = default_calibration_text(200_000)
    held_out = load_default_corpus().held_out
    assert len(text) == 200_000 and held_out and not any(doc[:200] in text for doc in held_out)


def test_impossible_budget_is_refused(tiny_model_factory, tmp_path, capsys):
    src = tiny_model_factory(TinySpec(num_heads=8, num_kv_heads=8, head_dim=64, hidden_size=512))
    _assert_refused(capsys, tmp_path, src, ["--rope-dim", "64", "--kv-budget", "320", "--strategy", "high"],
                    "--kv-budget 320 is impossible")


def test_broken_folders_are_refused(tiny_model_factory, tmp_path, capsys):
    src = tiny_model_factory(TinySpec())
    args = ["--rope-dim", "8", "--d-kv", "8", "--strategy", "high"]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    _assert_refused(capsys, tmp_path, bad, args, "unsupported model_type 'gpt2'")
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    _assert_refused(capsys, tmp_path, bad, args, "corrupt")
    (bad / "model.safetensors").unlink()
    _assert_refused(capsys, tmp_path, bad, args, "no *.safetensors")
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-1.safetensors"}}))
    _assert_refused(capsys, tmp_path, bad, args, "model-1.safetensors named in the index is missing")
    (bad / "config.json").unlink()
    _assert_refused(capsys, tmp_path, bad, args, "config.json is missing")


@pytest.mark.slow
def test_existing_output_is_kept_unless_overwrite(tiny_model_factory, tmp_path, capsys):
    src = tiny_model_factory(TinySpec())
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    rc, err = _run_cli(capsys, src, dst, "--rope-dim", "8", "--d-kv", "8", "--strategy", "high")
    assert rc == 2 and "already exists" in err and (dst / "keep.txt").read_text() == "mine"
    rc, _ = _run_cli(capsys, src, dst, "--rope-dim", "8", "--d-kv", "8", "--strategy", "high", "--overwrite")
    assert rc == 0 and not (dst / "keep.txt").exists() and (dst / "config.json").is_file()


@pytest.mark.slow
def test_auto_layout_pads_to_native_only_when_cheap(tiny_model_factory, tmp_path):
    """auto: the native 576-value row only while padding costs ≤ 10% more cache; else exact sizes."""
    mha = tiny_model_factory(TinySpec(num_heads=8, num_kv_heads=8, head_dim=64, hidden_size=512))
    near = convert(mha, tmp_path / "near", ConvertOptions(rope_dim=16, d_kv=52, strategy="high"),
                   show_progress=False)  # 8 × (52 + 16) = 544 essential: 576 is +5.9%
    assert near["kv_cache"]["cached_values"] == 576 and near["native_vllm_shape"]
    gqa = tiny_model_factory(TinySpec())
    far = convert(gqa, tmp_path / "far", ConvertOptions(rope_dim=16, d_kv=32, strategy="high"),
                  show_progress=False)  # 2 × 48 = 96 essential: 576 would be 6×
    assert far["kv_cache"]["cached_values"] == 96 and not far["native_vllm_shape"]
    assert any("would cost 500% more cache" in n for n in far["notes"])


@pytest.mark.slow
def test_a_layout_that_grows_the_cache_needs_force(tiny_model_factory, tmp_path, capsys):
    src = tiny_model_factory(TinySpec())  # 2 kv-heads × 64 × (K+V) = 256 values per token per layer
    for extra in (["--d-kv", "32", "--layout", "native"], ["--kv-budget", "576"]):
        _assert_refused(capsys, tmp_path, src, ["--rope-dim", "16", "--strategy", "high", *extra],
                        "more than the original model's 256 (+125.0%)")
    rc, _ = _run_cli(capsys, src, tmp_path / "forced", "--rope-dim", "16", "--strategy", "high", "--kv-budget", "576",
                     "--force")
    cfg = json.loads((tmp_path / "forced" / "config.json").read_text())
    assert rc == 0 and cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] == 576

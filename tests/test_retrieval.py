"""``--strategy retrieval``: the calibration prompts, the measured retrieval score on a hand-made
retrieval head, and a conversion that round-trips through the checkpoint format."""

import json
import shutil

import pytest
import torch

from conversion import ConvertOptions, convert, load_reference
from conversion.allocation import retrieval_band
from conversion.calibration import load_or_collect
from conversion.errors import ConversionError
from conversion.cli import main as cli_main
from conversion.retrieval import (
    build_fact_prompts,
    collect_retrieval_scores,
    fact_sentence,
    load_capturing_model,
    row_span_mass,
    text_paragraphs,
)
from conversion.rope import retrieval_head_mask, select_pairs_by_score, select_pairs_retrieval
from conversion.source import read_source_spec
from tests.helpers import TinySpec

LOW_PAIRS = (30, 31)
"""The hand-made head's slowest pairs (of 32: head_dim 64), where its whole retrieval match lives."""
HIGH_PAIRS = (0, 1, 2, 3)
"""Its fastest pairs: loud on every token (the 2-norm score's favourites), no retrieval in them."""


def _words(n: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(["alpha", "beta", "gamma", "delta", "sigma"]) for _ in range(rng.randint(5, 30)))
            for _ in range(n)]


def test_fact_prompts_bury_the_fact_at_stratified_depths_within_the_length():
    encode = lambda s: [ord(c) for c in s]  # noqa: E731  one token per character: spans are checkable
    docs = _words(400)
    prompts = build_fact_prompts(encode, docs, 5, 1500, seed=3)
    assert len(prompts) == 5 and prompts == build_fact_prompts(encode, docs, 5, 1500, seed=3)
    for i, p in enumerate(prompts):
        assert len(p.ids) + len(p.answer) <= 1500 and len(p.ids) > 1200
        fact = "".join(map(chr, p.ids[p.fact[0]:p.fact[1]]))
        code = "".join(map(chr, p.answer)).strip()
        assert fact.startswith(fact_sentence("", code).split(" to ")[0]) and fact.rstrip().endswith(f"{code}.")
        assert i / 5 - 0.05 <= p.depth <= (i + 1) / 5 + 0.05  # one depth per stratum (to a paragraph)
        assert p.query_rows == list(range(len(p.ids) - 1, len(p.ids) + len(p.answer) - 1))
        assert "".join(map(chr, p.ids)).endswith("The archive code assigned to " + fact.split(" to ")[1].split(" is ")[0]
                                                 + " is")
    assert build_fact_prompts(encode, docs, 5, 1500, seed=4) != prompts
    assert text_paragraphs("a\nb\n\n\nc\r\n\r\nd\n") == ["a\nb", "c", "d"]


def test_retrieval_prompts_come_from_the_training_side_only(monkeypatch):
    """Without --calib-text the haystack is the default corpus's training split (never held out, never the essays)."""
    import importlib

    from conversion.recovery.corpus import Corpus

    convert_module = importlib.import_module("conversion.convert")  # the module (the package exports the function)

    fake = Corpus(train=["train paragraph"], held_out=["held-out paragraph"], out_of_domain=["essays"])
    monkeypatch.setattr(convert_module, "load_default_corpus", lambda cache_dir=None: fake)
    assert convert_module.retrieval_documents(ConvertOptions(rope_dim=8, strategy="retrieval")) == ["train paragraph"]


def test_row_mass_matches_a_full_attention_matrix():
    torch.manual_seed(0)
    q, k = torch.randn(1, 6, 40, 8), torch.randn(1, 2, 40, 8)
    probs = ((q @ k.repeat_interleave(3, 1).transpose(-1, -2)) * 0.3).masked_fill(
        ~torch.ones(40, 40, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    want = probs[0, :, [30, 35, 39], 10:14].sum(-1).mean(-1)
    torch.testing.assert_close(row_span_mass(q, k, [30, 35, 39], (10, 14), 0.3), want)  # GQA: heads 0-2 on kv 0


def test_captured_mass_equals_eager_output_attentions(tiny_model_factory):
    """The rows the calibration reads from the model's own SDPA calls = transformers' eager attention weights."""
    from transformers import AutoModelForCausalLM

    from conversion.retrieval import capture

    src = tiny_model_factory(TinySpec(num_heads=6, num_kv_heads=2, hidden_size=384))
    ids = torch.randint(0, 512, (1, 70), generator=torch.Generator().manual_seed(4))
    rows, span = [60, 64, 69], (12, 25)
    with torch.no_grad(), capture(rows, span) as mass:
        load_capturing_model(src).model(input_ids=ids, use_cache=False)
        eager = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, attn_implementation="eager")
        weights = eager.eval().model(input_ids=ids, output_attentions=True, use_cache=False).attentions
    assert sorted(mass) == [0, 1]  # the eager model ran inside the capture too, and recorded nothing
    for layer, w in enumerate(weights):
        torch.testing.assert_close(mass[layer], w[0, :, rows, span[0]:span[1]].sum(-1).mean(-1), rtol=1e-4,
                                   atol=1e-5)


def build_retrieval_head_model(src, dst):
    """``src`` with layer 0's kv-head 0 (query heads 0, 1) made a retrieval head.

    Every token's embedding gets a constant on dim 0 (the query side), digit tokens alone a large
    value on dim 1 (the key side), so the head's queries match the keys of the planted code's digits
    from anywhere in the prompt, through pairs 30 and 31 only: they rotate by under 0.2 rad over the
    prompt, so the match survives the distance. Pairs 0-3 carry random query/key weights loud on every
    token, larger by ‖q_i‖·‖k_i‖ (the 2-norm score) than the retrieval pairs, which are loud on keys of
    the few digit tokens only; the head's other pairs are zero.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(src))
    digits = [i for i in range(len(tok)) if any(c.isdigit() for c in tok.decode([i]))]
    g = torch.Generator().manual_seed(5)
    d, half = 64, 32
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 0.5
        emb[:, 1] = 0.0
        emb[digits, 1] = 0.5
        model.model.layers[0].input_layernorm.weight[:2] = 1.0
        for head in (0, 1):  # query heads of kv-head 0
            rows = attn.q_proj.weight[head * d:(head + 1) * d]
            rows.zero_()
            for p in LOW_PAIRS:
                rows[p, 0] = 1.5
            for p in HIGH_PAIRS:
                rows[[p, p + half]] = torch.randn(2, rows.shape[1], generator=g) * 0.25
        rows = attn.k_proj.weight[:d]
        rows.zero_()
        for p in LOW_PAIRS:
            rows[p, 1] = 1.5
        for p in HIGH_PAIRS:
            rows[[p, p + half]] = torch.randn(2, rows.shape[1], generator=g) * 0.25
    model.save_pretrained(str(dst))
    tok.save_pretrained(str(dst))
    return dst


@pytest.fixture(scope="module")
def retrieval_head_model(tiny_model_factory, tmp_path_factory):
    return build_retrieval_head_model(tiny_model_factory(TinySpec()), tmp_path_factory.mktemp("retrieval-head"))


@pytest.mark.slow
def test_a_hand_made_retrieval_head_ranks_first_and_keeps_its_low_pairs(retrieval_head_model, calib_text_file,
                                                                         tmp_path):
    spec = read_source_spec(retrieval_head_model)
    text = calib_text_file.read_text()
    tok = __import__("transformers").AutoTokenizer.from_pretrained(str(retrieval_head_model))
    prompts = build_fact_prompts(lambda s: tok(s, add_special_tokens=False).input_ids, text_paragraphs(text), 4, 768)
    scores = collect_retrieval_scores(spec, prompts, load_capturing_model(spec.path), show_progress=False)
    heads = scores.head_scores  # [layers 2, kv-heads 2]
    print("retrieval scores per kv-head:", heads.tolist())
    assert heads.argmax().item() == 0 and heads[0, 0] > 0.5  # layer 0, kv-head 0
    assert heads.flatten()[1:].max() < 0.5 * heads[0, 0]
    assert retrieval_head_mask(heads, 0.25).nonzero().tolist() == [[0, 0]]
    stats = load_or_collect(spec, text, tmp_path, max_tokens=2048, seq_len=256)
    two_norm = select_pairs_by_score(stats.pair_scores[0], 4)
    retrieval = select_pairs_retrieval(stats.pair_scores[0], retrieval_head_mask(heads, 0.25)[0], 4, 0.5)
    assert two_norm[0].tolist() == list(HIGH_PAIRS)  # 2-norm drops the pairs retrieval depends on
    best_two = sorted(two_norm[0].tolist(), key=lambda p: -float(stats.pair_scores[0, 0, p]))[:2]
    assert retrieval[0].tolist() == sorted(best_two) + list(LOW_PAIRS)  # low pairs + the best-scored rest
    assert retrieval[1].tolist() == two_norm[1].tolist()


@pytest.mark.slow
def test_retrieval_conversion_round_trips_through_the_checkpoint(retrieval_head_model, calib_text_file, tmp_path,
                                                                 capsys):
    dst = tmp_path / "mla"
    rc = cli_main(["convert", str(retrieval_head_model), str(dst), "--rope-dim", "8", "--d-kv", "16", "--strategy",
                   "retrieval", "--retrieval-heads", "0.25", "--retrieval-pairs", "0.5", "--retrieval-prompts", "2",
                   "--retrieval-tokens", "512", "--calib-text", str(calib_text_file), "--calib-tokens", "2048",
                   "--dtype", "float32", "--layout", "exact"])
    out = capsys.readouterr().out
    assert rc == 0 and "retrieval heads" in out and "L0 kv0" in out
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["mha2mla"]["strategy"] == "retrieval"
    pairs = cfg["mha2mla"]["rope_pairs"]
    assert pairs[0][0][2:] == list(LOW_PAIRS) and set(pairs[0][0][:2]) < set(HIGH_PAIRS)
    report = json.loads((dst / "mha2mla_report.json").read_text())
    assert [(h["layer"], h["kv_head"], h["forced_pairs"]) for h in report["retrieval"]["heads"]] == [(0, 0, 2)]
    assert report["retrieval"]["prompts"] == 2 and report["options"]["retrieval_tokens"] == 512
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(0))
    model = load_reference(dst)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 40, 512) and torch.isfinite(logits).all()
    # the 2-norm conversion of the same model keeps the loud fast pairs instead
    convert(retrieval_head_model, tmp_path / "two-norm", ConvertOptions(
        rope_dim=8, d_kv=16, strategy="2-norm", calib_text=calib_text_file, calib_tokens=2048, dtype="float32",
        layout="exact"), show_progress=False)
    assert json.loads((tmp_path / "two-norm" / "config.json").read_text())["mha2mla"]["rope_pairs"][0][0] == \
        list(HIGH_PAIRS)


def _refused(capsys, tmp_path, src, extra, message):
    dst = tmp_path / "out"
    rc = cli_main(["convert", str(src), str(dst), "--rope-dim", "8", "--d-kv", "8", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert not dst.exists()


def test_bad_retrieval_options_are_refused(tiny_model_factory, tmp_path, capsys):
    src = tiny_model_factory(TinySpec())
    r = ["--strategy", "retrieval"]
    for bad in ("0", "1.5", "-0.2"):
        _refused(capsys, tmp_path, src, [*r, "--retrieval-heads", bad], f"--retrieval-heads {float(bad)} must be a "
                                                                          "share in (0, 1]")
        _refused(capsys, tmp_path, src, [*r, "--retrieval-pairs", bad], f"--retrieval-pairs {float(bad)} must be a "
                                                                          "share")
    _refused(capsys, tmp_path, src, [*r, "--retrieval-prompts", "0"], "--retrieval-prompts must be at least 1")
    _refused(capsys, tmp_path, src, [*r, "--retrieval-tokens", "4096"], "--retrieval-tokens 4096 must lie in [128, 1024]")
    _refused(capsys, tmp_path, src, ["--strategy", "2-norm", "--retrieval-heads", "0.2"],
             "--retrieval-heads goes with --strategy retrieval")
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy2(src / f, no_tokenizer / f)
    _refused(capsys, tmp_path, no_tokenizer, r, "--strategy retrieval / --svd joint calibrate on text")


def test_the_studys_padded_values_leave_attention_unchanged():
    """rope_retrieval_study pads the converted model's narrower values so SDPA takes the fused CPU kernel."""
    from benchmarks.studies.rope_retrieval_study import fused_attention, summarise

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 3, 50, 24), torch.randn(1, 3, 50, 24), torch.randn(1, 3, 50, 16)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2)
    with fused_attention():
        got = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    records = [{"task": "niah", "length": 1024, "logprob": -2.0, "exact": True, "first": True},
               {"task": "niah", "length": 1024, "logprob": -4.0, "exact": False, "first": True}]
    assert summarise(records) == {"niah/1024": {"n": 2, "logprob": -3.0, "exact": 0.5, "first": 1.0}}


# --- --allocate retrieval-band ---------------------------------------------------------------------

def test_the_band_is_the_window_of_highest_retrieval_scores_at_equal_cache():
    scores = [0.01, 0.2, 0.0, 0.0, 0.3, 0.4, 0.0, 0.5, 0.1, 0.0, 0.0, 0.05]  # 12 layers: a band of 4
    widths, band = retrieval_band(scores, total=12 * 96)
    assert band == (4, 7)  # 0.3 + 0.4 + 0 + 0.5 beats every other window of four
    assert widths == [72] * 4 + [144] * 4 + [72] * 4 and sum(widths) == 12 * 96
    # SmolLM2-135M's measured retrieval scores (per layer, the best kv-head): the band is layers 14-23
    smollm2 = [0.01, 0.007, 0.009, 0.003, 0.004, 0.005, 0.04, 0.194, 0.091, 0.006, 0.007, 0.006, 0.011, 0.017,
               0.237, 0.082, 0.009, 0.259, 0.464, 0.047, 0.508, 0.324, 0.127, 0.295, 0.042, 0.009, 0.038, 0.007,
               0.027, 0.011]
    widths, band = retrieval_band(smollm2, total=30 * 96)
    assert band == (14, 23) and widths == [72] * 14 + [144] * 10 + [72] * 6


def test_band_widths_stay_aligned_under_the_budget_and_the_rank_cap():
    widths, band = retrieval_band([0.0] * 9 + [1.0] * 3 + [0.0] * 8, total=20 * 50)
    assert band == (5, 11)  # windows 5-11 ... 9-15 tie (all hold layers 9-11): the earliest
    assert all(w % 8 == 0 for w in widths) and sum(widths) <= 20 * 50
    assert widths[9] == 72 and widths[0] == (1000 - 7 * 72) // 13 // 8 * 8
    capped, _ = retrieval_band([1.0] * 3 + [0.0] * 6, total=9 * 96, max_rank=120)
    assert max(capped) == 120 and sum(capped) <= 9 * 96
    with pytest.raises(ConversionError, match="too small for a retrieval band"):
        retrieval_band([1.0, 0.0, 0.0], total=3 * 8)
    with pytest.raises(ConversionError, match="share in \\(0, 1\\)"):
        retrieval_band([1.0, 0.0, 0.0], total=300, share=1.0)


@pytest.mark.slow
def test_retrieval_band_conversion_widens_the_retrieval_head_layer(tiny_model_factory, retrieval_head_model,
                                                                   calib_text_file, tmp_path, capsys):
    """On the model whose layer 0 carries the retrieval head, the band (one of two layers) is layer 0 at 1.5x
    the average latent, layer 1 at what is left; the report says so and the checkpoint loads."""
    dst = tmp_path / "band"
    rc = cli_main(["convert", str(retrieval_head_model), str(dst), "--rope-dim", "8", "--d-kv", "16", "--allocate",
                   "retrieval-band", "--retrieval-prompts", "2", "--retrieval-tokens", "512", "--calib-text",
                   str(calib_text_file), "--calib-tokens", "2048", "--dtype", "float32", "--layout", "exact"])
    out = capsys.readouterr().out
    assert rc == 0 and "allocation (retrieval-band): layers 0-0" in out
    report = json.loads((dst / "mha2mla_report.json").read_text())
    allocation = report["allocation"]
    assert allocation["band"] == [0, 0] and allocation["layer_latent"] == [48, 16]  # 2 kv-heads x 16 = 32 average
    assert allocation["layer_retrieval_scores"][0] > allocation["layer_retrieval_scores"][1]
    with torch.no_grad():
        logits = load_reference(dst)(torch.randint(0, 512, (1, 24))).logits
    assert torch.isfinite(logits).all()
    _refused(capsys, tmp_path, tiny_model_factory(TinySpec()), ["--allocate", "retrieval-band",
                                                                "--allocation-passes", "2"],
             "go with --allocate measured, not retrieval-band")
    _refused(capsys, tmp_path, tiny_model_factory(TinySpec()), ["--allocate", "retrieval-band",
                                                                "--retrieval-heads", "0.2"],
             "--retrieval-heads goes with --strategy retrieval")

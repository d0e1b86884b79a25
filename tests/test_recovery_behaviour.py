"""Behaviour-preserving recovery: chat distillation data, the generalised JSD, the on-policy stage.

Tiny real checkpoints on disk; the engine hooks are plain PyTorch here (sampling with the
reference model), so the on-policy stage's logic is checked without vLLM. The vLLM hooks run in
tests/test_recovery.py's engine test."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conversion import ConvertOptions, convert, load_reference
from conversion.cli import main as cli_main
from conversion.errors import ConversionError
from conversion.recovery.chat_data import (
    KINDS, Question, build_chat_prompts, continuation_prompts, is_training_question, load_training_questions,
)
from conversion.recovery.corpus import is_held_out, load_default_corpus, split_key
from conversion.recovery.engine_hooks import EngineHooks
from conversion.recovery.losses import distillation_loss, generalized_jsd
from conversion.recovery.onpolicy import (
    OnPolicyOptions, completion_mask, divergence_on, onpolicy_examples, run_onpolicy_stage, teacher_examples,
)
from conversion.recovery.structure import StructureGuard
from conversion.text_data import shared_text_path, split_text
from tests.helpers import TinySpec

SPEC = TinySpec(num_heads=4, num_kv_heads=2, head_dim=64, hidden_size=256, num_layers=2)


# ----------------------------------------------------------------------------- pure parts

def test_generalized_jsd_is_forward_kl_at_0_reverse_kl_at_1_and_zero_only_for_equal_distributions():
    torch.manual_seed(0)
    s, t = torch.randn(6, 17), torch.randn(6, 17)
    assert float(generalized_jsd(s, t, beta=0.0)) == pytest.approx(float(distillation_loss(s, t)), rel=1e-5)
    p_s = s.softmax(-1)
    reverse = (p_s * (s.log_softmax(-1) - t.log_softmax(-1))).sum(-1).mean()
    assert float(generalized_jsd(s, t, beta=1.0)) == pytest.approx(float(reverse), rel=1e-5)
    mid = float(generalized_jsd(s, t, beta=0.5))
    assert 0 < mid < min(float(reverse), float(distillation_loss(s, t)))  # JSD is bounded by either KL
    assert mid == pytest.approx(float(generalized_jsd(t, s, beta=0.5)), rel=1e-5)  # symmetric at 0.5
    for beta in (0.0, 0.3, 1.0):
        assert float(generalized_jsd(t, t, beta=beta)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        generalized_jsd(s, t, beta=1.5)


def test_completion_mask_scores_exactly_the_positions_that_predict_the_completion():
    assert completion_mask(3, 6) == [0, 0, 1, 1, 1, 0]
    assert completion_mask(1, 2) == [1, 0]
    with pytest.raises(ValueError):
        completion_mask(0, 4)
    examples = onpolicy_examples([[1, 2, 3], [4, 5], [6] * 9], [[7, 8], [], [9, 9]], max_len=10)
    assert [e["input_ids"] for e in examples] == [[1, 2, 3, 7, 8], [6] * 9 + [9]]  # empty answer dropped, cut at 10
    assert examples[0]["loss_mask"] == [0, 0, 1, 1, 0]
    picked = teacher_examples([[1, 2, 3], [4, 5, 6, 7]], 5, max_len=3, rng=random.Random(0))
    assert sorted(e["input_ids"] for e in picked) == [[1, 2, 3], [4, 5, 6]]
    assert all(e["loss_mask"] == [1, 1, 0] for e in picked)


def _train_side_docs(n: int) -> list[str]:
    docs = [f"Topic {i}\nTopic {i} is a subject with facts number {i}." for i in range(4 * n)]
    return [d for d in docs if not is_held_out(split_key(d))][:n]


def _questions(n: int) -> list[Question]:
    qs = [Question(f"What is fact {i}?", str(i), (f"Topic {i}\nTopic {i} has fact {i}.",), "test") for i in range(4 * n)]
    return [q for q in qs if is_training_question(q)][:n]


def test_chat_prompts_follow_the_mix_are_seeded_and_refuse_held_out_text():
    docs, questions = _train_side_docs(40), _questions(40)
    prompts, mix = build_chat_prompts(questions, docs, 200, seed=3)
    again, _ = build_chat_prompts(questions, docs, 200, seed=3)
    assert [p.messages for p in prompts] == [p.messages for p in again]
    assert [p.messages for p in prompts] != [p.messages for p in build_chat_prompts(questions, docs, 200, seed=4)[0]]
    assert sum(mix.kinds.values()) == 200 and set(mix.kinds) == set(KINDS)
    assert mix.kinds["question"] == 50 and mix.kinds["multi_turn"] == 30  # DEFAULT_MIX: 25% and 15%
    assert all(p.messages[-1]["role"] == "user" for p in prompts)
    assert all((p.follow_up is not None) == (p.kind == "multi_turn") for p in prompts)
    assert 0 < mix.custom_system < 100  # some conversations carry their own system prompt, most the template's
    held_doc = next(d for d in (f"Held {i}\ntext {i}" for i in range(500)) if is_held_out(split_key(d)))
    with pytest.raises(ConversionError, match="held-out"):
        build_chat_prompts(questions, docs + [held_doc], 10)
    only_docs, mix = build_chat_prompts([], docs, 50)  # a user's own --data: no corpus questions
    assert "question" not in mix.kinds and len(only_docs) == 50
    assert continuation_prompts(docs, 3, seed=1) == continuation_prompts(docs, 3, seed=1)


@pytest.mark.slow
def test_corpus_chat_data_never_shows_held_out_or_evaluation_text(corpus_cache):
    """Training conversations come from the corpus's training side only; the held-out paragraphs
    (perplexity) and the agreement evaluation's prompts never appear in them."""
    corpus = load_default_corpus(corpus_cache)
    questions = load_training_questions(corpus_cache)
    assert len(questions) > 5000 and all(is_training_question(q) for q in questions)
    prompts, _ = build_chat_prompts(questions, corpus.train, 3000, seed=0)
    texts = [t for p in prompts for t in p.user_texts()]
    held_titles = {split_key(d) for d in corpus.held_out if "\n" in d}
    for text in texts:
        for line in text.split("\n"):
            assert line[:200] not in held_titles or not line
    held_bodies = [d.split("\n", 1)[-1][:120] for d in corpus.held_out[:300]]
    joined = "\n".join(texts)
    assert not any(body in joined for body in held_bodies)
    from vllm_mha2mla.tools.evaluation.agreement import agreement_prompts
    eval_texts = {m["content"] for conv in agreement_prompts(corpus.held_out) for m in conv if m["role"] == "user"}
    assert eval_texts and not eval_texts & set(texts)


# ----------------------------------------------------------------------------- the on-policy stage

@pytest.fixture(scope="module")
def chat_setup(tiny_model_factory, tmp_path_factory):
    src = tiny_model_factory(SPEC)
    mla = tmp_path_factory.mktemp("onpolicy") / "mla"
    convert(src, mla, ConvertOptions(rope_dim=16, d_kv=16, strategy="high", svd="joint", layout="exact",
                                     dtype="float32"), show_progress=False)
    return {"src": src, "mla": mla}


def _torch_hooks() -> EngineHooks:
    """Samples with the PyTorch reference model (what vLLM does through the plugin, slower)."""

    def sample(model_dir, prompt_ids, max_tokens, temperature, seed):
        torch.manual_seed(seed)
        model = load_reference(model_dir, dtype=torch.float32).eval()
        out = []
        with torch.no_grad():
            for ids in prompt_ids:
                gen = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=True,
                                     temperature=temperature, top_k=0, pad_token_id=0)
                out.append(gen[0, len(ids):].tolist())
        return out

    def unused(*_):
        raise AssertionError("not used by the on-policy stage")

    return EngineHooks(answer_chats=unused, continue_texts=unused, sample_completions=sample, name="torch")


def _prompts(k: int, n: int = 8):
    docs = _train_side_docs(30)
    calib, _ = split_text(shared_text_path().read_text())
    docs = [d + " " + calib[i * 200: i * 200 + 150] for i, d in enumerate(docs)]
    return build_chat_prompts([], docs, n, seed=k, mix={"instruction": 1, "open": 1})[0]


@pytest.mark.slow
def test_onpolicy_stage_lowers_the_reverse_kl_on_held_out_prompts_and_keeps_the_structure(chat_setup, tmp_path):
    tok = AutoTokenizer.from_pretrained(str(chat_setup["mla"]))
    teacher = AutoModelForCausalLM.from_pretrained(str(chat_setup["src"]), dtype=torch.float32).eval()
    student = load_reference(chat_setup["mla"], dtype=torch.float32)
    hooks = _torch_hooks()
    held_prompts = [tok.apply_chat_template(p.messages, add_generation_prompt=True) for p in _prompts(999, 8)]
    held_prompts = [list(ids["input_ids"] if hasattr(ids, "keys") else ids) for ids in held_prompts]
    held = onpolicy_examples(held_prompts, hooks.sample_completions(chat_setup["mla"], held_prompts, 24, 1.0, 7), 256)
    pad = tok.eos_token_id
    before = divergence_on(student, teacher, held, 1.0, pad)
    saved = []
    opts = OnPolicyOptions(rounds=2, prompts_per_round=8, max_new_tokens=24, beta=1.0, lmbda=1.0, lr=2e-3,
                           batch_size=4, epochs=3)

    def save(path):
        from conversion.recovery.finetune import save_checkpoint

        save_checkpoint(student, chat_setup["mla"], path, True, {}, {})
        saved.append(path)

    report = run_onpolicy_stage(student, teacher, tok, hooks, lambda k: _prompts(k), save, lambda p: None, opts,
                                tmp_path / "work", max_len=256, log=lambda *_: None)
    after = divergence_on(student, teacher, held, 1.0, pad)
    assert len(report.rounds) == 2 and len(saved) == 2
    assert all(r["divergence_after"] < r["divergence_before"] for r in report.rounds)
    assert after < 0.9 * before, (before, after)  # on prompts it never trained on
    assert StructureGuard(student).max_violation() == 0.0


@pytest.mark.slow
def test_onpolicy_and_synthesis_need_an_engine_and_say_so(chat_setup, tmp_path, capsys):
    """`python -m conversion.cli` has no vLLM: sampling stages are refused with the way out."""
    data = tmp_path / "d.txt"
    data.write_text(split_text(shared_text_path().read_text())[0][:20_000])
    for extra in (["--stage", "onpolicy"], ["--stage", "global", "--synthesize", "1000"]):
        code = cli_main(["finetune", str(chat_setup["mla"]), str(tmp_path / "out"), "--teacher", str(chat_setup["src"]),
                         "--data", str(data), "--seq-len", "64", *extra])
        err = capsys.readouterr().err
        assert code == 2 and "mha2mla finetune" in err and "vLLM" in err
        assert not (tmp_path / "out").exists()


def test_general_requests_stay_clear_of_the_demo_prompts():
    """The demo's chat prompts are its evaluation: no training request repeats one or opens like one."""
    from conversion.recovery.chat_data import GENERAL_REQUESTS
    from vllm_mha2mla.tools.demo import DEFAULT_PROMPTS

    def opening(text):
        return tuple(text.lower().split()[:4])

    assert not {opening(p) for p in DEFAULT_PROMPTS} & {opening(r) for r in GENERAL_REQUESTS}
    words = {w.strip(".?,'").lower() for p in DEFAULT_PROMPTS for w in p.split() if len(w) > 5}
    for request in GENERAL_REQUESTS:  # no request about the same thing: at most one shared long word
        assert len({w.strip(".?,'").lower() for w in request.split() if len(w) > 5} & words) <= 1, request


def test_local_stage_windows_come_from_the_whole_mixed_dataset():
    """window_ids spreads its picks over a concatenation (corpus windows, then synthesized ones), so the
    local stage sees the teacher's conversations in their share instead of the corpus alone."""
    from conversion.recovery.finetune import window_ids

    corpus = [{"input_ids": torch.full((8,), 1)} for _ in range(30)]
    chats = [{"input_ids": torch.full((8,), 2)} for _ in range(70)]
    ids = window_ids(corpus + chats, num_tokens=80, seq_len=4)
    assert ids.shape == (20, 4)
    assert int((ids == 2).sum()) == 4 * 14 and int((ids == 1).sum()) == 4 * 6  # 70% / 30%, as the data
    with pytest.raises(ConversionError):
        window_ids([{"input_ids": torch.ones(3, dtype=torch.long)}], num_tokens=3, seq_len=5)


@pytest.mark.fast
def test_the_sampling_engines_gpu_share_comes_from_the_environment(monkeypatch):
    """Several trainings or evaluations on one GPU each give their sampling engine a smaller
    share; a share that is not a fraction is refused by name."""
    from vllm_mha2mla.tools import synthesize

    monkeypatch.delenv(synthesize.GPU_MEMORY_ENV, raising=False)
    assert synthesize.gpu_memory_utilization() == synthesize.DEFAULT_GPU_MEMORY_UTILIZATION
    monkeypatch.setenv(synthesize.GPU_MEMORY_ENV, "0.15")
    assert synthesize.gpu_memory_utilization() == 0.15
    for bad in ("1.5", "half"):
        monkeypatch.setenv(synthesize.GPU_MEMORY_ENV, bad)
        with pytest.raises(ValueError, match=synthesize.GPU_MEMORY_ENV):
            synthesize.gpu_memory_utilization()


@pytest.mark.fast
def test_the_mix_reads_fresh_corpus_and_repeats_the_scarce_teacher_windows():
    """A run longer than the synthesis: fresh corpus windows for its corpus share, the teacher's
    repeated to reach theirs; a shorter run: every teacher window and the corpus windows that
    match them; a corpus too small for its share: all of it."""
    from conversion.recovery.finetune import mix_sizes

    keep, repeats = mix_sizes(corpus_windows=4000, synthesized_windows=1200, windows_needed=8300, share=0.5)
    assert (keep, repeats) == (4000, 4)
    assert abs(1200 * repeats / (keep + 1200 * repeats) - 0.5) < 0.06
    keep, repeats = mix_sizes(corpus_windows=10_000, synthesized_windows=1200, windows_needed=3000, share=0.5)
    assert (keep, repeats) == (1500, 2)
    assert mix_sizes(corpus_windows=10_000, synthesized_windows=377, windows_needed=100, share=0.7) == (162, 1)
    assert mix_sizes(corpus_windows=50, synthesized_windows=377, windows_needed=2000, share=0.7) == (50, 4)
    with pytest.raises(ValueError, match="share 1.0"):
        mix_sizes(10, 10, 10, 1.0)


def test_free_text_is_sampled_from_the_start_token_alone_cached_and_joins_the_windows(chat_setup, tmp_path):
    """--free-text-share: that share of --synthesize comes from the teacher sampling at temperature 1
    from its BOS with no prompt; the samples join the global stage's windows but not the on-policy
    stage's conversations; a second run reads both caches and starts no engine."""
    from conversion.recovery import finetune as ft

    calls = {"chats": 0, "free": []}

    def answer_chats(model_dir, conversations, follow_ups, max_tokens, seed):
        calls["chats"] += 1
        return [list(c) + [{"role": "assistant", "content": "An answer."}] for c in conversations]

    def sample_completions(model_dir, prompt_ids, max_tokens, temperature, seed):
        calls["free"].append((prompt_ids, max_tokens, temperature))
        return [[5 + i % 7, 6, 7, 8, 1] for i in range(len(prompt_ids))]  # ends at EOS (id 1)

    hooks = EngineHooks(answer_chats=answer_chats, continue_texts=None, sample_completions=sample_completions,
                        name="fake")
    data = tmp_path / "data.txt"
    data.write_text("\n\n".join(f"Document {i} talks about subject {i} at some length." for i in range(60)))
    tok = AutoTokenizer.from_pretrained(str(chat_setup["src"]))
    opts = ft.FinetuneOptions(teacher=chat_setup["src"], data=[data], seq_len=64, synthesize=3000,
                              free_text_share=0.4, cache_dir=tmp_path / "cache", show_progress=False)
    synthesis = ft._synthesize(opts, tok, lambda *_: None, hooks)
    (prompts, max_tokens, temperature), = calls["free"]
    assert set(map(tuple, prompts)) == {(tok.bos_token_id,)} and temperature == 1.0
    assert max_tokens == ft.FREE_TEXT_MAX_TOKENS and len(prompts) == 4  # ceil(1200 / (512 * 0.75))
    record = synthesis.record
    assert record["kind"] == "chat" and record["conversations"] == 6  # ceil(1800 / 350)
    assert record["free_text"]["samples"] == 4 and record["free_text"]["tokens"] > 0
    assert len(synthesis.sequences) == 6  # conversations only: the on-policy stage's teacher share
    assert record["tokens"] == sum(map(len, synthesis.sequences)) + record["free_text"]["tokens"]
    assert sum(1 for _ in (tmp_path / "cache" / "synthesized").glob("free-*.json")) == 1

    def no_engine(*_):
        raise AssertionError("the second run must read the caches")

    again = ft._synthesize(opts, tok, lambda *_: None, EngineHooks(no_engine, no_engine, no_engine, "none"))
    assert again.record["free_text"] == record["free_text"] and calls["chats"] == 1
    with pytest.raises(ConversionError, match="--free-text-share"):
        ft.resolve_stage(ft.FinetuneOptions(teacher=chat_setup["src"], free_text_share=1.5))

"""Recovery at the full context: long training windows, the sequence-length schedule, long documents.

Tiny real checkpoints (``max_position_embeddings`` 1024) on the CPU; sizes are kept small. What is
checked: windows of the full context pack and mask like short ones; the schedule gives the stated
token shares with equal tokens per step, through Hugging Face's Trainer too; long documents hold
their gold paragraphs at the depth they state and never a held-out paragraph or question, nor an
evaluation prompt; a run resumed across a phase boundary equals an uninterrupted one."""

import json
import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conversion import ConvertOptions, convert, load_reference
from conversion.errors import ConversionError
from conversion.recovery.chat_data import Question, is_training_question
from conversion.recovery.corpus import is_held_out, split_key
from conversion.recovery.data import ScheduledBatches, build_token_windows, collate_windows
from conversion.recovery.global_stage import (
    GlobalOptions, Phase, latest_complete_checkpoint, parse_seq_len_schedule, plan_schedule, run_global_stage,
)
from conversion.recovery.long_docs import (
    build_long_documents, fill_windows, first_sentence_split, long_document_windows,
)
from conversion.text_data import shared_text_path, split_text
from tests.helpers import TinySpec

SPEC = TinySpec(num_heads=4, num_kv_heads=2, head_dim=64, hidden_size=256, num_layers=2)
CONTEXT = 1024  # the tiny models' max_position_embeddings


@pytest.fixture(scope="module")
def tok(tiny_model_factory):
    return AutoTokenizer.from_pretrained(str(tiny_model_factory(SPEC)))


def _training_side(n: int, seed: int = 0) -> tuple[list[str], list[Question]]:
    """``n`` corpus-style documents ("Title\\nsentences") and a question over each, training side only."""
    calib, _ = split_text(shared_text_path().read_text())
    words = [w for w in calib.split() if w.isalpha()][:4000]
    rng = random.Random(seed)
    docs, questions = [], []
    k = 0
    while len(docs) < n:
        title = f"Article {k} {words[k % len(words)]}"
        k += 1
        if is_held_out(title):
            continue
        body = ". ".join(" ".join(rng.choice(words) for _ in range(9)).capitalize() for _ in range(4)) + "."
        doc = f"{title}\n{body}"
        docs.append(doc)
        q = Question(f"What does {title} say about item {k}?", f"Answer {k}", (doc,), "hotpotqa")
        if is_training_question(q):
            questions.append(q)
    return docs, questions


# ----------------------------------------------------------------------------- the schedule


def test_the_schedule_gives_the_stated_token_shares_with_equal_tokens_per_step():
    schedule = parse_seq_len_schedule("64:0.5, 128:0.25,256:0.25")
    assert schedule == [(64, 0.5), (128, 0.25), (256, 0.25)]
    opts = GlobalOptions(tokens=40 * 4 * 2 * 64, batch_size=4, grad_accum=2)
    phases = plan_schedule(schedule, opts, seq_len=64, world=2)
    tokens_per_step = opts.tokens_per_step(64, 2)
    assert [p.steps for p in phases] == [10, 5, 5]
    assert [p.batch for p in phases] == [4, 2, 1]  # 256 tokens a micro-batch in every phase
    assert {p.batch * p.seq_len for p in phases} == {256}
    assert sum(p.steps for p in phases) * tokens_per_step >= opts.tokens
    for p, (_, share) in zip(phases, schedule):
        assert p.steps * tokens_per_step == share * 20 * tokens_per_step
    odd = plan_schedule([(64, 0.6), (128, 0.4)], GlobalOptions(tokens=7 * 256, batch_size=4), 64, 1)
    assert [p.steps for p in odd] == [4, 3]  # largest remainder: 4.2 + 2.8 -> the steps of the run
    for bad, match in [("64:0.5,128", "LENGTH:SHARE"), ("64:0.5,128:0.6", "sum"), ("64:0.5,64:0.5", "distinct"),
                       ("", "empty"), ("64:1,", None)]:
        if match is None:
            assert parse_seq_len_schedule(bad) == [(64, 1.0)]
            continue
        with pytest.raises(ConversionError, match=match):
            parse_seq_len_schedule(bad)
    with pytest.raises(ConversionError, match="do not fill exactly"):
        plan_schedule([(96, 1.0)], GlobalOptions(tokens=1000, batch_size=4), 64, 1)


class _Rows(torch.utils.data.Dataset):
    """Windows whose first token says which window it is."""

    def __init__(self, n, seq_len, tag):
        self.ids = torch.arange(n * seq_len).view(n, seq_len) + tag
        self.ids[:, 0] = torch.arange(n) + tag
        self.seq_len = seq_len

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_scheduled_batches_follow_the_phases_in_order_with_equal_tokens_and_no_longer_window():
    phases = [Phase(64, 0.5, 3, 4), Phase(128, 0.25, 2, 2), Phase(256, 0.25, 1, 1)]
    data = [_Rows(10, 64, 0), _Rows(3, 128, 10_000), _Rows(50, 256, 20_000)]
    batches = ScheduledBatches(phases, data, grad_accum=2, world=2, seed=5)
    assert len(batches) == (3 + 2 + 1) * 4 and batches.tokens_per_micro_batch == 256
    shapes = [tuple(batches[i]["input_ids"].shape) for i in range(len(batches))]
    assert shapes == [(4, 64)] * 12 + [(2, 128)] * 8 + [(1, 256)] * 4
    # under torchrun, rank r reads items r, r + world, ...: every optimizer step stays in one phase
    for step in range(6):
        items = [(micro * 2 + rank) for micro in range(step * 2, step * 2 + 2) for rank in range(2)]
        assert len({batches.phase_of(i) for i in items}) == 1
    # a phase reads each of its windows once before any twice, in a seeded order
    first = [int(batches[i]["input_ids"][r, 0]) for i in range(12) for r in range(4)]
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    assert batches.repeats(0) == pytest.approx(4.8) and batches.repeats(2) == pytest.approx(4 / 50)
    again = ScheduledBatches(phases, data, grad_accum=2, world=2, seed=5)
    assert all(torch.equal(batches[i]["input_ids"], again[i]["input_ids"]) for i in range(len(batches)))
    other = ScheduledBatches(phases, data, grad_accum=2, world=2, seed=6)
    assert not all(torch.equal(batches[i]["input_ids"], other[i]["input_ids"]) for i in range(12))
    for i in range(len(batches)):
        item = batches[i]
        assert torch.equal(item["labels"], item["input_ids"]) and item["input_ids"].shape[1] <= 256
    assert batches.tokens_by_seq_len(4) == {"64": 3 * 1024, "128": 1024, "256": 0}
    assert [batches.seq_len_at_step(s) for s in range(6)] == [64, 64, 64, 128, 128, 256]
    stacked = collate_windows([data[0][0], data[0][1]])
    assert stacked["input_ids"].shape == (2, 64)
    assert collate_windows([batches[0]])["input_ids"].shape == (4, 64)
    with pytest.raises(ConversionError, match="differ in tokens"):
        ScheduledBatches([Phase(64, 0.5, 1, 4), Phase(128, 0.5, 1, 1)], data[:2])


def test_interleaved_steps_keep_every_prefix_of_the_run_at_the_shares():
    """--seq-len-order interleaved: any prefix of the run (one cut short by --max-minutes) holds each
    length within one step of its share; the micro-batches of a step stay of one length."""
    from conversion.recovery.data import step_lengths

    steps = [30, 12, 6]
    plan = step_lengths(steps, "interleaved")
    assert sorted(plan) == step_lengths(steps, "phases") == [0] * 30 + [1] * 12 + [2] * 6
    for prefix in range(1, len(plan) + 1):
        for k, n in enumerate(steps):
            assert abs(plan[:prefix].count(k) - n * prefix / 48) <= 1, (prefix, k)
    phases = [Phase(64, 0.5, 3, 4), Phase(128, 0.25, 2, 2), Phase(256, 0.25, 1, 1)]
    data = [_Rows(10, 64, 0), _Rows(3, 128, 10_000), _Rows(50, 256, 20_000)]
    mixed = ScheduledBatches(phases, data, grad_accum=2, world=2, seed=5, order="interleaved")
    plain = ScheduledBatches(phases, data, grad_accum=2, world=2, seed=5)
    assert [mixed.seq_len_at_step(s) for s in range(6)] != [plain.seq_len_at_step(s) for s in range(6)]
    by_length = {}
    for i in range(len(mixed)):
        ids = mixed[i]["input_ids"]
        assert ids.shape[1] == mixed.seq_len_at_step(i // 4)
        by_length.setdefault(ids.shape[1], []).append(ids)
    for n, rows in by_length.items():  # each length reads the same windows in the same order either way
        same = [plain[i]["input_ids"] for i in range(len(plain)) if plain[i]["input_ids"].shape[1] == n]
        assert all(torch.equal(a, b) for a, b in zip(rows, same, strict=True))
    with pytest.raises(ConversionError, match="order"):
        step_lengths(steps, "random")


def test_windows_of_the_full_context_pack_with_eos_between_documents(tok):
    docs, _ = _training_side(40)
    windows = build_token_windows(tok, docs, CONTEXT, name="long", show_progress=False)
    stream = []
    for d in tok(docs, add_special_tokens=False)["input_ids"]:
        stream += d + [tok.eos_token_id]
    assert len(windows) == len(stream) // CONTEXT > 0
    for i in range(len(windows)):
        item = windows[i]
        assert item["input_ids"].tolist() == stream[i * CONTEXT: (i + 1) * CONTEXT]
        assert torch.equal(item["labels"], item["input_ids"])  # the model shifts: every position is a target


# ----------------------------------------------------------------------------- long documents


def test_long_documents_hold_each_gold_paragraph_at_its_stated_depth(tok):
    docs, questions = _training_side(300)
    built = build_long_documents(tok, questions, docs, 12, CONTEXT, seed=1)
    depths = []
    for doc in built:
        assert len(doc.ids) <= CONTEXT - 1 and doc.ids == tok(doc.text, add_special_tokens=False)["input_ids"]
        start, end = doc.haystack
        assert {q.kind for q in doc.queries} <= {"qa", "recall"} and doc.queries
        tail = doc.text[doc.text.index(doc.queries[0].prompt):]
        for q in doc.queries:
            assert q.prompt in tail and q.answer in tail  # asked and answered after the haystack
            for paragraph, position, depth in zip(q.paragraphs, q.positions, q.depths):
                assert start <= position < end
                shown = tok.decode(doc.ids[position:end])
                assert shown.startswith(paragraph), (shown[:80], paragraph[:80])
                assert depth == pytest.approx((position - start) / (end - start), abs=1e-4)
                depths.append(depth)
            if q.kind == "recall":
                cue, rest = first_sentence_split(q.paragraphs[0])
                assert cue in q.prompt and q.answer and rest.startswith(q.answer[:30])
    assert min(depths) < 0.15 and max(depths) > 0.8  # spread over the whole window
    assert built == build_long_documents(tok, questions, docs, 12, CONTEXT, seed=1)
    only_recall = build_long_documents(tok, [], docs, 3, CONTEXT)
    assert {q.kind for d in only_recall for q in d.queries} == {"recall"}


def test_long_document_windows_are_one_document_eos_then_whole_training_text(tok, tmp_path):
    docs, questions = _training_side(300)
    windows, record = long_document_windows(tok, questions, docs, 5, CONTEXT, tmp_path, seed=2)
    assert len(windows) == 5 and windows.seq_len == CONTEXT
    assert record["documents"] == 5 and sum(record["queries"].values()) >= 5
    built = build_long_documents(tok, questions, docs, 5, CONTEXT, seed=2)
    for i, doc in enumerate(built):
        row = windows[i]["input_ids"].tolist()
        assert len(row) == CONTEXT and row[: len(doc.ids)] == doc.ids and row[len(doc.ids)] == tok.eos_token_id
    again, record_again = long_document_windows(tok, questions, docs, 5, CONTEXT, tmp_path, seed=2)
    assert again.path == windows.path and record_again == record  # cached
    filled = fill_windows(built[:1], CONTEXT, tok.eos_token_id, [[7, 8, 9]])
    assert filled.shape == (1, CONTEXT) and filled[0, len(built[0].ids)] == tok.eos_token_id
    with pytest.raises(ConversionError, match="does not fit"):
        fill_windows(built[:1], len(built[0].ids), tok.eos_token_id, [])


def test_long_documents_refuse_held_out_text(tok):
    docs, questions = _training_side(50)
    held_doc = next(f"{t}\nSome text here. More text there." for t in (f"T{i}" for i in range(1000)) if is_held_out(t))
    with pytest.raises(ConversionError, match="held-out"):
        build_long_documents(tok, questions, docs + [held_doc], 1, CONTEXT)
    held_q = next(q for q in (Question(f"Question {i}?", "a", (docs[0],), "hotpotqa") for i in range(1000))
                  if not is_training_question(q))
    with pytest.raises(ConversionError, match="held-out"):
        build_long_documents(tok, questions + [held_q], docs, 1, CONTEXT)


@pytest.mark.slow
def test_corpus_long_documents_never_show_held_out_or_evaluation_text(tok, corpus_cache):
    """From the real corpus: no held-out paragraph or question (``longqa``'s held-out HotpotQA
    questions among them), no essay sentence (``niah``'s haystack), no passkey filler or needle."""
    from conversion.recovery.chat_data import _hotpotqa_questions, _squad_questions, load_training_questions
    from conversion.recovery.corpus import HOTPOTQA, SQUAD, corpus_dir, load_default_corpus, load_training_articles
    from vllm_mha2mla.tools.evaluation import long_context

    corpus = load_default_corpus(corpus_cache)
    questions = load_training_questions(corpus_cache)
    built = build_long_documents(tok, questions, corpus.train, 24, 2048, seed=3)
    texts = [d.text for d in built]
    joined = "\n".join(texts)
    assert all(d.queries for d in built) and sum(len(d.queries) for d in built) >= 36
    folder = corpus_dir(corpus_cache)
    every = _hotpotqa_questions(json.loads((folder / HOTPOTQA).read_text())) + \
        _squad_questions(json.loads((folder / SQUAD).read_text()))
    held_questions = [q.question for q in every if not is_training_question(q)]
    assert held_questions and not any(q in joined for q in held_questions)
    held_bodies = [d.split("\n", 1)[-1][:120] for d in corpus.held_out]
    assert not any(body in joined for body in held_bodies)
    held_titles = {split_key(d) for d in corpus.held_out if "\n" in d}
    assert not any(line[:200] in held_titles for text in texts for line in text.split("\n") if line)
    essay = [s for s in long_context.essay_sentences(corpus.out_of_domain[0]) if len(s) > 60]
    assert not any(s in joined for s in essay[::10])
    assert long_context.PASSKEY_FILLER not in joined and "special magic number" not in joined
    assert "pass key" not in joined.lower()
    articles = "\n".join(load_training_articles(corpus_cache))
    assert len(articles) > 500_000 and not any(body in articles for body in held_bodies)


# ----------------------------------------------------------------------------- attention at long windows


def test_student_and_teacher_attend_at_the_full_context_with_fused_causal_attention(tiny_model_factory, tmp_path,
                                                                                      monkeypatch):
    """No ``[L, L]`` mask is built for a training window: SDPA is called causal without a mask, the
    form its memory-efficient and flash kernels take (on a GPU neither holds the score matrix)."""
    src = tiny_model_factory(SPEC)
    mla = tmp_path / "mla"
    convert(src, mla, ConvertOptions(rope_dim=16, d_kv=16, strategy="high", svd="joint", layout="exact",
                                     dtype="float32"), show_progress=False)
    student = load_reference(mla)
    teacher = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, attn_implementation="sdpa")
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append((attn_mask is None, is_causal, q.shape[-2]))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ids = torch.randint(2, 500, (1, CONTEXT))
    with torch.no_grad():
        student(input_ids=ids, use_cache=False, skip_logits=True)
        teacher.model(input_ids=ids, use_cache=False)
    assert len(calls) == 2 * SPEC.num_layers
    assert all(no_mask and causal and n == CONTEXT for no_mask, causal, n in calls), calls


# ----------------------------------------------------------------------------- the global stage


@pytest.fixture(scope="module")
def trained_setup(tiny_model_factory, tmp_path_factory):
    src = tiny_model_factory(SPEC)
    root = tmp_path_factory.mktemp("long")
    mla = root / "mla"
    convert(src, mla, ConvertOptions(rope_dim=16, d_kv=16, strategy="high", svd="joint", layout="exact",
                                     dtype="float32"), show_progress=False)
    calib, _ = split_text(shared_text_path().read_text())
    data = root / "data.jsonl"
    chunks = [c.strip() for c in calib[:150_000].split("\n\n") if len(c.strip()) > 80]
    data.write_text("".join(json.dumps({"text": c}) + "\n" for c in chunks))
    return {"src": src, "mla": mla, "data": data, "root": root}


def _scheduled(setup, tmp_path, schedule, opts, seed=0):
    """Windows of each length from the setup's text, as the schedule's batches (world 1)."""
    from conversion.recovery.data import read_documents, split_documents, user_training_data

    tok = AutoTokenizer.from_pretrained(str(setup["mla"]))
    _, held = user_training_data(tok, [setup["data"]], 64, cache_dir=tmp_path / "cache", held_out_tokens=4 * 64,
                                 show_progress=False)
    docs = split_documents(read_documents([setup["data"]]))[0]
    phases = plan_schedule(schedule, opts, 64, 1)
    data = [build_token_windows(tok, docs, p.seq_len, tmp_path / "cache", show_progress=False) for p in phases]
    return ScheduledBatches(phases, data, opts.grad_accum, 1, seed=seed), held


def _run_cli(*args):
    from conversion.cli import main as cli_main

    return cli_main(["finetune", *map(str, args)])


def _teacher(setup):
    return AutoModelForCausalLM.from_pretrained(str(setup["src"]), dtype=torch.float32,
                                                attn_implementation="sdpa").eval()


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.slow
def test_the_trainer_reads_the_schedule_in_order_and_a_resume_across_a_phase_boundary_equals_a_whole_run(
        trained_setup, tmp_path):
    """Steps 0-3 train on 2 x 64-token windows, steps 4-7 on 1 x 128 (equal tokens per step); a run
    stopped after step 5 (past the boundary at 4) and resumed ends with the uninterrupted run's weights."""
    from conversion.recovery.global_stage import DistillationTrainer, build_training_arguments

    schedule = [(64, 0.5), (128, 0.5)]
    opts = dict(tokens=8 * 2 * 64, batch_size=2, lr=1e-3, loss="kd", save_every=3, seed=3)
    train, held = _scheduled(trained_setup, tmp_path, schedule, GlobalOptions(**opts))
    # what Trainer's dataloader hands to each micro-step: the schedule's shapes, in order
    args = build_training_arguments(GlobalOptions(**opts), tmp_path / "probe", 8, False, scheduled=True)
    probe = DistillationTrainer(model=load_reference(trained_setup["mla"]), args=args, train_dataset=train,
                                eval_dataset=held, data_collator=collate_windows, teacher=None, loss_kind="lm",
                                temperature=1.0)
    seen = [batch["input_ids"] for batch in probe.get_train_dataloader()]
    assert [tuple(b.shape) for b in seen] == [(2, 64)] * 4 + [(1, 128)] * 4
    assert all(torch.equal(b, train[i]["input_ids"]) for i, b in enumerate(seen))

    teacher = _teacher(trained_setup)
    whole = load_reference(trained_setup["mla"])
    report = run_global_stage(whole, teacher, train, held, GlobalOptions(**opts), tmp_path / "whole")
    assert report.steps == 8 and report.tokens_by_seq_len == {"64": 4 * 128, "128": 4 * 128}
    assert [p["seq_len"] for p in report.phases] == [64, 128]
    stopped = load_reference(trained_setup["mla"])
    run_global_stage(stopped, teacher, train, held, GlobalOptions(**opts, stop_after_steps=5), tmp_path / "split")
    assert latest_complete_checkpoint(tmp_path / "split").name == "checkpoint-5"
    resumed = load_reference(trained_setup["mla"])
    report = run_global_stage(resumed, teacher, train, held, GlobalOptions(**opts), tmp_path / "split", resume=True)
    assert report.steps == 8
    assert not torch.equal(_flat(whole), _flat(load_reference(trained_setup["mla"])))
    torch.testing.assert_close(_flat(resumed), _flat(whole), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_finetune_with_a_schedule_and_long_documents_reports_tokens_per_length(trained_setup, tmp_path):
    dst = tmp_path / "out"
    common = [trained_setup["mla"], dst, "--teacher", trained_setup["src"], "--data", trained_setup["data"],
              "--stage", "global", "--seq-len", 128, "--batch-size", 4, "--finetune-tokens", 4 * 512,
              "--held-out-tokens", 2 * 128]
    assert _run_cli(*common, "--seq-len-schedule", "128:0.5,512:0.5", "--long-docs", 1024,
                    "--seq-len-order", "interleaved") == 0
    report = json.loads((dst / "finetune_report.json").read_text())
    g = report["global"]
    assert g["steps"] == 4 and g["tokens_by_seq_len"] == {"128": 1024, "512": 1024}
    assert g["schedule_order"] == report["seq_len_schedule"]["order"] == "interleaved"
    phases = report["seq_len_schedule"]["phases"]
    assert [(p["seq_len"], p["steps"], p["windows_per_micro_batch"]) for p in phases] == [(128, 2, 4), (512, 2, 1)]
    long_docs = phases[1]["long_documents"]
    assert long_docs["documents"] == 2 and long_docs["length"] == 512 and set(long_docs["queries"]) == {"recall"}
    assert "long_documents" not in phases[0]
    assert _run_cli(*common, "--seq-len-schedule", "128:0.5,2048:0.5", "--overwrite") == 2  # beyond the context


def test_fill_windows_cut_the_filler_never_the_document():
    class Doc:
        ids = list(range(10, 20))

    rows = fill_windows([Doc()], 16, 1, [[5, 6, 7, 8]], seed=0)
    assert rows.shape == (1, 16)
    assert rows[0, :10].tolist() == Doc.ids and rows[0, 10] == 1 and rows[0, 11:15].tolist() == [5, 6, 7, 8]
    assert rows[0, 15] == 1
    assert np.issubdtype(rows.dtype, np.integer)


def test_each_phase_packs_its_own_corpus_block_and_the_synthesis_at_its_length(trained_setup, tmp_path):
    """With --synthesize, every phase reads the teacher text re-packed at its own length at
    --synthetic-share of its windows; the long documents open the longest phase only; the phases'
    corpus blocks are disjoint."""
    from conversion.recovery import finetune as ft

    tok = AutoTokenizer.from_pretrained(str(trained_setup["mla"]))
    texts = [f"user: Question {i}?\nassistant: Answer number {i} is a long answer about things." for i in range(300)]
    synthesis = ft.Synthesis(build_token_windows(tok, texts, 64, tmp_path, name="synthesized", show_progress=False),
                             [], {}, texts)
    opts = ft.FinetuneOptions(teacher=trained_setup["src"], data=[trained_setup["data"]], seq_len=64,
                              seq_len_schedule=[(64, 0.5), (512, 0.5)], long_docs=1024, synthetic_share=0.5,
                              cache_dir=tmp_path, show_progress=False,
                              global_=GlobalOptions(tokens=8 * 8 * 64, batch_size=8))
    batches, record = ft._scheduled_data(opts, tok, 1, synthesis, lambda *_: None)
    short, long_ = record["phases"]
    assert (short["steps"], short["windows_per_micro_batch"], long_["steps"], long_["windows_per_micro_batch"]) == \
        (4, 8, 4, 1)
    assert short["mix"]["synthesized_share"] >= 0.5 and long_["mix"]["synthesized_share"] >= 0.5
    assert "long_documents" in long_ and long_["long_documents"]["documents"] == 2 and "long_documents" not in short
    assert len(batches) == 8 and batches.tokens_per_micro_batch == 512
    synthesized_at = {n: build_token_windows(tok, texts, n, tmp_path, name="synthesized", show_progress=False)
                      for n in (64, 512)}
    for n in (64, 512):
        rows = {tuple(synthesized_at[n][i]["input_ids"].tolist()) for i in range(len(synthesized_at[n]))}
        seen = {tuple(row.tolist()) for i in range(len(batches)) for row in batches[i]["input_ids"]
                if row.numel() == n}
        assert seen & rows  # the teacher text, packed at this phase's length
    docs = ft._corpus_documents(opts)
    assert short["corpus_documents"] + long_["corpus_documents"] <= len(docs)

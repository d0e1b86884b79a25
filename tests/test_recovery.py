"""Recovery (`mha2mla finetune`) on tiny real checkpoints: the local and global stages, resume,
the written checkpoint in vLLM, and bad input."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from conversion import ConvertOptions, convert, load_reference
from conversion.cli import main as cli_main
from conversion.mla_format.layout import plan_native_layout
from conversion.recovery.finetune import FinetuneOptions, finetune, held_out_perplexity
from conversion.recovery.global_stage import GlobalOptions, latest_complete_checkpoint, run_global_stage
from conversion.recovery.local import LocalOptions, TeacherStream, run_local_stage
from conversion.recovery.losses import distillation_loss, next_token_loss
from conversion.recovery.structure import StructureGuard, kv_b_free_mask
from conversion.text_data import shared_text_path, split_text
from tests.helpers import TinySpec

SPEC = TinySpec(num_heads=4, num_kv_heads=2, head_dim=64, hidden_size=256, num_layers=2)
SEQ = 64


@pytest.fixture(scope="module")
def setup(tiny_model_factory, tmp_path_factory):
    """A tiny GQA model, its 576-value native conversion (rope keys overflow into the latent,
    so kv_b_proj has identity rows) and training text."""
    src = tiny_model_factory(SPEC)
    root = tmp_path_factory.mktemp("recovery")
    mla = root / "mla"
    convert(src, mla, ConvertOptions(rope_dim=48, d_kv=16, strategy="high", svd="joint", layout="native",
                                     dtype="float32", force=True), show_progress=False)
    calib, _ = split_text(shared_text_path().read_text())
    data = root / "data.txt"
    data.write_text(calib[:120_000])
    return {"src": src, "mla": mla, "root": root, "data": data}


def _windows(setup, n, offset=0):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(setup["src"]))
    ids = tok(setup["data"].read_text()[offset: offset + 400 * n], add_special_tokens=False).input_ids
    return torch.tensor(ids[: n * SEQ]).view(n, SEQ)


def _teacher(setup):
    return AutoModelForCausalLM.from_pretrained(str(setup["src"]), dtype=torch.float32,
                                                attn_implementation="sdpa").eval()


# ----------------------------------------------------------------------------- pure parts

def test_distillation_loss_is_the_kl_divergence_and_chunking_does_not_change_it():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    p_t = t.softmax(-1)
    want = (p_t * (p_t.log() - s.log_softmax(-1))).sum(-1).mean()
    assert distillation_loss(s, t) == pytest.approx(float(want), rel=1e-5)
    assert distillation_loss(s, t, chunk_tokens=3) == pytest.approx(float(want), rel=1e-5)
    assert float(distillation_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        distillation_loss(s, t[:, :4])


def test_fused_losses_equal_the_plain_ones_in_value_and_gradient():
    from conversion.recovery.losses import fused_distillation_loss, fused_next_token_loss

    torch.manual_seed(0)
    h_s, h_t = torch.randn(2, 7, 6, requires_grad=True), torch.randn(2, 7, 6)
    w_s, w_t = torch.randn(13, 6, requires_grad=True), torch.randn(13, 6)
    ids = torch.randint(0, 13, (2, 7))
    for temperature in (1.0, 2.0):
        plain = distillation_loss(h_s @ w_s.T, h_t @ w_t.T, temperature) + next_token_loss(h_s @ w_s.T, ids)
        want = torch.autograd.grad(plain, (h_s, w_s))
        fused = fused_distillation_loss(h_s, w_s, h_t, w_t, temperature, chunk_tokens=5) + \
            fused_next_token_loss(h_s, w_s, ids, chunk_tokens=4)
        got = torch.autograd.grad(fused, (h_s, w_s))
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_losses_under_bf16_autocast_match_the_plain_ones_and_leave_a_frozen_projection_alone():
    """The training step runs under bf16 autocast with a frozen output embedding (attention-only
    training): the fused gradients take the projection's precision and skip the frozen weight."""
    from conversion.recovery.losses import fused_distillation_loss, fused_next_token_loss

    torch.manual_seed(1)
    h_s, h_t = torch.randn(3, 9, 16, requires_grad=True), torch.randn(3, 9, 16)
    w_s, w_t = torch.randn(40, 16) / 4, torch.randn(40, 16) / 4
    ids = torch.randint(0, 40, (3, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = distillation_loss(h_s @ w_s.T, h_t @ w_t.T) + next_token_loss(h_s @ w_s.T, ids)
        fused = fused_distillation_loss(h_s, w_s, h_t, w_t, chunk_tokens=7) + fused_next_token_loss(h_s, w_s, ids, 5)
    (want,) = torch.autograd.grad(plain, (h_s,))
    (got,) = torch.autograd.grad(fused, (h_s,))
    torch.testing.assert_close(fused, plain, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)  # bf16 projections on both sides
    assert got.dtype == h_s.dtype and not w_s.requires_grad


@pytest.mark.slow
def test_compiled_fused_losses_equal_the_eager_ones():
    """``--compile`` also compiles the per-chunk softmax passes of the fused losses."""
    from conversion.recovery.losses import fused_distillation_loss, fused_next_token_loss

    torch.manual_seed(2)
    h_s, h_t = torch.randn(2, 10, 8, requires_grad=True), torch.randn(2, 10, 8)
    w_s, w_t = torch.randn(30, 8, requires_grad=True), torch.randn(30, 8)
    ids = torch.randint(0, 30, (2, 10))
    values, grads = [], []
    for compiled in (False, True):
        loss = fused_distillation_loss(h_s, w_s, h_t, w_t, 2.0, chunk_tokens=8, compiled=compiled) + \
            fused_next_token_loss(h_s, w_s, ids, chunk_tokens=8, compiled=compiled)
        values.append(loss)
        grads.append(torch.autograd.grad(loss, (h_s, w_s)))
    torch.testing.assert_close(values[1], values[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_next_token_loss_shifts_by_one():
    logits = torch.full((1, 3, 4), -1e4)
    ids = torch.tensor([[0, 2, 3]])
    logits[0, 0, 2] = logits[0, 1, 3] = 0.0  # perfect predictions of tokens 1 and 2
    assert float(next_token_loss(logits, ids)) == pytest.approx(0.0, abs=1e-4)


def test_structure_mask_marks_exactly_the_up_projection_blocks():
    lay = plan_native_layout(4, 2, 64, 48, 16, 576)  # 96 rope dims: 32 ride in the latent
    free = kv_b_free_mask(lay)
    nd, d, c = 64 - 48, 64, 32  # nope dims, head dim, latent (2 kv-heads × d_kv 16)
    assert int(free.sum()) == 4 * (nd + d) * c  # every head: its W_up_k and W_up_v rows, latent columns
    assert not free[:, c:].any()  # identity/padding columns never train


@pytest.mark.slow
def test_structure_guard_keeps_identity_rows_through_training(setup):
    model = load_reference(setup["mla"])
    attn = model.model.layers[0].self_attn
    before = attn.kv_b_proj.weight.detach().clone()
    assert float((before[:, 32:] == 1).sum()) > 0  # identity entries exist in this layout
    guard = StructureGuard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss = model(input_ids=_windows(setup, 2)).logits.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        guard.restore()
    after = attn.kv_b_proj.weight.detach()
    free = kv_b_free_mask(attn.layout)
    assert guard.max_violation() == 0.0
    assert torch.equal(after[~free], before[~free])
    assert not torch.equal(after[free], before[free])  # the free blocks did train


# ----------------------------------------------------------------------------- local stage

@pytest.mark.slow
def test_teacher_stream_reproduces_the_model_forward(setup):
    teacher = _teacher(setup)
    ids = _windows(setup, 3)
    stream = TeacherStream(teacher, ids, chunk=2)
    for i in range(len(teacher.model.layers)):
        _, y = stream.attention_io(i)
        stream.advance(i, y)
    with torch.no_grad():
        want = teacher.model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        got = teacher.model.norm(stream.hidden)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_local_stage_lowers_every_layers_held_out_error_below_the_svd_start(setup):
    student, teacher = load_reference(setup["mla"]), _teacher(setup)
    train, held = _windows(setup, 48), _windows(setup, 4, offset=60_000)
    report = run_local_stage(student, teacher, train, held, LocalOptions(steps_per_layer=120, lr=1e-3),
                             show_progress=False).to_dict()
    assert len(report["layers"]) == SPEC.num_layers
    for layer in report["layers"]:
        assert layer["held_out_error_after"] < 0.95 * layer["held_out_error_before"], layer
    assert all(p.requires_grad for p in student.parameters())  # trainability restored


# ----------------------------------------------------------------------------- global stage

def _user_data(setup, tmp_path):
    from transformers import AutoTokenizer

    from conversion.recovery.data import user_training_data

    tok = AutoTokenizer.from_pretrained(str(setup["mla"]))
    return user_training_data(tok, [setup["data"]], SEQ, cache_dir=tmp_path / "cache", held_out_tokens=8 * SEQ,
                              show_progress=False)


@pytest.mark.slow
def test_global_steps_lower_the_held_out_loss(setup, tmp_path):
    train, held = _user_data(setup, tmp_path)
    student, teacher = load_reference(setup["mla"]), _teacher(setup)
    before = held_out_perplexity(student, held)
    opts = GlobalOptions(tokens=12 * 4 * SEQ, batch_size=4, lr=2e-3, loss="kd+lm", train="all")
    report = run_global_stage(student, teacher, train, held, opts, tmp_path / "work")
    after = held_out_perplexity(student, held)
    assert report.steps == 12 and report.tokens_seen == 12 * 4 * SEQ
    assert after < 0.98 * before
    assert report.eval_curve and report.loss_curve and report.tokens_per_s > 0


@pytest.mark.fast
def test_the_schedule_matches_transformers_and_decays_by_the_clock():
    """``wsd_factor`` is Hugging Face's warmup-stable-decay (1-sqrt) per step; the time-or-steps
    schedule reaches the decay by the clock when the clock runs out first, by steps otherwise."""
    from transformers import get_wsd_schedule

    from conversion.recovery.global_stage import time_or_steps_schedule, wsd_factor

    steps, warmup, decay = 100, 10, 20
    hf = get_wsd_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), warmup, decay,
                          num_training_steps=steps, decay_type="1-sqrt").lr_lambdas[0]
    for step in (0, 5, 10, 50, 79, 80, 85, 90, 99, 100):
        assert wsd_factor(step / steps, warmup / steps, decay / steps) == pytest.approx(hf(step), abs=1e-9), step
    now = [0.0]
    schedule = time_or_steps_schedule(1000, 60.0, 0.05, 0.2, clock=lambda: now[0])
    assert schedule(0) == 0.0
    now[0] = 30.0  # half the time, 1% of the steps: stable
    assert schedule(10) == 1.0
    now[0] = 54.0  # 90% of the time: halfway through the decay
    assert schedule(11) == pytest.approx(1 - 0.5 ** 0.5)
    now[0] = 60.0
    assert schedule(12) == pytest.approx(0.0, abs=1e-9)
    fast = time_or_steps_schedule(100, 1e9, 0.05, 0.2, clock=lambda: 0.0)  # steps run out first
    assert fast(90) == pytest.approx(1 - 0.5 ** 0.5) and fast(50) == 1.0


@pytest.mark.slow
def test_a_time_budget_ends_the_run_at_the_end_of_its_decay(setup, tmp_path):
    """A run whose token count is far beyond its time budget stops on time with its learning rate
    decayed (the last logged rate well below the peak), not cut at the peak."""
    train, held = _user_data(setup, tmp_path)
    student, teacher = load_reference(setup["mla"]), _teacher(setup)
    opts = GlobalOptions(tokens=10_000 * 2 * SEQ, batch_size=2, lr=1e-3, loss="kd", time_budget_s=6.0,
                         warmup_ratio=0.1, decay_ratio=0.5, logging_steps=1, eval_every=100_000, save_every=100_000)
    report = run_global_stage(student, teacher, train, held, opts, tmp_path / "work")
    assert 2 < report.steps < 10_000
    rates = [point["lr"] for point in report.loss_curve]
    assert max(rates) == pytest.approx(1e-3, rel=0.05)
    assert rates[-1] < 0.8e-3, rates  # in the decay (a step takes ~1 s here: the last 3 s decay)


def _flat_params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.slow
def test_a_run_stopped_after_step_k_and_resumed_equals_an_uninterrupted_run(setup, tmp_path):
    train, held = _user_data(setup, tmp_path)
    teacher = _teacher(setup)
    opts = dict(tokens=8 * 2 * SEQ, batch_size=2, lr=1e-3, loss="kd", save_every=3, seed=3)
    whole = load_reference(setup["mla"])
    run_global_stage(whole, teacher, train, held, GlobalOptions(**opts), tmp_path / "whole")
    stopped = load_reference(setup["mla"])
    run_global_stage(stopped, teacher, train, held, GlobalOptions(**opts, stop_after_steps=5), tmp_path / "split")
    assert latest_complete_checkpoint(tmp_path / "split").name == "checkpoint-5"
    resumed = load_reference(setup["mla"])  # a fresh process would start from the converted weights too
    report = run_global_stage(resumed, teacher, train, held, GlobalOptions(**opts), tmp_path / "split", resume=True)
    assert report.steps == 8
    assert not torch.equal(_flat_params(whole), _flat_params(load_reference(setup["mla"])))
    torch.testing.assert_close(_flat_params(resumed), _flat_params(whole), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- end to end

def _finetune_opts(setup, **kw):
    base = dict(teacher=setup["src"], data=[setup["data"]], seq_len=SEQ, held_out_tokens=8 * SEQ, local_tokens=8 * SEQ,
                local_seq_len=SEQ, local=LocalOptions(steps_per_layer=10), show_progress=False,
                global_=GlobalOptions(tokens=4 * 4 * SEQ, batch_size=4, lr=1e-3))
    base.update(kw)
    return FinetuneOptions(**base)


@pytest.fixture(scope="module")
def finetuned(setup, tmp_path_factory):
    dst = tmp_path_factory.mktemp("ft") / "recovered"
    report = finetune(setup["mla"], dst, _finetune_opts(setup, cache_dir=dst.parent / "cache"), log=lambda *_: None)
    return dst, report


@pytest.mark.slow
def test_finetune_writes_a_checkpoint_in_the_converted_format(setup, finetuned):
    dst, report = finetuned
    assert report["stage"] == "both"
    ppl = report["perplexity"]
    assert ppl["student_after_global"] < ppl["student_before"]
    assert {p.name for p in dst.iterdir()} >= {"config.json", "model.safetensors", "finetune_report.json", "loss.png",
                                               "tokenizer.json", "mha2mla_report.json"}
    config = json.loads((dst / "config.json").read_text())
    original = json.loads((setup["mla"] / "config.json").read_text())
    assert config["mha2mla"]["recovery"]["stage"] == "both"
    config["mha2mla"].pop("recovery")
    assert config == original
    saved = load_reference(dst)
    assert not torch.equal(_flat_params(saved), _flat_params(load_reference(setup["mla"])))
    assert StructureGuard(load_reference(setup["mla"])).num_guarded == SPEC.num_layers
    for a, b in zip(saved.model.layers, load_reference(setup["mla"]).model.layers):
        free = kv_b_free_mask(a.self_attn.layout)
        assert torch.equal(a.self_attn.kv_b_proj.weight[~free], b.self_attn.kv_b_proj.weight[~free])
    assert not any(p.name.startswith(".") for p in dst.parent.iterdir() if p.name != "cache")  # no work dir left


@pytest.mark.vllm
def test_finetuned_checkpoint_greedy_tokens_in_vllm_equal_the_reference(finetuned, setup):
    from vllm_mha2mla.tools.runner import EngineRequest, run_engine_in_subprocess

    dst, _ = finetuned
    prompts = [row[: 5 + 3 * i].tolist() for i, row in enumerate(_windows(setup, 6, offset=90_000))]
    # eager: the checkpoint's format is the subject; this native shape compiled is test_vllm_plugin's greedy test
    result = run_engine_in_subprocess(EngineRequest(model=str(dst), prompt_token_ids=prompts, max_tokens=24,
                                                    dtype="float32", kv_cache_memory_bytes=32 << 20,
                                                    enforce_eager=True))
    ref = load_reference(dst)
    eos = json.loads((dst / "config.json").read_text())["eos_token_id"]
    for prompt, out in zip(prompts, result["outputs"]):
        got, want = out["token_ids"], ref.greedy_generate(torch.tensor([prompt]), 24)[0].tolist()
        assert got == want[: len(got)] and (len(got) == 24 or got[-1] == eos)  # vLLM stops at EOS
    assert sum(len(out["token_ids"]) for out in result["outputs"]) > 24  # not all cut at once


# ----------------------------------------------------------------------------- bad input

def _run_cli(*args):
    return cli_main(["finetune", *map(str, args)])


@pytest.mark.slow
def test_bad_inputs_exit_with_a_clear_message_and_write_nothing(setup, tmp_path, capsys, tiny_model_factory):
    dst = tmp_path / "out"
    other = tiny_model_factory(TinySpec(vocab_size=600))
    common = ["--data", setup["data"], "--seq-len", SEQ]
    cases = [
        ([setup["mla"], dst, "--teacher", other, *common], "vocab_size is 600 in the teacher"),
        ([setup["src"], dst, *common], "not an MHA2MLA checkpoint"),
        ([setup["mla"], dst, "--teacher", setup["src"], "--data", setup["data"], "--seq-len", 4096], "beyond the model"),
        ([setup["mla"], dst, "--teacher", setup["src"], "--data", tmp_path / "missing.txt"], "missing.txt"),
        ([setup["mla"], dst, "--stage", "local", "--teacher", setup["src"], *common, "--resume"], "nothing to resume"),
    ]
    for args, needle in cases:
        assert _run_cli(*args) == 2, needle
        assert needle in capsys.readouterr().err
        assert not dst.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run_cli(setup["mla"], dst, "--teacher", setup["src"], "--data", empty) == 2
    assert "no text" in capsys.readouterr().err
    dst.mkdir()
    assert _run_cli(setup["mla"], dst, "--teacher", setup["src"], *common) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_disk_full_while_saving_leaves_no_destination(setup, tmp_path, monkeypatch, capsys):
    import conversion.checkpoint as checkpoint

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    dst = tmp_path / "out"
    code = _run_cli(setup["mla"], dst, "--teacher", setup["src"], "--data", setup["data"], "--seq-len", SEQ,
                    "--stage", "local", "--local-steps", 1, "--local-tokens", SEQ, "--local-seq-len", SEQ, "--held-out-tokens", 2 * SEQ)
    assert code == 1
    assert "No space left on device" in capsys.readouterr().err
    assert not dst.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.slow
def test_ctrl_c_keeps_the_latest_checkpoint_and_resume_finishes(setup, tmp_path, monkeypatch, capsys):
    import conversion.recovery.global_stage as gs

    class Interrupt(gs.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    real_init = gs.DistillationTrainer.__init__

    def init_with_interrupt(self, *args, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), Interrupt()]
        real_init(self, *args, **kwargs)

    dst = tmp_path / "out"
    args = [setup["mla"], dst, "--teacher", setup["src"], "--data", setup["data"], "--seq-len", SEQ, "--stage",
            "global", "--finetune-tokens", 6 * 2 * SEQ, "--batch-size", 2, "--save-every", 2, "--held-out-tokens",
            2 * SEQ]
    monkeypatch.setattr(gs.DistillationTrainer, "__init__", init_with_interrupt)
    assert _run_cli(*args) == 130
    err = capsys.readouterr().err
    assert "checkpoint-2" in err and "--resume" in err and not dst.exists()
    monkeypatch.setattr(gs.DistillationTrainer, "__init__", real_init)
    assert _run_cli(*args) == 2  # a fresh start would silently discard the checkpoint
    assert "--resume" in capsys.readouterr().err
    assert _run_cli(*args, "--resume") == 0
    report = json.loads((dst / "finetune_report.json").read_text())
    assert report["global"]["steps"] == 6
    assert not os.path.exists(tmp_path / ".out.train")


@pytest.mark.slow
def test_a_diverged_loss_stops_training_with_a_clear_error(setup, tmp_path, monkeypatch, capsys):
    import conversion.recovery.global_stage as gs

    monkeypatch.setattr(gs, "next_token_loss", lambda logits, ids: logits.sum() * float("nan"))
    dst = tmp_path / "out"
    code = _run_cli(setup["mla"], dst, "--stage", "global", "--loss", "lm", "--data", setup["data"], "--seq-len", SEQ,
                    "--finetune-tokens", 4 * SEQ, "--batch-size", 2, "--held-out-tokens", 2 * SEQ)
    assert code == 2 and "diverged" in capsys.readouterr().err and not dst.exists()


@pytest.mark.vllm
def test_synthesis_and_onpolicy_sample_in_vllm_teacher_and_plugin_served_student(setup, tmp_path):
    """--synthesize: the teacher answers chat prompts in vLLM (two turns for follow-ups), in its own chat
    template, and writes free text from its BOS alone (--free-text-share); --stage all then samples the student
    through this project's plugin for the on-policy round."""
    from conversion.recovery.onpolicy import OnPolicyOptions
    from vllm_mha2mla.tools.synthesize import vllm_engine_hooks

    dst = tmp_path / "out"
    opts = _finetune_opts(setup, stage="all", synthesize=5200, free_text_share=0.2, cache_dir=tmp_path / "cache",
                          evaluate=False, synthesis_max_tokens=24, local=LocalOptions(steps_per_layer=2),
                          global_=GlobalOptions(tokens=2 * 4 * SEQ, batch_size=4, lr=1e-3, loss="kd"),
                          onpolicy=OnPolicyOptions(rounds=1, prompts_per_round=6, max_new_tokens=16, batch_size=4))
    report = finetune(setup["mla"], dst, opts, log=lambda *_: None, hooks=vllm_engine_hooks())
    synthesis = report["synthesis"]
    assert synthesis["kind"] == "chat" and synthesis["conversations"] == 12 and report["synthesized_tokens"] >= SEQ
    assert set(synthesis["kinds"]) == {"instruction", "open", "multi_turn"}  # --data: no corpus questions
    assert sum(synthesis["kinds"].values()) == 12
    assert 0 < synthesis["mix"]["synthesized_share"] <= 1
    assert synthesis["free_text"]["samples"] >= 1 and synthesis["free_text"]["tokens"] > 0
    cached = list((tmp_path / "cache" / "tokens").glob("synthesized-*.npy"))
    assert len(cached) == 1 and (dst / "model.safetensors").is_file()
    (row,) = report["onpolicy"]["rounds"]
    assert row["prompts"] == 6 and row["onpolicy_sequences"] + row["teacher_sequences"] > 0
    assert 0 < row["mean_completion_tokens"] <= 16

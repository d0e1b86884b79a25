"""Can recovery train at the full context? Peak memory and tokens/s of the global stage per window length
(issue 32), and the attention kernels SDPA offers at 8K for the converted model's shapes.

A model of the default model's shape (random weights: the question is memory and speed, not quality) is
converted at 192 values and trained for a few steps with ``--seq-len-schedule SHORT:0.5,LONG:0.5`` at equal
tokens per micro-batch (16 × 2048 = 4 × 8192), with SDPA's math backend forbidden on a GPU: a step that would
need the ``[L, L]`` score matrix fails instead of silently using it. The converted model's value width differs
from its key width (128 vs 64 at 192 values), which PyTorch's flash kernel refuses; the kernel table says what
runs and at what cost, and whether padding the values to the key width would pay.

    python -m benchmarks.studies.long_window_memory [--small] [--output DIR]

``--small`` (2 layers, 64/256-token windows) is the CPU smoke run. Writes ``long_window_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForCausalLM, TrainerCallback

import conversion.recovery.global_stage as gs
from benchmarks.common import save_random_llama
from conversion import ConvertOptions, convert, load_reference
from conversion.default_model import ensure_default_model
from conversion.recovery.data import ScheduledBatches

SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "bos_token_id", "eos_token_id",
              "pad_token_id", "tie_word_embeddings", "head_dim", "rope_theta", "rope_parameters")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


class RandomWindows(torch.utils.data.Dataset):
    """``n`` windows of random token ids: the stage's shapes without the corpus."""

    def __init__(self, n: int, length: int, vocab: int, seed: int):
        self.ids = torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(seed))
        self.seq_len = length

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class PeakPerLength(TrainerCallback):
    """Peak GPU memory per window length, reset where the length changes."""

    def __init__(self, length_at_step):
        self.length_at_step, self.peaks, self.current = length_at_step, {}, None

    def on_step_begin(self, args, state, control, **kwargs):
        length = self.length_at_step(state.global_step)
        if torch.cuda.is_available() and length != self.current:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.current = length

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            self.peaks[self.current] = round(torch.cuda.max_memory_allocated() / 2**30, 2)


def sdpa_kernel_table(heads: int, length: int, qk: int, v: int, batch: int) -> dict:
    """Forward + backward milliseconds of each SDPA kernel at the converted shapes (values as they are,
    and padded to the key width), bf16, causal; the error where a kernel refuses the shapes."""
    table = {}
    cases = [("efficient", SDPBackend.EFFICIENT_ATTENTION, v), ("cudnn", SDPBackend.CUDNN_ATTENTION, v),
             ("flash", SDPBackend.FLASH_ATTENTION, v), ("flash_values_padded", SDPBackend.FLASH_ATTENTION, qk),
             ("efficient_values_padded", SDPBackend.EFFICIENT_ATTENTION, qk)]
    for name, backend, width in cases:
        q, k = (torch.randn(batch, heads, length, qk, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                for _ in range(2))
        values = torch.randn(batch, heads, length, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        try:
            with sdpa_kernel([backend]):
                for i in range(6):
                    if i == 1:
                        torch.cuda.synchronize()
                        start = time.perf_counter()
                    F.scaled_dot_product_attention(q, k, values, is_causal=True).sum().backward()
                torch.cuda.synchronize()
            table[name] = {"ms_fwd_bwd": round((time.perf_counter() - start) / 5 * 1000, 2), "qk": qk, "v": width}
        except RuntimeError as exc:
            table[name] = {"error": str(exc).splitlines()[0][:200]}
    return table


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="2 layers, 64/256-token windows (a CPU smoke run)")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per window length (default 6)")
    ap.add_argument("--output", type=Path, default=Path("long-window-memory"))
    args = ap.parse_args(argv)
    model_dir = ensure_default_model()
    config = json.loads((model_dir / "config.json").read_text())
    shape = {k: config[k] for k in SHAPE_KEYS if k in config}
    short, long_, batch = (64, 256, 4) if args.small else (2048, 8192, 16)
    if args.small:
        shape.update(num_hidden_layers=2)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = save_random_llama(root / "src", shape)
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy(model_dir / name, src / name)
        convert(src, root / "mla", ConvertOptions(rope_dim=32, d_kv=32, svd="joint", calib_tokens=4096,
                                                  dtype="bfloat16"), show_progress=False)
        student = load_reference(root / "mla", dtype=torch.float32).to(dev)
        teacher = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, attn_implementation="sdpa").to(dev)
        layout = student.model.layers[0].self_attn.layout
        qk, v = layout.qk_nope_head_dim + layout.qk_rope_head_dim, layout.v_head_dim
        opts = gs.GlobalOptions(tokens=2 * args.steps * batch * short, batch_size=batch, lr=1e-4, loss="kd",
                                eval_every=10_000, save_every=10_000, logging_steps=1)
        phases = gs.plan_schedule([(short, 0.5), (long_, 0.5)], opts, short, 1)
        vocab = shape["vocab_size"]
        train = ScheduledBatches(phases, [RandomWindows(args.steps * batch, short, vocab, 1),
                                          RandomWindows(max(1, args.steps * batch * short // long_), long_, vocab, 2)])
        peak = PeakPerLength(train.seq_len_at_step)
        kernels = sdpa_kernel_table(layout.num_heads, long_, qk, v, 4) if dev == "cuda" else {}
        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
        if dev != "cuda":
            backends.append(SDPBackend.MATH)  # the CPU has no fused kernel for unequal key/value widths
        with sdpa_kernel(backends):
            report = gs.run_global_stage(student, teacher, train, RandomWindows(2, short, vocab, 3), opts,
                                         root / "work", callbacks=[peak])
    result = {"device": report.device, "dtype": report.dtype, "torch": torch.__version__,
              "shapes": {"qk": qk, "v": v, "heads": layout.num_heads},
              "micro_batches": {str(p.seq_len): [p.batch, p.seq_len] for p in phases},
              "peak_gib_by_seq_len": peak.peaks, "train_tokens_per_s_by_seq_len": report.train_tokens_per_s_by_seq_len,
              "tokens_by_seq_len": report.tokens_by_seq_len, "steps": report.steps, "mfu": report.mfu,
              "sdpa_kernels": kernels}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "long_window_memory.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("device", "shapes", "micro_batches", "peak_gib_by_seq_len",
                                             "train_tokens_per_s_by_seq_len", "sdpa_kernels")}, indent=1))
    return result


if __name__ == "__main__":
    main()

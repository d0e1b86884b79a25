"""The 4-bit latent cache's GPU path (issue 33, vLLM 0.26), checked without a GPU.

- The Triton cache write (``triton_low_bit_write``) in Triton's CPU interpreter: its bytes are
  :func:`~conversion.mla_format.cache_rows.encode_rows`' (the PyTorch write's) for float32 and bfloat16 rows, ties
  rounded half to even, padding slots untouched, no host synchronisation (what a captured CUDA graph needs).
- The page sizing on vLLM 0.26's KV cache spec (``compat.spec_with_row_bytes``), on a stand-in shaped like it.
- vLLM's CUDA context gather routed to the low-bit decode (``patches.extend_cache_gather_to_any_width``) and the
  per-layer view of the context workspace (``metadata.layer_context_width``).

The engine on a GPU is ``benchmarks/end_to_end/gpu_anyshape.py int4``; the interpreter checks indexing, masks and
arithmetic exactly but not the GPU's division and conversion instructions (the kernel asks for the correctly
rounded ones: ``tl.math.div_rn``, bfloat16 rounding in integer arithmetic).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # kernels defined now become interpreted kernels

import dataclasses  # noqa: E402
import enum  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from conversion.mla_format.cache_quant import CacheQuant  # noqa: E402
from conversion.mla_format.cache_rows import RowLayout, encode_rows  # noqa: E402
from vllm_mha2mla.attention import quantized_cache as qc  # noqa: E402
from vllm_mha2mla.attention.triton_low_bit_write import write_low_bit_rows  # noqa: E402

del os.environ["TRITON_INTERPRET"]  # not for the engines other tests start


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    """Triton checks the setting again at launch."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _rows(tokens, width, seed=0, dtype=torch.float32):
    """Rows shaped like an SVD latent (column scales falling), one outlier column."""
    g = torch.Generator().manual_seed(seed)
    row = torch.randn(tokens, width, generator=g) * torch.linspace(2.5, 0.1, width)
    row[:, width // 3] *= 6
    return row.to(dtype)


def _write_and_compare(layout, row, rank, slots, pages=6, page=4, seed=1):
    """Writes ``row`` (vLLM's ``[kv_c (rank) | k_pe]``) with the kernel into a cache of random bytes at ``slots``;
    asserts the written rows are encode_rows' bytes and every other row is as it was."""
    g = torch.Generator().manual_seed(seed)
    cache = torch.randint(0, 256, (pages, page, layout.row_bytes), generator=g, dtype=torch.uint8)
    before = cache.clone()
    kv_c, k_pe = row[:, :rank], row[:, rank:].unsqueeze(1)  # k_pe [T, 1, rope], as vLLM hands it
    write_low_bit_rows(kv_c, k_pe, cache, slots, layout)
    n = slots.numel()
    want = encode_rows(row[:n, :layout.latent], row[:n, layout.latent:], layout)
    flat, old = cache.view(-1, layout.row_bytes), before.view(-1, layout.row_bytes)
    live = slots >= 0
    assert torch.equal(flat[slots[live]], want[live])
    untouched = torch.ones(flat.shape[0], dtype=torch.bool)
    untouched[slots[live]] = False
    assert torch.equal(flat[untouched], old[untouched])


@pytest.mark.parametrize(
    "fmt,latent,rope,rank",
    [
        (CacheQuant(4, 8, 64), 128, 128, 128),  # the engine's format on the tests' checkpoint shape
        (CacheQuant(4, 8, 64), 512, 64, 512),  # DeepSeek's row: 356 bytes
        (CacheQuant(4, None, 32), 96, 24, 96),  # rotary keys kept in bfloat16
        (CacheQuant(8, 4, 16), 7, 3, 7),  # odd widths: short groups, a padded code byte, a zero high nibble
        (CacheQuant(8, 8, 6), 40, 9, 40),  # int8 in groups of an odd size
        (CacheQuant(4, 8, 64), 100, 476, 150),  # a native row: 50 rotary columns ride in kv_c after the latent
        (CacheQuant(4, 4, 64), 33, 0, 33),  # no rotary segment
    ],
)
def test_write_kernel_bytes_equal_the_pytorch_write(fmt, latent, rope, rank):
    """float32 rows: codes, nibbles, float16 scales and minima, raw segments and padding bytes are encode_rows'
    bytes, for any split of vLLM's [kv_c | k_pe] row; padding slots (-1) and unused slots keep their bytes."""
    layout = RowLayout(fmt, latent, rope)
    slots = torch.tensor([3, -1, 0, 23, 7, -1, 9, 2, 12, 17])
    _write_and_compare(layout, _rows(len(slots), latent + rope), rank, slots)


def test_write_kernel_keeps_a_float16_raw_segment():
    layout = RowLayout(CacheQuant(4, None, 64), 64, 20, dtype=torch.float16)
    _write_and_compare(layout, _rows(5, 84, seed=3), 64, torch.tensor([4, 1, -1, 0, 8]))


def test_write_kernel_rounds_ties_half_to_even_and_handles_degenerate_groups():
    """Values exactly halfway between two codes (torch.round: half to even), a constant group (scale 0: codes 0),
    a minimum that float16 rounds above the group's smallest values (negative quotients: code 0), int8 ties too."""
    fmt = CacheQuant(4, 8, 16)
    ties = torch.tensor([0.0, 15.0] + [k + 0.5 for k in range(14)])  # scale 1: k + 0.5 is a tie
    doubled = torch.tensor([0.0, 30.0, 1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0, 17.0, 19.0, 21.0, 23.0, 25.0,
                            27.0])  # scale 2: odd values are ties
    constant = torch.full((16,), 0.3)
    above = torch.tensor([1.0006, 1.0007] + [1.0 + 0.01 * k for k in range(1, 15)])  # float16(1.0006) = 1.00098
    latent = torch.cat([ties, doubled, constant, above])
    rope = torch.cat([torch.tensor([0.0, 255.0]), torch.arange(14) + 0.5])  # int8, scale 1: ties
    row = torch.stack([torch.cat([latent, rope]), torch.cat([-latent, -rope])])
    layout = RowLayout(fmt, 64, 16)
    _write_and_compare(layout, row, 64, torch.tensor([5, 2]))
    codes = encode_rows(row[:1, :64], row[:1, 64:], layout)[0, :8]  # the first group's packed codes
    low, high = (codes & 15).tolist(), (codes >> 4).tolist()
    assert low[1:4] == [0, 2, 4] and high[1:4] == [2, 4, 6]  # 0.5 → 0, 1.5 → 2, 2.5 → 2, 3.5 → 4, 4.5 → 4, ...


def test_write_kernel_takes_the_engines_rows():
    """vLLM's inputs: bfloat16, kv_c a strided view of a wider projection output, k_pe [T, 1, rope], and more
    tokens than slots (a CUDA-graph batch padded past the slot mapping)."""
    layout = RowLayout(CacheQuant(4, 8, 64), 96, 32)
    wide = _rows(9, 200, seed=5, dtype=torch.bfloat16)
    kv_c = wide[:, 10:106]  # stride 200
    k_pe = _rows(9, 32, seed=6, dtype=torch.bfloat16).unsqueeze(1)
    slots = torch.tensor([6, 0, -1, 13, 2, 9])
    cache = torch.zeros(4, 4, layout.row_bytes, dtype=torch.uint8)
    write_low_bit_rows(kv_c, k_pe, cache, slots, layout)
    live = slots >= 0
    want = encode_rows(kv_c[:6][live], k_pe[:6, 0][live], layout)
    assert torch.equal(cache.view(-1, layout.row_bytes)[slots[live]], want)
    # and those bytes decode as the PyTorch write's
    ref = torch.zeros_like(cache)
    qc.write_rows(kv_c[:6], k_pe[:6], ref, slots, layout)
    assert torch.equal(cache, ref)


def test_write_kernel_asks_the_host_nothing(monkeypatch):
    """No value goes back to the host (a CUDA graph cannot capture that): reading a tensor's value raises here."""
    layout = RowLayout(CacheQuant(4, 8, 64), 64, 16)
    row = _rows(4, 80)
    cache = torch.zeros(2, 4, layout.row_bytes, dtype=torch.uint8)
    slots = torch.tensor([1, -1, 6, 3])

    def refuse(*args, **kwargs):
        raise AssertionError("a host synchronisation")

    for name in ("item", "__bool__", "tolist", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    write_low_bit_rows(row[:, :64], row[:, 64:], cache, slots, layout)
    monkeypatch.undo()
    live = slots >= 0
    assert torch.equal(cache.view(-1, layout.row_bytes)[slots[live]], encode_rows(row[live, :64], row[live, 64:],
                                                                                  layout))


def test_write_kernel_refuses_what_it_does_not_write():
    row = _rows(2, 80)
    slots = torch.tensor([0, 1])
    rotated = RowLayout(CacheQuant(4, 8, 64, hadamard=True), 64, 16)
    with pytest.raises(ValueError, match="Hadamard-rotated"):
        write_low_bit_rows(row[:, :64], row[:, 64:], torch.zeros(1, 4, rotated.row_bytes, dtype=torch.uint8),
                           slots, rotated)
    odd = RowLayout(CacheQuant(4, 8, 5), 64, 16)
    with pytest.raises(ValueError, match="groups of 5 columns"):
        write_low_bit_rows(row[:, :64], row[:, 64:], torch.zeros(1, 4, odd.row_bytes, dtype=torch.uint8), slots, odd)
    layout = RowLayout(CacheQuant(4, 8, 64), 64, 16)
    with pytest.raises(ValueError, match=r"uint8 \[pages, page_size, 56\]"):
        write_low_bit_rows(row[:, :64], row[:, 64:], torch.zeros(1, 4, 56), slots, layout)
    with pytest.raises(ValueError, match="do not fit a layout of 64 \\+ 16"):
        write_low_bit_rows(row[:, :64], row[:, 65:], torch.zeros(1, 4, 56, dtype=torch.uint8), slots, layout)


@pytest.mark.slow
@pytest.mark.parametrize("latent,rope,fmt", [(512, 64, "4,8,64"), (2048, 512, "4,0,64")])
def test_write_kernel_compiles_for_an_h100_with_correctly_rounded_arithmetic(latent, rope, fmt):
    """The write compiles for sm_90 (the interpreter accepts code the compiler refuses) without spills, with
    ``div.rn`` divisions only (Triton's ``/`` is ``div.full``, not correctly rounded: the codes and scales would
    differ from torch's in the last bit now and then) and no fused multiply-adds; the interpreter cannot check
    which instructions a GPU runs, this can."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.kernels.compile_sm90", str(latent), str(rope),
                           "--low-bit", fmt, "--write"], capture_output=True, text=True, env=env, cwd=root,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["div_rn_f32"] > 0 and row["div_inexact_f32"] == 0 and row["fma_f32"] == 0, row
    assert row["cvt_rn_f16"] > 0 and row["spill_store_bytes"] in (0, None), row


# -- vLLM 0.26's KV cache spec ----------------------------------------------------------------------------------
class KVQuantMode(enum.IntEnum):
    """vLLM 0.26's ``KVQuantMode`` (vllm/v1/kv_cache_interface.py 33-58), the members the spec reads."""

    NONE = 0
    FP8_PER_TENSOR = 1
    INT4_PER_TOKEN_HEAD = 4

    @property
    def is_per_token_head(self) -> bool:
        return self is KVQuantMode.INT4_PER_TOKEN_HEAD


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLASpec026:
    """A stand-in with vLLM 0.26's ``MLAAttentionSpec`` fields and page arithmetic (kv_cache_interface.py:
    ``AttentionSpec`` 176-217 — ``page_size_bytes`` adds two float32 scales per token and head for a per-token-head
    mode, ``unpadded_page_size_bytes`` 184-194 —, ``FullAttentionSpec.head_size_v`` 237/254-256,
    ``MLAAttentionSpec.real_page_size_bytes`` 397-416 — one head of ``head_size`` values, halved for
    ``int4_per_token_head``); no ``state_content_bytes``. The model runner views a layer's bytes as
    ``get_kv_cache_shape(blocks, block_size, 1, head_size)`` = ``(blocks, block_size, head_size)`` in ``dtype``
    (mla_attention.py 1301-1308, gpu_model_runner.py 7359-7365, attn_utils.py 249-251)."""

    block_size: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype
    kv_quant_mode: KVQuantMode = KVQuantMode.NONE
    page_size_padded: int | None = None
    head_size_v: int | None = None
    cache_dtype_str: str | None = None

    def __post_init__(self):
        if self.head_size_v is None:
            object.__setattr__(self, "head_size_v", self.head_size)

    @property
    def page_size_bytes(self) -> int:
        head = self.head_size // 2 if self.kv_quant_mode == KVQuantMode.INT4_PER_TOKEN_HEAD else self.head_size
        page = self.block_size * self.num_kv_heads * head * torch.empty((), dtype=self.dtype).element_size()
        if self.kv_quant_mode.is_per_token_head:
            page += 2 * self.block_size * self.num_kv_heads * 4
        return page

    def kv_cache_shape(self, blocks: int) -> tuple[int, int, int]:
        return (blocks, self.block_size, self.head_size)


def test_a_vllm_026_spec_is_sized_by_the_rows_bytes():
    """vLLM 0.26's own sizing of ``int4_per_token_head`` for an MLA layer is one int4 row of head_size values plus
    two float32 scales per token (and a (blocks, block_size, head_size) uint8 view that does not fit it); the
    plugin's spec is a row of row_bytes uint8 bytes, no quantisation mode, the view exactly the pages."""
    from vllm_mha2mla.compat import head_size_counts_bytes, spec_with_row_bytes

    layout = RowLayout(CacheQuant(4, 8, 64), 96, 24)  # the exact 120-value row: 84 bytes
    theirs = MLASpec026(block_size=16, num_kv_heads=1, head_size=120, dtype=torch.uint8,
                        kv_quant_mode=KVQuantMode.INT4_PER_TOKEN_HEAD, cache_dtype_str="int4_per_token_head")
    assert theirs.page_size_bytes == 16 * 60 + 16 * 8
    ours = spec_with_row_bytes(theirs, layout.row_bytes)
    assert (ours.head_size, ours.head_size_v, ours.dtype, ours.kv_quant_mode) == (84, 84, torch.uint8,
                                                                                  KVQuantMode.NONE)
    assert ours.cache_dtype_str == "int4_per_token_head" and ours.block_size == 16
    assert ours.page_size_bytes == 16 * layout.row_bytes
    assert torch.empty(ours.kv_cache_shape(10), dtype=ours.dtype).nbytes == 10 * ours.page_size_bytes
    assert head_size_counts_bytes(ours) and not head_size_counts_bytes(theirs)
    assert not head_size_counts_bytes(MLASpec026(block_size=16, num_kv_heads=1, head_size=120, dtype=torch.bfloat16))
    # layers whose rows have the same bytes get equal specs (they may share a KV cache group), others do not
    assert spec_with_row_bytes(theirs, 84) == spec_with_row_bytes(dataclasses.replace(theirs, head_size=121), 84)
    assert spec_with_row_bytes(theirs, 84) != spec_with_row_bytes(theirs, 86)


def test_the_installed_vllms_spec_keeps_counting_values():
    """vLLM 0.32 (this machine) has ``state_content_bytes``: head_size stays the row's values."""
    from vllm.v1.kv_cache_interface import MLAAttentionSpec

    from vllm_mha2mla.compat import head_size_counts_bytes, spec_with_row_bytes

    spec = spec_with_row_bytes(MLAAttentionSpec(block_size=16, num_kv_heads=1, head_size=120, dtype=torch.float32),
                               84)
    assert (spec.head_size, spec.state_content_bytes, spec.dtype) == (120, 84, torch.uint8)
    assert spec.page_size_bytes == 16 * 84 and not head_size_counts_bytes(spec)


# -- the prefill's context on a GPU -----------------------------------------------------------------------------
def _paged(layout, lens, block=4, seed=0):
    """Rows written through the PyTorch write into a paged cache, each request its own shuffled blocks."""
    g = torch.Generator().manual_seed(seed)
    per_req = [(n + block - 1) // block for n in lens]
    cache = torch.zeros(sum(per_req) + 2, block, layout.row_bytes, dtype=torch.uint8)
    order = torch.randperm(cache.shape[0], generator=g)
    table = torch.full((len(lens), max(per_req)), 10**6, dtype=torch.int32)
    used = 0
    for b, (n, blocks) in enumerate(zip(lens, per_req)):
        table[b, :blocks] = order[used:used + blocks].to(torch.int32)
        used += blocks
        row = _rows(n, layout.latent + layout.rope, seed=10 + b)
        pos = torch.arange(n)
        slots = table[b, pos // block].long() * block + pos % block
        qc.write_rows(row[:, :layout.latent], row[:, layout.latent:], cache, slots, layout)
    return cache, table


def test_vllms_cuda_context_gather_decodes_a_low_bit_cache(monkeypatch):
    """The GPU backend hands vLLM's context path a LowBitCache; ``gather_and_maybe_dequant_cache`` (patched, the
    keyword call of vLLM 0.26's ``_compute_prefill_context``) fills the workspace with the decoded rows in its
    dtype, with no host sync; a plain cache of a non-native width takes the PyTorch copy, a native one vLLM's op."""
    from vllm import _custom_ops as ops

    from vllm_mha2mla.patches import extend_cache_gather_to_any_width

    calls = []
    monkeypatch.setattr(ops, "gather_and_maybe_dequant_cache", lambda *args: calls.append(args))  # vLLM's kernel
    extend_cache_gather_to_any_width()
    extend_cache_gather_to_any_width()  # idempotent
    layout = RowLayout(CacheQuant(4, 8, 64), 96, 32)
    cache, table = _paged(layout, [20, 9])
    starts, counts = torch.tensor([4, 0]), [16, 9]
    cu = torch.tensor([0, 16, 25])
    token_to_seq = torch.cat([torch.full((n,), b) for b, n in enumerate(counts)])
    workspace = torch.zeros(32, 128, dtype=torch.bfloat16)
    ops.gather_and_maybe_dequant_cache(src_cache=qc.LowBitCache(cache, layout), dst=workspace, block_table=table,
                                       cu_seq_lens=cu, token_to_seq=token_to_seq, num_tokens=25,
                                       kv_cache_dtype="int4_per_token_head", scale=torch.ones(()), seq_starts=starts)
    want = qc.gather_context(cache, table, cu, token_to_seq, 25, layout, torch.bfloat16, starts)
    assert torch.equal(workspace[:25], want) and bool((workspace[25:] == 0).all())
    plain = torch.zeros(25, layout.row_bytes, dtype=torch.uint8)
    ops.gather_and_maybe_dequant_cache(cache, plain, table, cu, token_to_seq, 25, "auto", torch.ones(()), starts)
    torch.testing.assert_close(qc.row_reader(layout)(plain).to(torch.bfloat16), want, rtol=0, atol=0)
    native = torch.zeros(25, 576)
    ops.gather_and_maybe_dequant_cache(cache, native, table, cu, token_to_seq, 25, "auto", torch.ones(()), starts)
    assert len(calls) == 1 and calls[0][1] is native


def test_a_layer_reads_its_context_at_its_own_width():
    """Per-layer widths on vLLM 0.26 with a low-bit cache: a builder may serve layers of several widths (their
    specs count bytes), so each layer views the shared workspace at its width while its prefill runs."""
    from vllm_mha2mla.attention.metadata import layer_context_width

    workspace = torch.arange(8 * 12, dtype=torch.float32).view(8, 12)
    context = SimpleNamespace(workspace=workspace)
    metadata = SimpleNamespace(prefill=SimpleNamespace(chunked_context=context))
    with layer_context_width(metadata, 9):
        assert context.workspace.shape == (8, 9) and context.workspace.data_ptr() == workspace.data_ptr()
        assert torch.equal(context.workspace.reshape(-1), workspace.reshape(-1)[:72])
    assert context.workspace is workspace
    with pytest.raises(RuntimeError), layer_context_width(metadata, 6):
        raise RuntimeError("a failing prefill")
    assert context.workspace is workspace
    with layer_context_width(metadata, 12):
        assert context.workspace is workspace
    for no_context in (SimpleNamespace(prefill=None), SimpleNamespace(prefill=SimpleNamespace(chunked_context=None))):
        with layer_context_width(no_context, 9):
            pass
    with pytest.raises(ValueError, match="cannot hold rows of 13 values"), layer_context_width(metadata, 13):
        pass


# -- the GPU backend's impl, its low-bit methods on CPU tensors -------------------------------------------------
def _impl(layout, rank, rope, **more):
    """An ``MHA2MLATritonImpl`` without its ``__init__`` (which asks CUDA for the device): the attributes the low-bit
    methods read."""
    from vllm_mha2mla.attention.gpu_backend import MHA2MLATritonImpl

    impl = object.__new__(MHA2MLATritonImpl)
    impl.__dict__.update({"row_layout": layout, "kv_lora_rank": rank, "qk_rope_head_dim": rope, "scale": 0.3,
                          "_max_model_len": 64, "_num_sms": 8, "_shared_memory": None, "_two_pass": False, **more})
    return impl


def test_the_gpu_impl_writes_and_decodes_low_bit_rows(monkeypatch):
    """do_kv_cache_update: the Triton write at the slot mapping (padding skipped), whatever dtype name vLLM passes;
    forward_mqa: the low-bit Triton decode of the cache vLLM hands over viewed as fp8, equal to the PyTorch decode
    of the same bytes, with its log-sum-exp."""
    layout = RowLayout(CacheQuant(4, 8, 64), 96, 32)
    impl = _impl(layout, 96, 32)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    row = _rows(12, 128, dtype=torch.bfloat16)
    cache = torch.zeros(4, 4, layout.row_bytes, dtype=torch.uint8)
    slots = torch.tensor([5, 0, 1, 2, 3, 4, 13, 14, -1, 6, 7, 12])
    impl.do_kv_cache_update(row[:, :96], row[:, 96:].unsqueeze(1), cache, slots, "int4_per_token_head", None)
    live = slots >= 0
    assert torch.equal(cache.view(-1, layout.row_bytes)[slots[live]], encode_rows(row[live, :96], row[live, 96:], layout))
    table = torch.tensor([[1, 0], [3, 2]], dtype=torch.int32)
    lens = torch.tensor([7, 3], dtype=torch.int32)
    metadata = SimpleNamespace(max_seq_len=7, decode=SimpleNamespace(block_table=table, seq_lens=lens))
    q = _rows(2 * 3, 128, seed=4).view(2, 3, 128)
    out, lse = impl.forward_mqa((q[..., :96], q[..., 96:]), cache.view(torch.float8_e4m3fn), metadata, None)
    want = qc.paged_decode(q.double(), cache, table, lens, 0.3, layout)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
    assert lse.shape == (2, 3)


def test_the_gpu_impl_decodes_in_two_passes_where_asked(monkeypatch):
    """MHA2MLA_GPU_DECODE=two-pass: forward_mqa decodes a bf16/fp8 cache with the two-pass kernels, equal to the
    paged reference, with its log-sum-exp; the default is the one-pass kernel; other values are refused by name."""
    from vllm_mha2mla.attention.paged_attention import paged_latent_decode
    from vllm_mha2mla.attention.triton_two_pass_decode import gpu_decode_kernel

    assert gpu_decode_kernel({}) == "one-pass" and gpu_decode_kernel({"MHA2MLA_GPU_DECODE": "two-pass"}) == "two-pass"
    with pytest.raises(ValueError, match="MHA2MLA_GPU_DECODE='fast': choose one of one-pass, two-pass"):
        gpu_decode_kernel({"MHA2MLA_GPU_DECODE": "fast"})
    from vllm_mha2mla.attention import gpu_backend

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(gpu_backend, "mla_paged_decode", lambda *a, **k: pytest.fail("the one-pass kernel ran"))
    impl = _impl(None, 96, 32, _two_pass=True, num_heads=3, kv_cache_dtype="auto")
    cache = _rows(4 * 4, 128, seed=2).view(4, 4, 128)
    table = torch.tensor([[1, 0], [3, 2]], dtype=torch.int32)
    lens = torch.tensor([7, 3], dtype=torch.int32)
    metadata = SimpleNamespace(max_seq_len=7, decode=SimpleNamespace(block_table=table, seq_lens=lens))
    q = _rows(2 * 3, 128, seed=4).view(2, 3, 128)
    out, lse = impl.forward_mqa((q[..., :96], q[..., 96:]), cache, metadata, None)
    want = paged_latent_decode(q.double(), cache.double(), table, lens, 0.3, 96)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
    assert lse.shape == (2, 3)


def test_the_gpu_impl_prefills_over_its_tokens_as_cached_and_a_low_bit_context(monkeypatch):
    """forward_mha hands vLLM's prefill its own tokens as the cache returns them, the cache as a LowBitCache (which
    vLLM's gather decodes) and the context workspace at the layer's width; a layer without a low-bit cache keeps
    vLLM's arguments."""
    from vllm.model_executor.layers.attention.mla_attention import MLACommonImpl

    seen = {}

    def forward_mha(self, q, kv_c, k_pe, cache, attn_metadata, k_scale, output, output_scale=None):
        seen.update(kv_c=kv_c, k_pe=k_pe, cache=cache, width=attn_metadata.prefill.chunked_context.workspace.shape)

    monkeypatch.setattr(MLACommonImpl, "forward_mha", forward_mha)
    layout = RowLayout(CacheQuant(4, 8, 64), 96, 32)
    impl = _impl(layout, 96, 32)
    row = _rows(5, 128)
    kv_c, k_pe = row[:, :96], row[:, 96:].unsqueeze(1)
    cache = torch.zeros(2, 4, layout.row_bytes, dtype=torch.uint8)
    workspace = torch.zeros(16, 200)
    metadata = SimpleNamespace(prefill=SimpleNamespace(chunked_context=SimpleNamespace(workspace=workspace)))
    impl.forward_mha(None, kv_c, k_pe, cache.view(torch.float8_e4m3fn), metadata, None, None)
    want_c, want_pe = qc.as_cached(kv_c, k_pe, layout)
    assert torch.equal(seen["kv_c"], want_c) and torch.equal(seen["k_pe"], want_pe)
    assert isinstance(seen["cache"], qc.LowBitCache) and seen["cache"].rows.dtype == torch.uint8
    assert seen["width"] == (16, 128) and metadata.prefill.chunked_context.workspace is workspace
    impl.row_layout = None
    impl.forward_mha(None, kv_c, k_pe, cache, metadata, None, None)
    assert seen["kv_c"] is kv_c and seen["cache"] is cache and seen["width"] == (16, 200)


def test_the_gpu_impl_refuses_rows_it_cannot_read_when_built(monkeypatch):
    """A layer whose values would span the rotary segment, or a format the write kernel refuses, fails at model
    construction; a readable one sizes its pages by the row's bytes."""
    from vllm_mha2mla.attention import gpu_backend

    sized = []
    monkeypatch.setattr(gpu_backend, "size_low_bit_cache_pages", lambda: sized.append(True))
    impl = _impl(RowLayout(CacheQuant(4, 8, 64), 96, 32), 96, 32, kv_cache_dtype="int4_per_token_head")
    impl._init_low_bit()
    assert sized == [True] and impl.decode_kernel_name == "triton_low_bit(int4_per_token_head, 92 B/row)"
    with pytest.raises(ValueError, match="96 latent \\+ 32 rotary columns: the GPU kernels read the values "
                                         "\\(kv_lora_rank 112\\)"):
        _impl(RowLayout(CacheQuant(4, 8, 64), 96, 32), 112, 16)._init_low_bit()
    with pytest.raises(ValueError, match="Hadamard-rotated"):
        _impl(RowLayout(CacheQuant(4, 8, 64, hadamard=True), 96, 32), 96, 32)._init_low_bit()

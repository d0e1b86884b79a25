"""``mha2mla bench``: the shapes and conversions it names, the folders it writes, what it reads
back from vLLM's tools, the summary it keeps — and one real run of ``vllm bench throughput`` and
``vllm serve`` + ``vllm bench serve`` on the CPU with the real SmolLM2 and a conversion of it."""

import json
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vllm_mha2mla.tools.bench.folders import mla_config_for, prepare_original, prepare_variant, token_word
from vllm_mha2mla.tools.bench.shapes import (
    MIN_SERVE_PROMPTS,
    SERVE_PROMPTS,
    SHAPES,
    BenchError,
    auto_num_prompts,
    mha_cache_values,
    parse_variant,
    parse_workload,
    serve_num_prompts,
    shape_config,
    weight_bytes,
)
from vllm_mha2mla.tools.bench.summary import best_serving_rates, kv_bytes, markdown, merge_rows, with_ratios
from vllm_mha2mla.tools.bench.vllm_tools import (
    Server,
    attention_backend,
    free_port,
    kv_capacity_tokens,
    phase_rates,
    port_in_use,
    prefill_backend,
)


# -- shapes and variants -----------------------------------------------------------------------------
@pytest.mark.parametrize("shape, spec, values", [
    ("llama2-7b", "mha", 8192),
    ("llama2-7b", "native", 576),
    ("llama2-7b", "r16-d16", 1024),   # the MHA2MLA paper's Llama-2-7B settings
    ("llama2-7b", "r16-d32", 1536),
    ("llama2-7b", "r16-d64", 2560),
    ("llama3-8b", "mha", 2048),
    ("llama3-8b", "cut50", 1024),
    ("llama3-8b", "cut75", 512),
    ("qwen2.5-7b", "cut75", 256),
    ("smollm2-135m", "r32-d32", 192),
    ("smollm2-135m", "cut50", 192),
])
def test_variant_cache_values(shape, spec, values):
    assert parse_variant(spec, SHAPES[shape]).cache_values(SHAPES[shape]) == values


@pytest.mark.slow
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("spec", ["native", "r16-d16", "cut50", "cut75"])
def test_written_config_caches_what_the_variant_says(tmp_path, shape, spec):
    """The converted config.json (what vLLM sizes the cache by) holds the row the variant
    promises: the variant arithmetic and the converter agree for every shape."""
    original = prepare_original(shape, tmp_path, max_positions=9216)
    variant = parse_variant(spec, original.config)
    folder = prepare_variant(original, shape, variant, tmp_path)
    config = folder.config
    assert config["kv_lora_rank"] + config["qk_rope_head_dim"] == variant.cache_values(original.config)
    assert config["max_position_embeddings"] == 9216
    assert (folder.tokenizer / "tokenizer.json").is_file() and folder.dummy_weights


def test_variant_parsing_refuses_what_cannot_be_converted():
    llama = SHAPES["llama2-7b"]
    assert parse_variant("native@custom", llama).attention_backend == "CUSTOM"
    for bad, message in [("r15-d16", "even"), ("r0-d16", "even"), ("r16-d0", "no latent"),
                         ("r16-d300", "more than the original"), ("cut0", "percentage"), ("cut100", "percentage"),
                         ("gqa", "expected mha")]:
        with pytest.raises(BenchError, match=message):
            parse_variant(bad, llama)


def test_workloads_and_prompt_counts():
    assert parse_workload("8K/1K") == (8192, 1024)
    assert parse_workload("1024/256") == (1024, 256)
    for bad in ("8192", "8K/x", "0/10", "1/2/3"):
        with pytest.raises(BenchError):
            parse_workload(bad)
    # Llama-2-7B MHA at 8K/1K: 512 KiB per token → 55 GiB holds 12 sequences; two waves.
    per_token = mha_cache_values(SHAPES["llama2-7b"]) * 32 * 2
    assert auto_num_prompts(55 * 2**30, per_token, 8192, 1024) == 24
    assert auto_num_prompts(55 * 2**30, 576 * 32 * 2, 8192, 1024) == 2 * int(55 * 2**30 // (576 * 64 * 9216))
    assert auto_num_prompts(1.0, per_token, 8192, 1024) == 8  # never fewer than the floor
    assert abs(weight_bytes(SHAPES["llama2-7b"]) / 2 - 6.74e9) < 0.01e9  # Llama-2-7B's 6.74 B parameters
    assert abs(weight_bytes(SHAPES["llama3-8b"]) / 2 - 8.03e9) < 0.01e9
    with pytest.raises(BenchError, match="unknown shape"):
        shape_config("llama9", 4096)


@pytest.mark.slow
def test_word_tokenizer_round_trips_random_prompts(tmp_path):
    """vLLM's random dataset decodes random ids and re-encodes the text: it must get the same
    ids back, at every id up to the largest vocabulary (Qwen2.5's)."""
    from transformers import AutoTokenizer

    words = {token_word(i) for i in range(3, SHAPES["qwen2.5-7b"]["vocab_size"])}
    assert len(words) == SHAPES["qwen2.5-7b"]["vocab_size"] - 3 and max(map(len, words)) <= 3
    original = prepare_original("qwen2.5-7b", tmp_path, 4096)
    tok = AutoTokenizer.from_pretrained(str(original.tokenizer))
    assert tok.vocab_size == original.config["vocab_size"]
    ids = [random.Random(0).randrange(3, tok.vocab_size) for _ in range(2000)] + [tok.vocab_size - 1]
    text = tok.decode(ids)
    assert tok.encode(text, add_special_tokens=False) == ids
    assert len(text) / len(ids) < 6  # vLLM refuses prompts of more characters per token


def test_mla_config_for_keeps_the_benchmark_scripts_shapes(tmp_path):
    original = prepare_original("llama2-7b", tmp_path, 4096)
    config = mla_config_for(original.path, rope_dim=16, d_kv=16, cache_size=None)
    assert (config["kv_lora_rank"], config["qk_rope_head_dim"]) == (512, 512)


def test_model_folder_errors(tmp_path):
    with pytest.raises(BenchError, match="neither a named shape"):
        prepare_original(str(tmp_path / "missing"), tmp_path, 4096)
    (tmp_path / "notok").mkdir()
    (tmp_path / "notok" / "config.json").write_text(json.dumps(SHAPES["smollm2-135m"]))
    with pytest.raises(BenchError, match="no tokenizer"):
        prepare_original(str(tmp_path / "notok"), tmp_path, 4096)


# -- reading the tools' logs ---------------------------------------------------------------------------
LOG_GPU_AUTO = ("(EngineCore pid=5) INFO 11-26 09:01:20 [cuda.py:483] Using FLASHMLA attention backend out of "
                "potential backends: ['FLASHMLA', 'TRITON_MLA'].\n(EngineCore pid=5) INFO 11-26 09:01:21 "
                "[selector.py:137] Using FLASH_ATTN MLA prefill backend.\n(EngineCore pid=5) INFO 11-26 "
                "[kv_cache_utils.py:2177] GPU KV cache size: 1,706,800 tokens\n")
LOG_PLUGIN = ("(Worker pid=6006) INFO 11-26 09:02:08 [model.py:146] MHA2MLA attention backend: CUSTOM, cache row "
              "192 values\n(EngineCore pid=5993) INFO 11-26 09:02:10 [kv_cache_utils.py:2327] CPU KV cache size: "
              "186,400 tokens, Maximum concurrency for 144 tokens per request: 1294.44x\n")
LOG_CPU_MHA = ("(EngineCore pid=5890) INFO 11-26 09:01:20 [kv_cache_utils.py:2327] CPU KV cache size: 52,416 tokens, "
               "Maximum concurrency for 144 tokens per request: 364.00x\n")
LOG_FORCED = "(EngineCore pid=7) INFO 11-26 [cuda.py:422] Using AttentionBackendEnum.TRITON_MLA backend.\n"


def test_log_parsers_on_real_lines():
    assert kv_capacity_tokens(LOG_GPU_AUTO) == 1_706_800
    assert attention_backend(LOG_GPU_AUTO, None, False, False) == "FLASHMLA"
    assert prefill_backend(LOG_GPU_AUTO) == "FLASH_ATTN"
    assert (kv_capacity_tokens(LOG_PLUGIN), attention_backend(LOG_PLUGIN, None, False, True)) == (186_400, "CUSTOM")
    assert attention_backend(LOG_CPU_MHA, None, True, True) == "CPU_ATTN"
    assert attention_backend(LOG_FORCED, "TRITON_MLA", False, False) == "TRITON_MLA"
    assert attention_backend("", None, False, False) == "unknown"
    assert kv_capacity_tokens("no engine started") is None


def _stats(prompt, generation, running):
    return (f"INFO 11-26 09:14:16 [loggers.py:310] Engine 000: Avg prompt throughput: {prompt} tokens/s, Avg "
            f"generation throughput: {generation} tokens/s, Running: {running} reqs, Waiting: 5 reqs, GPU KV cache "
            "usage: 21.7%, Prefix cache hit rate: 0.0%\n")


def test_phase_rates_separate_prefill_from_decode():
    log = "".join(_stats(p, g, r) for p, g, r in [(38605.1, 101.4, 87), (39968.9, 268.3, 137), (17960.7, 5194.9, 393),
                                                   (0.0, 9020.1, 382), (0.0, 8813.2, 372), (0.0, 8501.4, 362),
                                                   (37268.6, 828.6, 358)])
    rates = phase_rates(log)
    assert (rates["decode_tokens_per_s"], rates["decode_running"]) == (8813.2, 372)  # the median pure-decode interval
    assert rates["prefill_tokens_per_s"] == 38605.1  # 17960.7 (a mixed interval) is left out
    assert phase_rates("no stats") == {"decode_tokens_per_s": None, "decode_running": None,
                                       "prefill_tokens_per_s": None}


# -- summary ---------------------------------------------------------------------------------------------
def _row(variant, values, tps, capacity, dtype="auto", workload=(8192, 1024), device="H100"):
    return {"device": device, "vllm_version": "0.26.0", "shape": "llama2-7b", "variant": variant,
            "cache_values": values, "kv_cache_dtype": dtype, "attention_backend": "X", "input_len": workload[0],
            "output_len": workload[1], "num_prompts": 8, "output_tokens_per_s": tps, "kv_capacity_tokens": capacity}


def test_summary_ratios_merge_and_tables():
    rows = [_row("mha", 8192, 400.0, 100_000), _row("native", 576, 5000.0, 1_400_000),
            _row("native", 576, 6000.0, 2_800_000, dtype="fp8"), _row("native", 576, 9000.0, 1, device="H200")]
    by = {(r["variant"], r["kv_cache_dtype"], r["device"]): r for r in with_ratios(rows)}
    assert by["native", "auto", "H100"]["vs_mha"] == pytest.approx(12.5)
    assert by["native", "auto", "H100"]["expected_capacity"] == pytest.approx(8192 / 576)
    assert by["native", "fp8", "H100"]["expected_capacity"] == pytest.approx(2 * 8192 / 576)  # 1-byte cache
    assert "vs_mha" not in by["native", "fp8", "H100"]  # no MHA run with an fp8 cache to compare with
    assert "vs_mha" not in by["native", "auto", "H200"]  # never across devices
    f32 = with_ratios([dict(_row("mha", 8192, 400.0, 100_000), dtype="float32"),
                       dict(_row("native", 576, 5000.0, 1_400_000), dtype="float32")])
    assert f32[1]["expected_capacity"] == pytest.approx(8192 / 576)  # both caches hold float32 values
    assert kv_bytes("auto", "float32") == 4 and kv_bytes("auto", None) == 2 and kv_bytes("fp8", "float32") == 1
    again = _row("mha", 8192, 410.0, 100_000)
    merged = merge_rows(rows, [again])
    assert len(merged) == len(rows) and again in merged and rows[0] not in merged
    failed = dict(_row("r16-d16", 1024, None, None), error="engine failed\nTraceback")
    table = markdown({"rows": rows + [failed], "serving": []})
    assert "| 12.50 |" in table and "failed: engine failed" in table


def test_collected_runs_keep_their_rows_and_their_own_baselines():
    """Rows gathered from several runs (``run`` set) are never merged or compared across runs:
    a later run's conversion without its own original gets no ratio."""
    first = [dict(_row("mha", 8192, 400.0, 100_000), run="a"), dict(_row("native", 576, 5000.0, 1_400_000), run="a")]
    second = [dict(_row("native", 576, 5200.0, 1_400_000), run="b"), dict(_row("mha", 8192, 800.0, 200_000), run="b",
                                                                            kv_cache_dtype="fp8")]
    merged = merge_rows(first, second)
    assert len(merged) == 4  # the same (device, shape, variant, KV dtype, workload) twice: two runs
    by = {(r["run"], r["variant"]): r for r in with_ratios(merged)}
    assert by["a", "native"]["vs_mha"] == pytest.approx(12.5)
    assert "vs_mha" not in by["b", "native"]  # run b has only an fp8 original
    assert by["b", "native"]["capacity_vs_mha"] == pytest.approx(7.0)  # against b's own original, any dtype
    table = markdown({"rows": merged, "serving": []})
    assert table.startswith("| run | device |") and "| b | H100 | llama2-7b | 8192/1024 | native |" in table
    assert table.index("| a | H100") < table.index("| b | H100")  # runs in the order they were collected


def test_best_serving_rate_is_the_highest_under_the_tpot_and_ttft_limits():
    base = {"device": "H100", "shape": "s", "variant": "mha", "kv_cache_dtype": "auto", "input_len": 1024,
            "output_len": 256, "failed": 0}
    serving = [dict(base, request_rate=r, p99_tpot_ms=t) for r, t in ((1, 20.0), (2, 40.0), (4, 99.0), (8, 250.0))]
    serving.append(dict(base, variant="native", request_rate=1, p99_tpot_ms=120.0))
    best = best_serving_rates(serving)
    assert best[(None, "H100", "s", "mha", "auto", 1024, 256)] == 4
    assert best[(None, "H100", "s", "native", "auto", 1024, 256)] is None
    # a queueing server keeps TPOT low while its first tokens wait: the TTFT limit catches it
    for r, ttft in zip(serving, (200.0, 3500.0, 17000.0, 25000.0)):
        r["p99_ttft_ms"] = ttft
    assert best_serving_rates(serving, ttft_limit_ms=1000.0)[(None, "H100", "s", "mha", "auto", 1024, 256)] == 1
    assert best_serving_rates(serving, ttft_limit_ms=100.0)[(None, "H100", "s", "mha", "auto", 1024, 256)] is None


def test_serving_request_count_is_fixed_or_follows_the_rate():
    assert serve_num_prompts(16.0) == SERVE_PROMPTS and serve_num_prompts(16.0, prompts=64) == 64
    assert serve_num_prompts(16.0, seconds=60) == 960  # the arrivals span the same minute at every rate
    assert serve_num_prompts(0.25, seconds=45) == MIN_SERVE_PROMPTS  # 12 would arrive; never fewer than the floor
    assert serve_num_prompts(3.3, seconds=100) == 330
    with pytest.raises(BenchError, match="not both"):
        serve_num_prompts(1.0, prompts=64, seconds=60)
    with pytest.raises(BenchError, match="positive number of seconds"):
        serve_num_prompts(1.0, seconds=0)
    with pytest.raises(BenchError, match="at least one request"):
        serve_num_prompts(1.0, prompts=0)


# -- a real run on the CPU -------------------------------------------------------------------------------
def _bench_command(*args) -> list[str]:
    return [sys.executable, "-m", "vllm_mha2mla.tools.cli", "bench", *args]


def test_server_refuses_a_taken_port_and_free_ports_are_free(tmp_path):
    """Another process listening on the port (a second bench run's server) would answer the health
    check and the requests: refused before anything starts."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert port_in_use(port)
        server = Server([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ),
                        tmp_path / "serve.log", port, timeout=30)
        started = time.time()
        with pytest.raises(BenchError, match=f"port {port} is already in use"):
            server.__enter__()
        assert time.time() - started < 5 and not (tmp_path / "serve.log").exists()  # nothing launched
    chosen = free_port()
    assert not port_in_use(chosen)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", chosen))  # really free


def test_a_port_whose_closed_connections_linger_is_free():
    """A stopped server's side of its closed connections stays in TIME_WAIT for a minute; the port is free for the
    next server all the same (it binds with SO_REUSEADDR, as uvicorn did for the stopped one), so ``port_in_use``
    must not wait that minute out (it did: up to 50 s of the real runs' fixture)."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = listener.accept()
        conn.close()  # the server closes first: its end of the connection goes to TIME_WAIT
        client.recv(1)
        client.close()
    assert not port_in_use(port)
    with socket.socket() as plain:  # what a bind without SO_REUSEADDR meets (the check's old way)
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))


def test_bench_refuses_a_bad_matrix_before_starting_engines(tmp_path, capsys):
    """The CLI's exit code and message for each bad matrix; called in this process (one import of vLLM
    rather than one per case: the real runs below go through ``python -m``)."""
    from vllm_mha2mla.tools.cli import main

    def bench(*args):
        rc = main(["bench", *args])
        return rc, capsys.readouterr().err

    rc, err = bench("llama2-7b:mha,r16-d300", "--output", str(tmp_path / "out"))
    assert rc == 2 and "more than the original" in err
    rc, err = bench("llama2-7b:mha", "--workloads", "8K", "--output", str(tmp_path / "out"))
    assert rc == 2 and "IN/OUT" in err
    rc, err = bench("llama2-7b:mha", "--workloads", "", "--output", str(tmp_path / "out"))
    assert rc == 2 and "nothing to run" in err
    rc, err = bench("llama2-7b:mha", "--serve-rates", "2", "--serve-prompts", "8", "--serve-seconds", "30",
                    "--output", str(tmp_path / "out"))
    assert rc == 2 and "not both" in err
    rc, err = bench("llama2-7b", "--output", str(tmp_path / "out"))
    assert rc == 2 and "SHAPE:VARIANT" in err
    assert not (tmp_path / "out" / "summary.json").exists()


_TOOL_UNDER_SIGNAL = """
import sys, threading, time
from pathlib import Path
import signal
from vllm_mha2mla.tools.bench import vllm_tools
# as a bench started from a terminal: pytest itself may run under nohup or in a background job, which start
# their children with SIGHUP / SIGINT ignored (and the handler rightly keeps a signal ignored it was started with)
for sig in (signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, signal.SIG_DFL)
vllm_tools.STOP_GRACE_S = 1.0
vllm_tools.stop_tools_on_signals()
out, stubborn = Path(sys.argv[1]), sys.argv[2] == "stubborn"
ignore = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); " if stubborn else ""
child = [sys.executable, "-c", ignore + "import os, time; print(os.getpid(), flush=True); time.sleep(600)"]
threading.Thread(target=vllm_tools.run_tool, args=(child, {}, out / "tool.log", 900), daemon=True).start()
time.sleep(600)
"""


@pytest.mark.slow
@pytest.mark.parametrize("signum,tool", [(15, "plain"), (2, "plain"), (1, "plain"), (15, "stubborn")],
                         ids=["SIGTERM", "SIGINT", "SIGHUP", "SIGTERM-ignoring-tool"])
def test_a_signal_to_the_bench_stops_the_tools_it_started(tmp_path, signum, tool):
    """The tools run in sessions of their own (so a stop can take their engine processes with them),
    which also keeps a terminal's Ctrl-C or hang-up from them: the bench's handler must stop them, or
    they outlive it; one that ignores SIGTERM (stuck in a CUDA call) gets SIGKILL after the grace."""
    proc = subprocess.Popen([sys.executable, "-c", _TOOL_UNDER_SIGNAL, str(tmp_path), tool])
    log = tmp_path / "tool.log"
    tool_pid = None
    try:
        deadline = time.time() + 240  # the bench's imports alone can take a minute on 2 busy cores
        while not (log.is_file() and len(log.read_text().splitlines()) >= 2) and time.time() < deadline:
            time.sleep(0.1)
        assert log.is_file() and len(log.read_text().splitlines()) >= 2, "the bench never started its tool"
        tool_pid = int(log.read_text().splitlines()[1])
        assert _alive(tool_pid)
        time.sleep(0.5)  # the stubborn tool's SIG_IGN is set before it prints; give the bench's thread a moment
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == 128 + signum
        deadline = time.time() + 30
        while _alive(tool_pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(tool_pid), f"the tool (pid {tool_pid}) outlived the bench"
    finally:
        if proc.poll() is None:
            proc.kill()
        if tool_pid is not None and _alive(tool_pid):
            os.kill(tool_pid, 9)


def _alive(pid: int) -> bool:
    """Running (an exited child nobody has reaped yet, a zombie, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


SERVE_ARGS = ("--serve-prompts", "4", "--serve-workload", "64/8", "--dtype", "float32")
"""Every real run: 4 requests of 64/8 tokens per serving rate, float32 engines (see the test's docstring)."""


@dataclass
class RealRuns:
    """What the module's real ``mha2mla bench`` runs did (:func:`real_runs`), for the two tests below."""

    out: Path
    stopped_output: str
    """The stopped run's own output (for assertion messages)."""
    slow_rate_began: bool = False
    summary_at_stop: dict | None = None
    """summary.json as the stopped run left it while its slow rate was running."""
    port: int | None = None
    port_in_use_before_stop: bool = False
    stop_returncode: int | None = None
    port_freed: bool = False
    summary_after_stop: dict | None = None
    runs: list = field(default_factory=list)
    """The later runs (subprocess.CompletedProcess): the original's, the conversion's, ``--report-only``."""


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory, default_model_cache) -> RealRuns:
    """The real runs of both tests below, into one output folder, as three ``mha2mla bench`` runs that share a
    server (each ``vllm serve`` start costs ~30 s on 2 cores: three processes that each import vLLM):

    1. the conversion at 4 then 0.02 req/s, stopped with SIGTERM (what ``timeout`` sends) once the slow rate has
       begun; what it left behind is recorded here and checked by the stop test; its finished rate is the
       conversion's serving row in the full run's summary;
    2. the original: ``vllm bench throughput`` and ``vllm serve`` at 4 req/s;
    3. the conversion: ``vllm bench throughput``; then ``--report-only`` over the folder.

    Runs 2 and 3 merge their rows into the summary.json that run 1 left (rows are kept per variant, workload and
    rate). MHA2MLA_CACHE is the session's default-model cache, so the r32-d32 conversion is made once (by run 1)
    and reused by run 3: the bench's own cache."""
    import re
    import signal

    from conversion.default_model import default_model_dir

    model = default_model_dir(default_model_cache)
    env = {**os.environ, "MHA2MLA_CACHE": str(default_model_cache)}
    out = tmp_path_factory.mktemp("real-bench") / "bench"
    stopped_log = out.parent / "stopped-run.txt"
    result = RealRuns(out=out, stopped_output="")
    with open(stopped_log, "w") as log:
        proc = subprocess.Popen(_bench_command(f"{model}:r32-d32", "--workloads", "", "--serve-rates", "4,0.02",
                                               *SERVE_ARGS, "--output", str(out)),
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 900
        while not list(out.glob("logs/serve_*_rate0.02.log")) and proc.poll() is None and time.time() < deadline:
            time.sleep(1)
        result.slow_rate_began = bool(list(out.glob("logs/serve_*_rate0.02.log")))
        if result.slow_rate_began:
            result.summary_at_stop = json.loads((out / "summary.json").read_text())  # written before the slow rate
            (server_log,) = out.glob("logs/serve_*_auto.log")
            result.port = int(re.search(r"--port (\d+)", server_log.read_text()).group(1))
            result.port_in_use_before_stop = port_in_use(result.port)
            proc.send_signal(signal.SIGTERM)
            result.stop_returncode = proc.wait(timeout=60)
            deadline = time.time() + 120
            while port_in_use(result.port) and time.time() < deadline:
                time.sleep(1)
            result.port_freed = not port_in_use(result.port)
            result.summary_after_stop = json.loads((out / "summary.json").read_text())
    finally:
        if proc.poll() is None:  # it never reached the slow rate: stop the bench (and, through it, its server)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        result.stopped_output = stopped_log.read_text(errors="replace")[-3000:]
    for args in ([f"{model}:mha", "--workloads", "1000/16", "--num-prompts", "1", "--serve-rates", "4", *SERVE_ARGS],
                 [f"{model}:r32-d32", "--workloads", "1000/16", "--num-prompts", "1", "--dtype", "float32"],
                 ["--report-only"]):
        result.runs.append(subprocess.run(_bench_command(*args, "--output", str(out)), capture_output=True,
                                          text=True, timeout=1800, env=env))
    return result


@pytest.mark.vllm
def test_bench_runs_vllms_tools_on_the_real_model_and_a_conversion(real_runs):
    """``vllm bench throughput`` and ``vllm serve`` + ``vllm bench serve`` through the plugin's
    entry point: the real SmolLM2 (vLLM's CPU attention) against its 192-value conversion (the
    plugin's backend), one row each with the recorded backend, KV capacity in the cache-size
    ratio, and latency percentiles from the serving run; the rows of several runs into one
    output folder make one summary (:func:`real_runs`). (The context is 1K: vLLM's CPU attention
    gives the original a smaller share of the same KV memory at very short contexts; at 1K and 2K the
    ratio is 2.00 and 2.03. One prompt per throughput run. ``--dtype float32``: on CPUs without native
    bf16 vLLM emulates bf16 matmuls, and a 2K-token bf16 prefill took about a minute on 2 cores; what
    is checked does not depend on the dtype.)"""
    out = real_runs.out
    for run in real_runs.runs[:2]:
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["variant"]: r for r in summary["rows"]}
    assert set(rows) == {"mha", "r32-d32"}
    for r in rows.values():
        assert not r.get("error") and r["output_tokens_per_s"] > 0 and r["num_prompts"] == 1
        assert r["device"].startswith("CPU") and r["vllm_version"] and r["command"].startswith("vllm bench throughput")
        assert r["dtype"] == "float32" and "--dtype float32" in r["command"]
    assert (rows["mha"]["attention_backend"], rows["r32-d32"]["attention_backend"]) == ("CPU_ATTN", "CUSTOM")
    assert (rows["mha"]["cache_values"], rows["r32-d32"]["cache_values"]) == (384, 192)
    assert rows["r32-d32"]["kv_capacity_tokens"] / rows["mha"]["kv_capacity_tokens"] == pytest.approx(2.0, rel=0.05)
    serving = {r["variant"]: r for r in summary["serving"]}
    assert set(serving) == {"mha", "r32-d32"}
    for r in serving.values():
        assert not r.get("error") and (r["completed"], r["failed"], r["request_rate"]) == (4, 0, 4.0)
        assert 0 < r["p50_tpot_ms"] <= r["p99_tpot_ms"] and 0 < r["p50_ttft_ms"] <= r["p99_ttft_ms"]
    assert serving["r32-d32"]["attention_backend"] == "CUSTOM"
    md = (out / "summary.md").read_text()
    assert "| r32-d32 | 192 |" in md and "TPOT p50 / p99" in md
    assert (out / "throughput.png").is_file() and (out / "kv_capacity.png").is_file() and (out / "serving.png").is_file() \
        and (out / "serving_ttft.png").is_file()
    again = real_runs.runs[2]
    assert again.returncode == 0 and "r32-d32" in again.stdout


@pytest.mark.vllm
def test_a_stopped_serving_run_keeps_its_finished_rates_and_stops_the_server(real_runs):
    """SIGTERM (what ``timeout`` sends) while a slow rate is running (the first of :func:`real_runs`): the
    rate measured before it is already in summary.json, with its backend and capacity, the bench exits 143,
    and its ``vllm serve`` and engine are gone (the port is free again) rather than left holding the machine."""
    import signal

    assert real_runs.slow_rate_began, real_runs.stopped_output
    (row,) = real_runs.summary_at_stop["serving"]
    assert row["request_rate"] == 4.0 and not row.get("error") and (row["completed"], row["failed"]) == (4, 0)
    assert row["attention_backend"] == "CUSTOM" and row["kv_capacity_tokens"] > 0
    assert real_runs.port_in_use_before_stop
    assert real_runs.stop_returncode == 128 + signal.SIGTERM, real_runs.stopped_output
    assert real_runs.port_freed, f"vllm serve still holds port {real_runs.port} after the bench stopped"
    assert [r["request_rate"] for r in real_runs.summary_after_stop["serving"]] == [4.0]

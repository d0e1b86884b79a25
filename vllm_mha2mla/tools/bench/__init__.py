"""``mha2mla bench``: KV capacity, throughput and serving latency of an MHA original against its
MHA2MLA conversions, measured with vLLM's own tools (``vllm bench throughput``, ``vllm serve`` +
``vllm bench serve``). ``shapes`` names the models and conversions, ``folders`` writes them,
``vllm_tools`` runs and reads the tools, ``summary`` keeps the results and draws them, ``run``
puts it together."""

from vllm_mha2mla.tools.bench.run import BenchOptions, run_bench, write_report
from vllm_mha2mla.tools.bench.shapes import SHAPES, BenchError

__all__ = ["SHAPES", "BenchError", "BenchOptions", "run_bench", "write_report"]

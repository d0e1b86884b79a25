"""Whole vLLM engines (or `mha2mla bench`/`eval` runs): parity with the PyTorch reference, throughput, serving."""

"""Scripts that produce the committed results under ``benchmarks/results/`` (index: ``benchmarks/README.md``)."""

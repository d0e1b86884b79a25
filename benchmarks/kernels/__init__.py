"""Kernels alone: the plugin's Triton decode and prefill attention, timed, profiled or compiled without an engine."""

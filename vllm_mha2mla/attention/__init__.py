"""The plugin's attention: vLLM MLA backends for MHA2MLA checkpoints of any shape, and their kernels.

- :mod:`.backend_name`: the name the backends register under;
- :mod:`.cpu_backend` / :mod:`.gpu_backend`: the any-shape MLA backends (CPU; CUDA with Triton);
- :mod:`.metadata`: their metadata builders; :mod:`.prefill`: the prefill backends;
- :mod:`.head_compaction`: attending over each head's ``head_dim`` useful columns only;
- :mod:`.triton_decode`: the GPU decode kernel; :mod:`.cpu_decode_kernel` (``csrc/``): the CPU one;
  :mod:`.paged_attention`: the PyTorch reference decode;
- :mod:`.cache_gather`: the chunked-context cache gather for any row width.
"""

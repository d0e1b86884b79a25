"""vLLM plugin serving MHA2MLA checkpoints through vLLM's own MLA attention.

vLLM calls :func:`register` in every process (entry point ``vllm.general_plugins``). It
registers the model class lazily by ``"module:Class"`` so that importing the plugin stays
cheap and CUDA is not initialised before vLLM forks its workers.
"""

ARCHITECTURE = "MHA2MLAForCausalLM"


def register() -> None:
    from vllm import ModelRegistry

    # inside: vLLM imports this package in every process; its glue loads only when the hook runs
    from vllm_mha2mla.backend_selection import register_attention_backend
    from vllm_mha2mla.patches import keep_chunked_prefill_on_cpu, keep_layer_widths_apart

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "vllm_mha2mla.model:MHA2MLAForCausalLM")
    register_attention_backend()
    keep_chunked_prefill_on_cpu()
    keep_layer_widths_apart()

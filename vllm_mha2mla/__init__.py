"""vLLM plugin serving MHA2MLA checkpoints through vLLM's own MLA attention.

vLLM calls :func:`register` in every process (entry point ``vllm.general_plugins``). It
registers the model class lazily by ``"module:Class"`` so that importing the plugin stays
cheap and CUDA is not initialised before vLLM forks its workers.
"""

ARCHITECTURE = "MHA2MLAForCausalLM"


def register() -> None:
    from vllm import ModelRegistry

    from vllm_mha2mla.compat import keep_chunked_prefill_on_cpu, keep_layer_widths_apart, register_attention_backend

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "vllm_mha2mla.model:MHA2MLAForCausalLM")
    register_attention_backend()
    keep_chunked_prefill_on_cpu()
    keep_layer_widths_apart()

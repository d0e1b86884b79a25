"""The tools on top of the plugin: the ``mha2mla`` command (:mod:`.cli`), the demo, the engine
runner (one vLLM engine in a subprocess), teacher-text synthesis, ``bench/`` and ``evaluation/``.
The plugin itself (``vllm_mha2mla`` and ``vllm_mha2mla.attention``) never imports them."""

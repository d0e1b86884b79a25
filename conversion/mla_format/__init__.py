"""The MHA2MLA checkpoint format, in one place: what the converter writes and the plugin reads.

- :mod:`~conversion.mla_format.spec`: the ``mha2mla`` section of a converted ``config.json``,
  its writer (:func:`~conversion.mla_format.spec.build_config`) and its reader
  (:class:`~conversion.mla_format.spec.MHA2MLASpec`) side by side;
- :mod:`~conversion.mla_format.layout`: :class:`~conversion.mla_format.layout.MLALayout`, the
  mapping of MHA2MLA attention onto vLLM's MLA tensors, and vLLM's native sizes;
- :mod:`~conversion.mla_format.inputs`: :func:`~conversion.mla_format.inputs.mla_inputs`, the
  input projections the vLLM plugin's model and the Hugging Face reference model share;
- :mod:`~conversion.mla_format.cache_quant` and :mod:`~conversion.mla_format.cache_rows`: a low-bit latent
  cache's math (groups, codes, scales) and its row bytes, what the reference model and the plugin's cache share.
"""

"""Moved to :mod:`vllm_mha2mla.tools.synthesize`. Kept only for the import in
``conversion/recovery/finetune.py`` (an arrow from conversion up into the plugin) until the
recovery work hands the synthesis hook to ``finetune`` from the CLI (issue 34); delete it then."""

from vllm_mha2mla.tools.synthesize import generate_teacher_text  # noqa: F401

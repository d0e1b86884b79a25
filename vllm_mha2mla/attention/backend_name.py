"""Name under which the plugin's attention backend registers (importable without vLLM's
backend modules)."""

BACKEND_NAME = "CUSTOM"
"""vLLM's registry slot for third-party backends (the one both supported releases have)."""

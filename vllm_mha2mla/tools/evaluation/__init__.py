"""Quality evaluation on vLLM engines: ``mha2mla eval``.

Task families know nothing of engines or Ray: each turns its data into token-level requests
(``requests.py``) and scores the answers (``multiple_choice``, ``perplexity``,
``long_context``, ``generative`` (exact-match QA), ``agreement`` (chat answers compared with
the first model's), registered by name in ``tasks``). ``engine`` holds one vLLM engine;
``executor`` runs requests on one engine in a child process or on N Ray replicas;
``evaluate`` ties models and tasks together and ``report`` writes the tables and plots.
"""


class EvaluationError(ValueError):
    """Bad input to an evaluation (unknown task, malformed task file, unloadable model...)."""

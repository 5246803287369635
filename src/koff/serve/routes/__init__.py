"""The endpoints of `koff serve`, one router per endpoint group (as vLLM's entrypoints do):

    plain        GET /, /health, /metrics          (no key needed)
    models       GET /v1/models[/NAME]
    generation   POST /v1/completions, /v1/chat/completions
    memories     GET, POST /v1/memories; DELETE /v1/memories/NAME
"""

from koff.serve.routes import generation, memories, models, plain

V1 = (models, generation, memories)
"""The groups under /v1 (behind the API key)."""

__all__ = ["V1", "generation", "memories", "models", "plain"]

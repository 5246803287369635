"""lm-evaluation-harness internals koff relies on."""

from __future__ import annotations


def registered_model(name: str):
    """The model class registered under `name` in lm-eval (None if none): registering the same
    name twice raises, and a process may build koff's model class more than once."""
    from lm_eval.api.registry import model_registry

    return model_registry.get(name) if name in model_registry else None

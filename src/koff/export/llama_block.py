"""What an engine built on the Llama decoder block (llama.cpp's `deci`, vLLM's DeciLM) can run:
both give each layer its own FFN width but otherwise compute a plain Llama layer, so a model
exports to them only when it is one."""

from __future__ import annotations

from koff.core.errors import ArtifactError

MODEL_TYPES = ("llama", "mistral", "qwen2")
"""transformers model types whose decoder layer is a Llama block (Qwen2 adds q/k/v biases, which both engines take)."""


def check_llama_block(config, where: str, engine: str, fmt: str) -> None:
    """Raise ArtifactError, naming `where` and the field, unless `config` describes a Llama-block
    model that `engine` (as exported by `--format fmt`) computes exactly: a supported model type,
    SiLU, and attention over the whole context."""
    mt = config.model_type
    if mt not in MODEL_TYPES:
        raise ArtifactError(f"{where}: model_type {mt!r} has no {engine} mapping in koff; --format {fmt} exports "
                            f"{', '.join(MODEL_TYPES)}; use --format hf for this model")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ArtifactError(f"{where}: hidden_act {config.hidden_act!r}; {engine} uses SiLU")
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", mt == "mistral")
    if window is not None and uses_window and window < config.max_position_embeddings:
        raise ArtifactError(f"{where}: sliding_window={window} (< max_position_embeddings "
                            f"{config.max_position_embeddings}); {engine} attends to the whole context")

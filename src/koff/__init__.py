"""koff: knowledge offloading. Decompose a causal LLM into a sparse shared backbone and small,
swappable per-domain memories (LoRA adapters + a trainable KV cache)."""

__version__ = "0.1.0"

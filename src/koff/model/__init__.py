"""The model layer: the base model and its geometry, the neuron gates, sparsity controllers,
neuron importance scores, memory parts (LoRA, KV), the backbone's shared LoRA, and `KoffModel`
which puts them together."""

"""Every use of a third-party library's internals (anything not its documented API), one module per
library, so that an upgrade that breaks one is fixed in one place:

  transformers  the cache argument's name, cache layers' state, the plain-cache check, RoPE
                initialisation, config classes by model type
  torch         the storage a view shares (`Tensor._base`)
  peft          the order of random draws of a fresh LoRA adapter
  lm_eval       the model registry
"""

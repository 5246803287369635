"""A koff backbone: the base family's causal LM with each layer's FFN at its own width.

Written by `koff export`; loads with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`. The weights are the base
model's with the pruned FFN neurons deleted (rows of gate_proj/up_proj, columns of down_proj), so
each layer computes exactly what the masked base model computed.
"""

import transformers
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .configuration_koff import BASE_MODEL_TYPE, KoffConfig

_BaseForCausalLM = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[BASE_MODEL_TYPE])


class KoffForCausalLM(_BaseForCausalLM):
    """The base causal LM with per-layer FFN widths from `config.koff_intermediate_sizes`."""

    config_class = KoffConfig

    def __init__(self, config):
        super().__init__(config)
        widths = list(config.koff_intermediate_sizes)
        layers = self.model.layers
        if len(widths) != len(layers):
            raise ValueError(f"koff_intermediate_sizes has {len(widths)} widths for {len(layers)} layers")
        down_bias = bool(getattr(config, "koff_down_proj_bias", False))
        for layer, width in zip(layers, widths):
            mlp = layer.mlp
            hidden = mlp.gate_proj.in_features
            mlp.gate_proj = nn.Linear(hidden, width, bias=mlp.gate_proj.bias is not None)
            mlp.up_proj = nn.Linear(hidden, width, bias=mlp.up_proj.bias is not None)
            mlp.down_proj = nn.Linear(width, hidden, bias=down_bias or mlp.down_proj.bias is not None)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = width
        self.post_init()  # again: the new linears need the dtype/initialisation bookkeeping too

"""transformers model for a koff backbone in the nemotron-nas / DeciLM layout.

Written by `koff export --format vllm` so the folder vLLM serves also loads with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` (and can be checked
against koff without a GPU). It is a Llama whose layer i has FFN width
`block_configs[i].ffn.intermediate_size`; `qkv_bias` adds biases to q/k/v only.
"""

from torch import nn
from transformers import LlamaForCausalLM

from .configuration_decilm import DeciLMConfig


class DeciLMForCausalLM(LlamaForCausalLM):
    """Llama with per-layer FFN widths and optional q/k/v-only biases, as vLLM's DeciLM builds it."""

    config_class = DeciLMConfig

    def __init__(self, config):
        super().__init__(config)
        blocks = config.block_configs
        if len(blocks) != len(self.model.layers):
            raise ValueError(f"block_configs has {len(blocks)} entries for {len(self.model.layers)} layers")
        qkv_bias = bool(getattr(config, "qkv_bias", False))
        for i, (layer, block) in enumerate(zip(self.model.layers, blocks)):
            if block.attention.no_op or block.attention.replace_with_linear or block.ffn.no_op \
                    or block.ffn.replace_with_linear:
                raise ValueError(f"block_configs[{i}]: no-op and linear blocks are not implemented here")
            if config.num_attention_heads // block.attention.n_heads_in_group != config.num_key_value_heads:
                raise ValueError(f"block_configs[{i}]: n_heads_in_group {block.attention.n_heads_in_group} "
                                 f"disagrees with num_key_value_heads {config.num_key_value_heads}")
            attn = layer.self_attn
            if qkv_bias:
                for name in ("q_proj", "k_proj", "v_proj"):
                    old = getattr(attn, name)
                    setattr(attn, name, nn.Linear(old.in_features, old.out_features, bias=True))
            mlp = layer.mlp
            hidden, width = mlp.gate_proj.in_features, block.ffn.intermediate_size
            bias = bool(config.mlp_bias)
            mlp.gate_proj = nn.Linear(hidden, width, bias=bias)
            mlp.up_proj = nn.Linear(hidden, width, bias=bias)
            mlp.down_proj = nn.Linear(width, hidden, bias=bias)
            mlp.intermediate_size = width
        self.post_init()

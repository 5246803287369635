"""Configuration of a koff backbone in vLLM's nemotron-nas / DeciLM layout.

Written by `koff export --format vllm`. vLLM's `DeciLMForCausalLM` reads this config through
`trust_remote_code` and sizes each decoder layer from `block_configs[i]`:

    attention.no_op, attention.n_heads_in_group   (query heads per KV head)
    ffn.no_op, ffn.intermediate_size              (this layer's FFN width)

An FFN block here has no `ffn_mult` attribute on purpose: vLLM rounds an `ffn_mult` width up to a
multiple of 256, and reads `intermediate_size` exactly when `ffn_mult` is absent. `qkv_bias` gives
q/k/v projections a bias without one on o_proj (the Qwen2 layout).
"""

from dataclasses import asdict, dataclass

from transformers import LlamaConfig


@dataclass
class AttentionBlockConfig:
    """One layer's attention: grouped-query attention with `n_heads_in_group` query heads per KV head."""

    n_heads_in_group: int
    no_op: bool = False
    replace_with_linear: bool = False


@dataclass
class FFNBlockConfig:
    """One layer's gated MLP at its own width."""

    intermediate_size: int
    no_op: bool = False
    replace_with_linear: bool = False


@dataclass
class BlockConfig:
    attention: AttentionBlockConfig
    ffn: FFNBlockConfig

    @classmethod
    def from_dict(cls, d: dict) -> "BlockConfig":
        return cls(attention=AttentionBlockConfig(**d["attention"]), ffn=FFNBlockConfig(**d["ffn"]))


class DeciLMConfig(LlamaConfig):
    """A Llama config whose layers each carry a `BlockConfig` (`block_configs`)."""

    model_type = "nemotron-nas"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        blocks = getattr(self, "block_configs", None) or []
        self.block_configs = [b if isinstance(b, BlockConfig) else BlockConfig.from_dict(b) for b in blocks]

    def to_dict(self):
        d = super().to_dict()
        d["block_configs"] = [asdict(b) if isinstance(b, BlockConfig) else b for b in self.block_configs]
        return d

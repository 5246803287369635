"""Configuration of a koff backbone: the base family's own config plus one FFN width per layer.

Written by `koff export`; loads with
`AutoConfig.from_pretrained(folder, trust_remote_code=True)`.

    koff_intermediate_sizes   list[int], the FFN width of each decoder layer (pruned neurons deleted)
    koff_down_proj_bias       bool, whether each down_proj has an output bias (FLAP compensation)

`model_type` stays the base family's, so a tokenizer or config loads without remote code, and a
plain `from_pretrained` without `trust_remote_code` fails on the FFN shapes instead of building a
wrong model.
"""

from transformers.models.auto.configuration_auto import CONFIG_MAPPING

BASE_MODEL_TYPE = "llama"  # set by koff export: the base model's model_type

_BaseConfig = CONFIG_MAPPING[BASE_MODEL_TYPE]


class KoffConfig(_BaseConfig):
    """The base family's config; the per-layer widths ride along as extra attributes."""

    model_type = BASE_MODEL_TYPE

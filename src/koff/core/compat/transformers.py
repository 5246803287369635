"""transformers internals koff relies on, each with the release behaviour it adapts to."""

from __future__ import annotations

import functools
import inspect
from typing import Any, cast

import torch


@functools.cache
def _cache_kwarg_of(cls: Any) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model) -> str:
    """The name under which `model.forward` takes a KV cache: transformers 5.24 renamed
    `past_key_values` to `cache` (the old name warns and goes away in 5.40); the GPU machines koff
    is checked on carry 5.17, which knows only the old one."""
    return _cache_kwarg_of(cast(Any, type(model)))  # keyed by the class (mypy sees type[Any] as unhashable)


def output_cache(output):
    """The cache a model output carries (`cache`, or `past_key_values` on older releases)."""
    if "cache" in getattr(type(output), "__dataclass_fields__", {}):
        return output.cache
    return output.past_key_values


def cache_layer_state(layer) -> dict[str, Any] | None:
    """Everything one layer of a transformers cache holds (its instance attributes: keys, values,
    offsets), to put back with `restore_cache_layer` when gradient checkpointing recomputes that
    layer: the recomputation must see the cache as the first forward did. None for no layer."""
    return dict(layer.__dict__) if layer is not None else None


def restore_cache_layer(layer, state: dict[str, Any] | None) -> None:
    """Put back what `cache_layer_state` took."""
    if layer is not None and state is not None:
        layer.__dict__.update(state)


def is_plain_dynamic_cache(config) -> bool:
    """Whether a DynamicCache for this config holds only plain `DynamicLayer`s (no sliding-window
    or other special layers), which the server can split and merge row-wise."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


def llama3_inverse_frequencies(config) -> torch.Tensor:
    """The scaled RoPE inverse frequencies transformers computes for `rope_type: llama3`."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return scaled


def config_class(model_type: str):
    """The transformers config class of a model family (None when transformers has no such family)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type] if model_type in CONFIG_MAPPING else None

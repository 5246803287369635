"""The one place koff adapts to differences between transformers releases.

transformers 5.24 renamed the cache argument and output field of model forwards from
`past_key_values` to `cache` (the old name warns and goes away in 5.40); the GPU machines koff is
checked on carry 5.17, which knows only the old name. koff passes and reads the cache through
these helpers only.
"""

from __future__ import annotations

import functools
import inspect


@functools.cache
def _cache_kwarg_of(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model) -> str:
    """The name under which `model.forward` takes a KV cache."""
    return _cache_kwarg_of(type(model))


def output_cache(output):
    """The cache a model output carries (`cache`, or `past_key_values` on older releases)."""
    if "cache" in getattr(type(output), "__dataclass_fields__", {}):
        return output.cache
    return output.past_key_values

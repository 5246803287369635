"""torch internals koff relies on."""

from __future__ import annotations

import torch


def storage_owner(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage `t` views (itself when it is not a view): `koff plan` counts a
    saved activation once however many views of it autograd keeps."""
    return t._base if t._base is not None else t

"""What a memory is made of: the memory-part interface, the registry of part kinds, and per-call
routing.

A memory (one per domain) is a set of *parts*, each of a registered kind ("lora", "kv"). For
every kind, a `KoffModel` holds one container module with that kind's tensors for every memory.
A kind knows how to

  - create a memory's tensors from the run's `MemoryConfig` (`create`),
  - list a memory's parameters (`parameters_of`) and the learning rate they train at (`lr`),
  - take part in a forward call in which every batch row names its own memory (`prepare`, plus
    the hooks it registered once on the base model),
  - snapshot them as a plain state (`snapshot`) and install a stored one (`install`); the state
    classes own the on-disk format (`save` / `load`, validated against the base model).

Routing is per call. `KoffModel.forward` builds a `Call` (one memory name per row, plus what each
part precomputed for those rows) and makes it current for the duration of the call through a
context variable, which every hook reads. Nothing about routing is stored on shared modules, so
concurrent calls from several threads or async tasks cannot race, and a call's routing can be
re-entered exactly when gradient checkpointing recomputes a layer.

A third kind of memory is one new module: a container class registered with `@register_part`,
and a state class with `save` / `load`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn


@dataclass
class Prefix:
    """Key/value states placed in front of every row's tokens (one tensor pair per layer).

    `keys[l]` / `values[l]` are [B, kv_heads, M, head_dim]; rows with a shorter (or no) prefix
    are left-padded with masked slots: `mask` [B, M] marks real prefix slots, `lengths` [B] counts
    them (so each row's token positions start after its own prefix).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    lengths: torch.Tensor


@dataclass
class Call:
    """The routing of one forward call (or one generation session): a memory name (or None) per
    batch row, and each part's precomputed state for exactly those rows."""

    rows: tuple[str | None, ...]
    use_gates: bool = True
    """False: the FFN gates are not applied in this call (the dense base model)."""
    state: dict[str, Any] = field(default_factory=dict)
    """part kind -> what that part's hooks need for these rows."""
    prefix: Prefix | None = None


_CALL: ContextVar[Call | None] = ContextVar("koff_call", default=None)


def current_call() -> Call | None:
    """The routing of the forward call running in this thread / task (None outside one)."""
    return _CALL.get()


@contextlib.contextmanager
def routed(call: Call) -> Iterator[Call]:
    """Make `call` the current routing within the block (re-entrant, per thread / task)."""
    token = _CALL.set(call)
    try:
        yield call
    finally:
        _CALL.reset(token)


class PartState(Protocol):
    """A memory part as stored: plain tensors plus its manifest section."""

    kind: ClassVar[str]

    def save(self, folder: Path) -> dict:
        """Write this part's files into `folder`; returns its memory.json section."""

    def check(self, base: nn.Module, where: Path) -> None:
        """Raise ArtifactError if the tensors do not fit `base` (shapes, dtype, finiteness)."""


class MemoryPart(Protocol):
    """The container of one part kind inside a KoffModel (an nn.Module)."""

    kind: ClassVar[str]
    state_class: ClassVar[type]

    def names(self) -> list[str]: ...

    def enabled(self, cfg) -> bool:
        """Whether a memory built from MemoryConfig `cfg` has this part."""

    def create(self, name: str, cfg, init: dict) -> None:
        """Fresh tensors for memory `name` (`init` holds what creation needs, e.g. 'tokens')."""

    def install(self, name: str, state) -> None: ...

    def snapshot(self, name: str): ...

    def remove(self, name: str) -> None: ...

    def parameters_of(self, name: str) -> list[nn.Parameter]: ...

    def lr(self, train_cfg) -> float:
        """This kind's learning rate in a TrainConfig."""

    def prepare(self, call: Call) -> None:
        """Precompute this part's per-call state for `call.rows` (into `call.state[kind]`)."""


PART_KINDS: dict[str, type] = {}
"""Registered part kinds, in the order a memory's parts are created and listed."""

STATE_CLASSES: dict[str, type] = {}
"""kind -> the class that loads that part from disk (memory.json section + files)."""


def register_part(cls: type) -> type:
    """Class decorator: register a memory-part container (and its state class) by its `kind`."""
    if cls.kind in PART_KINDS:
        raise ValueError(f"memory part kind {cls.kind!r} is registered twice")
    PART_KINDS[cls.kind] = cls
    STATE_CLASSES[cls.kind] = cls.state_class
    return cls

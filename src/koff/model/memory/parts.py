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

A new kind of memory is one new module: a `MemoryPart` subclass registered with `@register_part`
and its `PartState` subclass (tests/model/memory/test_new_part_kind.py adds one that way).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

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


class PartState:
    """A memory part as stored: plain tensors, its files and its memory.json section.

    Subclasses (one per part kind, beside their container) define the on-disk format. Everything
    that stores, loads, checks, describes or re-shapes a memory goes through these methods, so a
    new kind of memory is one new module.
    """

    kind: ClassVar[str]
    FILES: ClassVar[tuple[str, ...]]
    """The files this part writes into a memory folder."""

    @staticmethod
    def parse_section(d: dict, where: str) -> Any:
        """This part's memory.json section, typed and validated."""
        raise NotImplementedError

    def save(self, folder: Path, base_source: str | None = None) -> Any:
        """Write this part's files into `folder`; returns its memory.json section."""
        raise NotImplementedError

    @classmethod
    def load(cls, folder: Path, section: Any, where: str, geometry: Any = None,
             against: str = "the base model") -> PartState:
        """Read this part from `folder` (validated against `section` and, given, the geometry of
        the base model it must fit)."""
        raise NotImplementedError

    @classmethod
    def section_from_files(cls, folder: Path, entry: dict, where: str) -> Any:
        """The section of a part stored without memory.json (an exported memory folder), from its
        own files and its entry in the export's manifest."""
        raise NotImplementedError

    def check(self, base: nn.Module, where: Path) -> None:
        """Raise ArtifactError if the tensors do not fit `base` (shapes, dtype, finiteness)."""
        raise NotImplementedError

    @classmethod
    def check_run_shape(cls, section: Any, memory_cfg: Any, where: str) -> None:
        """Raise ArtifactError unless a part with this section has the shape `memory_cfg` (a
        MemoryConfig) gives every memory of a run."""

    def describe(self) -> dict:
        """What a server shows of this part (e.g. {"lora_rank": 8})."""
        return {}

    @property
    def prefix_tokens(self) -> int:
        """Positions this part places in front of a request's tokens (a KV prefix)."""
        return 0

    def fit_ffn(self, keep: Sequence[torch.Tensor], to_sliced: bool) -> PartState:
        """This part for a backbone whose pruned FFN neurons are physically deleted (`to_sliced`),
        or back from one to the dense widths. Parts that do not touch FFN widths are unchanged."""
        return self


S = TypeVar("S", bound=PartState)
"""A part kind's stored state class."""


class MemoryPart(nn.Module, Generic[S]):
    """The container of one part kind inside a KoffModel: that kind's tensors for every memory,
    and the hooks that apply them to the rows of a call that name a memory.

    Subclasses register with `@register_part` and define `kind`, `state_class` and the methods
    below; `KoffModel` creates, installs, snapshots, trains and routes memories only through them.
    """

    kind: ClassVar[str]
    state_class: ClassVar[type[PartState]]
    _base: Any  # the transformers model; typed Any as nn.Module.__getattr__ would type it Tensor | Module

    def __init__(self, base: nn.Module):
        super().__init__()
        self.__dict__["_base"] = base  # not a submodule: the base model belongs to the KoffModel

    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        """Whether a memory built from MemoryConfig `cfg` has this part."""
        raise NotImplementedError

    @classmethod
    def tokens_needed(cls, cfg: Any) -> int:
        """Tokens of a domain's training text a fresh part starts from (0: none)."""
        return 0

    @classmethod
    def check_tokens(cls, tokens: torch.Tensor, cfg: Any, name: str) -> None:
        """Raise DataError when `tokens` (the start of memory `name`'s training text) is too
        short for a fresh part."""

    def initial(self, km: Any, tokens: torch.Tensor, cfg: Any, name: str) -> Any:
        """What `create` starts memory `name` from, given the first `tokens_needed` tokens of its
        training text (e.g. the base model's own cache of them); None when nothing."""
        return None

    def names(self) -> list[str]:
        raise NotImplementedError

    def create(self, name: str, cfg: Any, init: Any) -> None:
        """Fresh tensors for memory `name` from MemoryConfig `cfg` and `initial`'s result."""
        raise NotImplementedError

    def add(self, name: str, value: Any) -> None:
        """Add memory `name` from this kind's own in-memory form (`KoffModel.add_memory`)."""
        raise NotImplementedError

    def install(self, name: str, state: S) -> None:
        """Add memory `name` from a stored state (checked against the base model)."""
        raise NotImplementedError

    def snapshot(self, name: str) -> S:
        """Memory `name`'s tensors as a stored state (detached, on the CPU)."""
        raise NotImplementedError

    def remove(self, name: str) -> None:
        raise NotImplementedError

    def parameters_of(self, name: str) -> list[nn.Parameter]:
        raise NotImplementedError

    def lr(self, train_cfg: Any) -> float:
        """This kind's learning rate in a TrainConfig."""
        raise NotImplementedError

    def prepare(self, call: Call) -> None:
        """Precompute this part's per-call state for `call.rows` (into `call.state[kind]` or the
        call's prefix)."""
        raise NotImplementedError


PART_KINDS: dict[str, type[MemoryPart]] = {}
"""Registered part kinds, in the order a memory's parts are created and listed."""

STATE_CLASSES: dict[str, type[PartState]] = {}
"""kind -> the class that loads that part from disk (memory.json section + files)."""


def register_part(cls: type[MemoryPart]) -> type[MemoryPart]:
    """Class decorator: register a memory-part container (and its state class) by its `kind`."""
    if cls.kind in PART_KINDS:
        raise ValueError(f"memory part kind {cls.kind!r} is registered twice")
    PART_KINDS[cls.kind] = cls
    STATE_CLASSES[cls.kind] = cls.state_class
    return cls

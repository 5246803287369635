"""The KV part of a memory: trainable key/value prefix tokens for every attention layer.

A KV memory holds, for every layer, m key and m value vectors per KV head, shaped
`[layers, kv_heads, m, head_dim]`. It is placed in front of the attention cache exactly like past
key/values (keys stored after rotary embedding, as a real cache holds them), so real tokens sit at
positions m, m+1, ... It is initialised from the base model's own cache of m real domain tokens
(as in Cartridges, arXiv 2506.06266) and its first `num_frozen` tokens (the attention sink) never
train. The tensors train in float32 and are cast to the attention dtype when a call uses them.

On disk: `kv.safetensors` with "keys" and "values", float32 [layers, kv_heads, m, head_dim].
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
from torch import nn

from koff.core.compat.transformers import output_cache
from koff.core.errors import ArtifactError, DataError
from koff.core.fields import optional, require
from koff.core.files import load_tensors
from koff.model.base_model import inspect_model
from koff.model.memory.parts import Call, MemoryPart, PartState, Prefix, register_part

KV_FILE = "kv.safetensors"


class KVMemory(nn.Module):
    """Trainable key/value prefix for every layer: `keys`, `values` of shape [L, H, m, d]."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, num_frozen: int = 1):
        super().__init__()
        if keys.shape != values.shape or keys.dim() != 4:
            raise ValueError(f"KV memory keys {tuple(keys.shape)} and values {tuple(values.shape)} must both be "
                             "[layers, kv_heads, tokens, head_dim]")
        if not 0 <= num_frozen <= keys.shape[2]:
            raise ValueError(f"num_frozen={num_frozen} is outside [0, {keys.shape[2]}]")
        self.keys = nn.Parameter(keys.detach().float().clone())
        self.values = nn.Parameter(values.detach().float().clone())
        self.num_frozen = num_frozen
        if num_frozen:
            for p in (self.keys, self.values):
                p.register_hook(self._freeze_sink)

    def _freeze_sink(self, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:, :, : self.num_frozen] = 0
        return grad

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[2]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        layers, heads, tokens, head_dim = self.keys.shape
        return layers, heads, tokens, head_dim


@dataclass(frozen=True)
class KVSection:
    """The `kv` section of memory.json."""

    tokens: int
    num_frozen_tokens: int
    shape: tuple[int, ...] | None = None

    @classmethod
    def from_dict(cls, d: dict, where: str) -> KVSection:

        tokens = require(d, "tokens", int, where)
        frozen = require(d, "num_frozen_tokens", int, where)
        if tokens < 1:
            raise ArtifactError(f"{where}: field 'tokens' must be >= 1, got {tokens}")
        if not 0 <= frozen <= tokens:
            raise ArtifactError(f"{where}: kv.num_frozen_tokens={frozen} outside [0, {tokens}]")
        shape = optional(d, "shape", list, where)
        if shape is not None and (len(shape) != 4 or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1
                                                            for x in shape) or shape[2] != tokens):
            raise ArtifactError(f"{where}: field 'shape' must be [layers, kv_heads, {tokens}, head_dim], got {shape!r}")
        return cls(tokens=tokens, num_frozen_tokens=frozen, shape=None if shape is None else tuple(shape))

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"tokens": self.tokens, "num_frozen_tokens": self.num_frozen_tokens}
        if self.shape is not None:
            d["shape"] = list(self.shape)
        return d


@dataclass
class KVState(PartState):
    """A stored KV memory."""

    kind: ClassVar[str] = "kv"
    FILES: ClassVar[tuple[str, ...]] = (KV_FILE,)
    """The files a memory's KV part consists of."""
    keys: torch.Tensor
    values: torch.Tensor
    num_frozen: int = 0

    @property
    def tokens(self) -> int:
        return int(self.keys.shape[2])

    @staticmethod
    def parse_section(d: dict, where: str) -> KVSection:
        return KVSection.from_dict(d, where)

    def save(self, folder: Path, base_source: str | None = None) -> KVSection:
        from safetensors.torch import save_file

        save_file({"keys": self.keys.detach().float().cpu().contiguous(),
                   "values": self.values.detach().float().cpu().contiguous()},
                  str(folder / KV_FILE), metadata={"format": "pt"})
        return KVSection(tokens=self.tokens, num_frozen_tokens=self.num_frozen, shape=tuple(self.keys.shape))

    @classmethod
    def load(cls, folder: Path, section: KVSection, where: str, geometry=None,
             against: str = "the base model") -> KVState:

        tokens = section.tokens
        path = folder / KV_FILE
        tensors = load_tensors(path, dtype=torch.float32)
        unknown = sorted(set(tensors) - {"keys", "values"})
        if unknown:
            raise ArtifactError(f"{path}: unexpected tensors {unknown} (a KV memory holds 'keys' and 'values')")
        for key in ("keys", "values"):
            if key not in tensors:
                raise ArtifactError(f"{path}: missing tensor {key!r}")
            t = tensors[key]
            if t.dim() != 4 or t.shape[2] != tokens:
                raise ArtifactError(f"{path}: tensor {key!r} has shape {list(t.shape)}, expected [layers, kv_heads, "
                                    f"{tokens}, head_dim] ({where}: kv.tokens = {tokens})")
        if tensors["keys"].shape != tensors["values"].shape:
            raise ArtifactError(f"{path}: 'keys' {list(tensors['keys'].shape)} and 'values' "
                                f"{list(tensors['values'].shape)} differ in shape")
        state = cls(tensors["keys"], tensors["values"], section.num_frozen_tokens)
        if geometry is not None:
            state.check_geometry(geometry, path, against)
        if section.shape is not None and list(section.shape) != list(tensors["keys"].shape):
            raise ArtifactError(f"{path}: tensors have shape {list(tensors['keys'].shape)}, but {where} records "
                                f"kv.shape {list(section.shape)}")
        return state

    @classmethod
    def section_from_files(cls, folder: Path, entry: dict, where: str) -> KVSection:
        return KVSection.from_dict({"tokens": entry.get("kv_tokens"), "num_frozen_tokens": entry.get("kv_frozen_tokens", 0)},
                                   where)

    @classmethod
    def check_run_shape(cls, section: KVSection, memory_cfg, where: str) -> None:
        if section.tokens != memory_cfg.kv_tokens:
            raise ArtifactError(f"{where}: kv.tokens is {section.tokens} but the run's training.memory.kv_tokens is "
                                f"{memory_cfg.kv_tokens}: every memory of a run has the run's shape")

    def describe(self) -> dict:
        return {"kv_tokens": self.tokens}

    @property
    def prefix_tokens(self) -> int:
        return self.tokens

    def check_geometry(self, geometry, where: Path, against: str = "the base model") -> None:
        want = [geometry.num_layers, geometry.num_kv_heads, self.tokens, geometry.head_dim]
        if list(self.keys.shape) != want:
            raise ArtifactError(
                f"{where}: KV tensors have shape {list(self.keys.shape)}, but {against} needs {want} "
                f"(num_layers {geometry.num_layers}, num_kv_heads {geometry.num_kv_heads}, tokens {self.tokens}, "
                f"head_dim {geometry.head_dim}): the memory was made for another base model"
                + ("" if against == "the base model" else ", or the manifest was edited"))

    def check(self, base: nn.Module, where: Path) -> None:

        self.check_geometry(inspect_model(base), where)


@torch.no_grad()
def capture_kv(model: nn.Module, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own cache for `token_ids` (1-D): keys and values, each [L, H, m, d], float32.

    Callers make sure gates and adapters are off (see `KoffModel.capture_kv`).
    """

    if token_ids.dim() != 1 or token_ids.numel() == 0:
        raise ValueError("capture_kv needs a non-empty 1-D tensor of token ids")
    device = next(model.parameters()).device
    out = model(input_ids=token_ids[None].to(device), use_cache=True)
    cache = output_cache(out)
    keys = torch.stack([layer.keys[0] for layer in cache.layers])
    values = torch.stack([layer.values[0] for layer in cache.layers])
    return keys.float(), values.float()


def build_prefix(memories: Sequence[KVMemory | None], dtype: torch.dtype | None = None) -> Prefix | None:
    """One KV prefix per batch row (None: no memory). Rows with a shorter (or no) memory are
    left-padded with masked zeros up to the longest memory M; None when no row has one."""
    batch = len(memories)
    lens = torch.tensor([0 if m is None else m.num_tokens for m in memories], dtype=torch.long)
    longest = int(lens.max()) if batch else 0
    if longest == 0:
        return None
    first = next(m for m in memories if m is not None)
    dtype = dtype or first.keys.dtype
    if all(m is first for m in memories):
        # one memory for the whole batch: expand (no copy, gradients flow to the single tensor)
        keys = [first.keys[i].to(dtype)[None].expand(batch, -1, -1, -1) for i in range(first.keys.shape[0])]
        values = [first.values[i].to(dtype)[None].expand(batch, -1, -1, -1) for i in range(first.keys.shape[0])]
        return Prefix(keys, values, torch.ones(batch, longest, dtype=torch.bool), lens)
    shape = first.shape
    for m in memories:
        if m is not None and (m.shape[0], m.shape[1], m.shape[3]) != (shape[0], shape[1], shape[3]):
            raise ValueError(f"KV memories of shapes {m.shape} and {shape} cannot share a batch")
    ks, vs = [], []
    for m in memories:
        pad = longest - (0 if m is None else m.num_tokens)
        zeros = first.keys.new_zeros(shape[0], shape[1], pad, shape[3])
        ks.append(zeros if m is None else torch.cat([zeros, m.keys], dim=2))
        vs.append(zeros if m is None else torch.cat([zeros, m.values], dim=2))
    k = torch.stack(ks, dim=1).to(dtype)  # [L, B, H, M, d]
    v = torch.stack(vs, dim=1).to(dtype)
    mask = torch.arange(longest)[None, :] >= (longest - lens)[:, None]
    return Prefix(list(k.unbind(0)), list(v.unbind(0)), mask, lens)


@register_part
class KVPart(MemoryPart[KVState]):
    """The KV memories of every memory of a KoffModel; a call's rows get them as a cache prefix."""

    kind: ClassVar[str] = "kv"
    state_class: ClassVar[type[PartState]] = KVState

    def __init__(self, base: nn.Module):
        super().__init__(base)
        # a ModuleDict (the memories' tensors are the part's), typed by what it holds
        self.memories = cast("MutableMapping[str, KVMemory]", nn.ModuleDict())

    def names(self) -> list[str]:
        return list(self.memories)

    @classmethod
    def enabled(cls, cfg) -> bool:
        return cfg.kv_tokens > 0

    @classmethod
    def tokens_needed(cls, cfg) -> int:
        return cfg.kv_tokens

    @classmethod
    def check_tokens(cls, tokens: torch.Tensor, cfg, name: str) -> None:

        if tokens.numel() < cfg.kv_tokens:
            raise DataError(f"memory.kv_tokens (--kv-tokens) = {cfg.kv_tokens}, but the training text of {name!r} "
                            f"holds only {tokens.numel()} tokens to initialise its KV memory from")

    def initial(self, km, tokens: torch.Tensor, cfg, name: str):
        """The base model's own cache (dense, no memory) of the memory's first `kv_tokens` tokens."""
        self.check_tokens(tokens, cfg, name)
        return km.capture_kv(tokens[: cfg.kv_tokens])

    def create(self, name: str, cfg, init) -> None:
        """`init`: the (keys, values) the base model caches for the domain's first tokens."""
        keys, values = init
        self.add(name, KVMemory(keys, values, num_frozen=cfg.kv_frozen_tokens))

    def add(self, name: str, kv: KVMemory) -> None:

        g = inspect_model(self._base)
        want = (g.num_layers, g.num_kv_heads, g.head_dim)
        if (kv.shape[0], kv.shape[1], kv.shape[3]) != want:
            raise ValueError(f"KV memory {name!r} has shape {kv.shape}, expected "
                             f"[{want[0]}, {want[1]}, m, {want[2]}] for this base model")
        self.memories[name] = kv.to(next(self._base.parameters()).device)

    def install(self, name: str, state: KVState) -> None:
        self.add(name, KVMemory(state.keys, state.values, state.num_frozen))

    def snapshot(self, name: str) -> KVState:
        kv = self.memories[name]
        return KVState(kv.keys.detach().cpu().contiguous(), kv.values.detach().cpu().contiguous(), kv.num_frozen)

    def remove(self, name: str) -> None:
        del self.memories[name]

    def parameters_of(self, name: str) -> list[nn.Parameter]:
        return list(self.memories[name].parameters()) if name in self.memories else []

    def lr(self, train_cfg) -> float:
        return train_cfg.lr_kv

    def prepare(self, call: Call) -> None:
        dtype = next(self._base.parameters()).dtype
        call.prefix = build_prefix([self.memories[n] if n is not None and n in self.memories else None for n in call.rows], dtype)


def prefix_cache(memories: Sequence[KVMemory | None], config) -> tuple[object | None, torch.Tensor, torch.Tensor]:
    """A transformers cache holding one KV prefix per row, for running plain transformers models
    (e.g. an exported backbone) with koff's KV memories: `(cache, prefix_mask [B, M],
    prefix_len [B])`, the cache None when no row has a memory."""
    from transformers import DynamicCache

    prefix = build_prefix(memories)
    if prefix is None:
        return None, torch.zeros(len(memories), 0, dtype=torch.bool), torch.zeros(len(memories), dtype=torch.long)
    return DynamicCache(list(zip(prefix.keys, prefix.values)), config=config), prefix.mask, prefix.lengths

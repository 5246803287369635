"""`KoffModel`: a frozen base model, its neuron gates (the backbone) and named memories.

One forward call takes a memory name (or one name per batch row, or None for the bare backbone).
The routing is built for that call only (`route` -> a `Call`) and made current through a context
variable while the base model runs, so the hooks of every memory part (LoRA deltas) and the KV
prefix see exactly that call's rows; no shared state is switched, the backbone is never reloaded
or copied, and concurrent calls cannot race.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from koff.core.compat.transformers import cache_kwarg, cache_layer_state, restore_cache_layer
from koff.core.errors import ConfigError
from koff.core.names import check_memory_name
from koff.model.base_model import decoder_layers, inspect_model
from koff.model.gates import NeuronGates
from koff.model.memory import PART_KINDS, Call, MemoryPart, Prefix, capture_kv, current_call, routed

MemorySpec = str | None | Sequence[str | None]


class KoffModel(nn.Module):
    """Base model + optional gates + memories (one container per registered memory-part kind)."""

    def __init__(self, base: nn.Module, gates: NeuronGates | None = None):
        super().__init__()
        base.requires_grad_(False)
        base.eval()
        self.model: Any = base  # a transformers model: its methods, not nn.Module's __getattr__ types
        self.geometry = inspect_model(base)
        self.gates = gates
        if gates is not None:
            gates.attach(self.model)
        # a ModuleDict (so the parts' tensors are the module's), typed by what it holds
        self.parts = cast("Mapping[str, MemoryPart]", nn.ModuleDict({kind: cls(base) for kind, cls in PART_KINDS.items()}))
        self.backbone_lora = None
        """The backbone's own LoRA adapter, shared by every memory (`koff.backbone_lora`), or None."""

    def set_backbone_lora(self, adapter) -> None:
        """Attach the backbone's shared LoRA adapter (a `koff.backbone_lora.BackboneLora`)."""
        if self.gates is None:
            raise ConfigError("a backbone LoRA adapter repairs a pruned backbone; this model has no gates")
        if self.backbone_lora is not None:
            raise ConfigError("the model has a backbone LoRA adapter already")
        self.backbone_lora = adapter

    # -- memories --------------------------------------------------------------------------------
    @property
    def memory_names(self) -> list[str]:
        """The names of every memory loaded, sorted."""
        return sorted({n for part in self.parts.values() for n in part.names()})

    def _new_name(self, name: str) -> None:
        check_memory_name(name)
        if name in self.memory_names:
            raise ConfigError(f"memory {name!r} already exists")

    def add_memory(self, name: str, **parts) -> None:
        """Add a memory from each part kind's own in-memory form, by kind: e.g.
        `add_memory("fr", lora=LoraSpec(8), kv=KVMemory(keys, values))` (a fresh LoRA, a ready KV)."""
        self._new_name(name)
        unknown = sorted(set(parts) - set(self.parts))
        if unknown:
            raise ConfigError(f"memory {name!r}: unknown part kinds {unknown}; known: {sorted(self.parts)}")
        for kind, value in parts.items():
            if value is not None:
                self.parts[kind].add(name, value)

    def create_memory(self, name: str, cfg, tokens: torch.Tensor | None = None) -> None:
        """A fresh memory with every part `cfg` (a MemoryConfig) enables, each started from the
        first tokens of the memory's training text where it needs them (KV: the base model's own
        cache of them)."""
        self._new_name(name)
        for part in self.parts.values():
            if part.enabled(cfg):
                part.create(name, cfg, part.initial(self, tokens if tokens is not None else torch.empty(0, dtype=torch.long),
                                                    cfg, name))

    def install_memory(self, name: str, states: dict) -> None:
        """Add a stored memory: part kind -> its state (validated against the base model)."""
        self._new_name(name)
        unknown = sorted(set(states) - set(self.parts))
        if unknown:
            raise ConfigError(f"memory {name!r}: unknown part kinds {unknown}; known: {sorted(self.parts)}")
        for kind, state in states.items():
            self.parts[kind].install(name, state)

    def snapshot_memory(self, name: str) -> dict:
        """part kind -> the stored state of memory `name` (detached CPU tensors)."""
        return {kind: part.snapshot(name) for kind, part in self.parts.items() if name in part.names()}

    def remove_memory(self, name: str) -> None:
        """Drop memory `name` from every part (KeyError, listing the loaded ones, if there is none)."""
        if name not in self.memory_names:
            raise KeyError(f"no memory named {name!r}; have {self.memory_names}")
        for part in self.parts.values():
            if name in part.names():
                part.remove(name)

    def memory_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of one memory (every part)."""
        return [p for part in self.parts.values() for p in part.parameters_of(name)]

    def param_groups(self, names: list[str], train_cfg) -> list[dict]:
        """Optimizer groups for these memories: one per part kind, at that kind's learning rate."""
        groups = []
        for kind, part in self.parts.items():
            params = [p for n in names for p in part.parameters_of(n)]
            if params:
                groups.append({"params": params, "lr": part.lr(train_cfg), "name": kind})
        return groups

    # -- routing ---------------------------------------------------------------------------------
    def row_names(self, memory: MemorySpec, batch: int) -> list[str | None]:
        """One memory name (or None) per batch row, validated."""
        names = [memory] * batch if memory is None or isinstance(memory, str) else list(memory)
        if len(names) != batch:
            raise ValueError(f"{len(names)} memory names for a batch of {batch}")
        have = self.memory_names
        for n in names:
            if n is not None and n not in have:
                raise KeyError(f"no memory named {n!r}; have {have}")
        return names

    def route(self, memory: MemorySpec, batch: int, use_gates: bool = True) -> Call:
        """The routing of one call over `batch` rows: each part precomputes what its hooks need."""
        call = Call(tuple(self.row_names(memory, batch)), use_gates=use_gates)
        for part in self.parts.values():
            part.prepare(call)
        if self.backbone_lora is not None:
            self.backbone_lora.prepare(call)
        return call

    def prefix_cache(self, prefix: Prefix | None):
        """A transformers cache holding `prefix` (an empty one for None), ready to extend."""
        from transformers import DynamicCache

        if prefix is None:
            return DynamicCache(config=self.model.config)
        return DynamicCache(list(zip(prefix.keys, prefix.values)), config=self.model.config)

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, memory: MemorySpec = None,
                attention_mask: torch.Tensor | None = None, use_gates: bool = True) -> torch.Tensor:
        """Logits [B, T, V] for `input_ids` [B, T] with the given memory per batch (a name), per
        row (a list of names/None), or none. `attention_mask` [B, T] marks real tokens (left
        padding allowed). `use_gates=False` runs the dense base model (with the memories)."""
        return self.run(input_ids, self.route(memory, input_ids.shape[0], use_gates), attention_mask)

    def run(self, input_ids: torch.Tensor, call: Call, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for one routed call (see `route`)."""
        device = input_ids.device
        prefix = call.prefix
        tokens_mask = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                       else attention_mask.bool())
        plen = prefix.lengths.to(device) if prefix is not None else torch.zeros(input_ids.shape[0], dtype=torch.long,
                                                                                  device=device)
        position_ids = plen[:, None] + (tokens_mask.long().cumsum(-1) - 1).clamp(min=0)
        kwargs: dict = {"position_ids": position_ids, "use_cache": prefix is not None}
        if prefix is not None:
            kwargs[cache_kwarg(self.model)] = self.prefix_cache(prefix)
            if attention_mask is not None or not bool(prefix.mask.all()):  # prefix.mask lives on the CPU
                kwargs["attention_mask"] = torch.cat([prefix.mask.to(device), tokens_mask], dim=1).long()
        elif attention_mask is not None:
            kwargs["attention_mask"] = tokens_mask.long()
        with routed(call):
            return self.model(input_ids=input_ids, **kwargs).logits

    def decode_step(self, input_ids: torch.Tensor, call: Call, cache, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor) -> torch.Tensor:
        """One incremental step of generation: logits of the last position, extending `cache`."""
        with routed(call):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask.long(), position_ids=position_ids,
                             use_cache=True, **{cache_kwarg(self.model): cache})
        return out.logits[:, -1]

    @torch.no_grad()
    def capture_kv(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of the dense base model (gates off, no memory) for `token_ids`."""
        with routed(Call((None,), use_gates=False)):
            return capture_kv(self.model, token_ids)

    # -- memory-saving backprop ------------------------------------------------------------------
    def enable_gradient_checkpointing(self) -> None:
        """Recompute each decoder layer in the backward pass instead of keeping its activations.

        transformers' own checkpointing drops the KV cache under training (its layers would append
        to it a second time when recomputed), which would drop koff's KV prefix. So koff wraps each
        layer itself (torch's non-reentrant checkpoint) and, for the recomputation, re-enters the
        call's routing and rewinds that layer's cache slot to what it held before the forward.
        """
        from transformers import Cache

        for i, layer in enumerate(decoder_layers(self.model)):
            if "forward" in layer.__dict__:
                continue  # wrapped already
            layer.forward = _checkpointed(layer.forward, i, Cache)

    def disable_gradient_checkpointing(self) -> None:
        """Undo `enable_gradient_checkpointing`: every decoder layer runs its own forward again."""
        for layer in decoder_layers(self.model):
            layer.__dict__.pop("forward", None)


def _checkpointed(forward, index: int, cache_type: type):
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        call = current_call()
        cache: Any = next((v for v in kwargs.values() if isinstance(v, cache_type)), None)  # a transformers Cache
        slot = cache.layers[index] if cache is not None and index < len(cache.layers) else None
        before = cache_layer_state(slot)

        @contextlib.contextmanager
        def replay():
            after = cache_layer_state(slot)
            restore_cache_layer(slot, before)
            with routed(call) if call is not None else contextlib.nullcontext():
                yield
            restore_cache_layer(slot, after)

        return checkpoint(forward, *args, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), replay()), **kwargs)

    return run


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over positions 1..T-1 of each row (the first token of a row is
    never scored, with or without a KV memory, so every method is scored on the same tokens)."""
    logits = logits[:, :-1].float()
    target = input_ids[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    nll = nll.view_as(target)
    if attention_mask is not None:
        valid = (attention_mask[:, 1:] & attention_mask[:, :-1]).bool() if attention_mask.dtype == torch.bool \
            else (attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool())
        nll = nll * valid
        count = valid.sum()
    else:
        count = torch.tensor(target.numel())
    if reduction == "sum":
        return nll.sum()
    if reduction == "none":
        return nll
    return nll.sum() / count.clamp(min=1)

"""A LoRA adapter on the backbone itself, shared by every memory (`train.backbone_lora_rank`).

Pruning removes capacity every domain needs; without this adapter each domain's memory has to
repair that damage on its own, with its own rank. The backbone adapter repairs it once, for all of
them: it is trained on every step (domain and general batches alike) and is active on every call
that runs the backbone, whatever memory the rows name. It is the LoRA "recovery" fine-tuning of
pruned models (LLM-Pruner, Ma et al. 2023) run jointly with the gates and the memories, instead
of after them.

It is not a memory: it never appears in `KoffModel.memory_names`, is not routed per row, and is
off when a call runs the dense base model (`use_gates=False`: KV capture, the dense teacher).
On disk it is a standard peft LoRA adapter in RUN/backbone/ (adapter_config.json +
adapter_model.safetensors); export folds it into the backbone's weights (W += s * B @ A) before
the pruned neurons are deleted, which is exact: the delta of a pruned neuron's row or column is
deleted with it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from koff.model.memory.lora import LoraPart, LoraSpec, LoraState
from koff.model.memory.parts import Call

NAME = "backbone"
"""The adapter's name inside its container (never a memory name)."""
FILES = ("backbone/adapter_config.json", "backbone/adapter_model.safetensors")
"""Where a run stores it."""


class BackboneLora(LoraPart):
    """One LoRA adapter applied to every row of every call that runs the pruned backbone.

    It reuses the LoRA part's tensors, initialisation (peft's) and hooks under a kind of its own,
    so its deltas and those of the rows' memories are added side by side.
    """

    kind: ClassVar[str] = "backbone_lora"

    @classmethod
    def fresh(cls, base: nn.Module, spec: LoraSpec) -> BackboneLora:
        """A new adapter (B = 0: it starts as a no-op); A is drawn from torch's global RNG."""
        part = cls(base)
        part.create(NAME, spec, {})
        return part

    @classmethod
    def stored(cls, base: nn.Module, state: LoraState) -> BackboneLora:
        """The adapter of a stored run (frozen)."""
        part = cls(base)
        part.install(NAME, state)
        part.requires_grad_(False)
        return part

    def prepare(self, call: Call) -> None:
        if not call.use_gates:
            return  # the dense base model: no backbone repair
        ad: Any = self.adapters[NAME]  # its lora_A / lora_B are ParameterLists, not what __getattr__ types
        call.state[self.kind] = {p: (ad.lora_A[i], ad.lora_B[i], ad.scaling) for i, p in enumerate(ad.paths)}

    def state(self) -> LoraState:
        return self.snapshot(NAME)


@torch.no_grad()
def fold_into(base: nn.Module, state: LoraState) -> None:
    """Add a stored backbone adapter's deltas to the base model's weights in place (W += s * B @ A,
    computed in float32, then cast to the weight's dtype)."""
    scaling = state.scaling
    for path, (a, b) in state.modules().items():
        linear: Any = base.get_submodule(path)
        w = linear.weight
        w.copy_((w.float() + scaling * (b.float() @ a.float()).to(w.device)).to(w.dtype))

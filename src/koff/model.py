"""`KoffModel`: a frozen base model, its neuron gates (the backbone) and named memories.

One forward call takes a memory name (or one name per batch row, or None for the bare backbone).
Switching memories only changes which peft adapter is active and which KV tensor is prefixed:
the backbone is never reloaded or copied.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import inspect_model
from .gates import NeuronGates
from .memory import KVMemory, capture_kv, prefix_cache

MemorySpec = str | None | Sequence[str | None]
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class KoffModel(nn.Module):
    """Base model + optional gates + memories (LoRA adapters in peft, KV memories here)."""

    def __init__(self, base: nn.Module, gates: NeuronGates | None = None):
        super().__init__()
        base.requires_grad_(False)
        base.eval()
        self.model = base
        self.geometry = inspect_model(base)
        self.gates = gates
        if gates is not None:
            gates.attach(self.model)
        self.kv = nn.ModuleDict()
        self.lora_names: list[str] = []
        self._active_lora: str | None = None
        self._lora_layers: list | None = None

    # -- memories --------------------------------------------------------------------------------
    @property
    def memory_names(self) -> list[str]:
        return sorted(set(self.lora_names) | set(self.kv.keys()))

    def add_memory(self, name: str, lora=None, kv: KVMemory | None = None) -> None:
        """Add a memory: `lora` is a peft LoraConfig (or None), `kv` a KVMemory (or None)."""
        if name in self.memory_names:
            raise ValueError(f"memory {name!r} already exists")
        if not _NAME.fullmatch(name) or name == "__base__" or name in "lora_":
            raise ValueError(f"invalid memory name {name!r}: use letters, digits, '_', '-' or '.', starting with a "
                             "letter or digit (and not a piece of 'lora_', which peft reserves)")
        if lora is not None:
            from peft import PeftModel, get_peft_model

            if isinstance(self.model, PeftModel):
                self.model.add_adapter(name, lora)
            else:
                with warnings.catch_warnings():  # peft probes a deprecated transformers attribute
                    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
                    self.model = get_peft_model(self.model, lora, adapter_name=name)
                self.model.eval()
                if self.gates is not None:  # re-hook onto the LoRA-wrapped down_proj
                    self.gates.attach(self.model)
            self.lora_names.append(name)
            self._active_lora = None
            self._lora_layers = None
            self.activate_lora(name)  # peft activates the first adapter; be explicit
        if kv is not None:
            g = self.geometry
            want = (g.num_layers, g.num_kv_heads, g.head_dim)
            if (kv.shape[0], kv.shape[1], kv.shape[3]) != want:
                raise ValueError(f"KV memory {name!r} has shape {kv.shape}, expected "
                                 f"[{want[0]}, {want[1]}, m, {want[2]}] for this base model")
            self.kv[name] = kv

    def memory_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of one memory (LoRA A/B and KV keys/values)."""
        return self.lora_parameters(name) + (list(self.kv[name].parameters()) if name in self.kv else [])

    def lora_parameters(self, name: str) -> list[nn.Parameter]:
        """The LoRA A/B weights of one memory (empty if it has no LoRA)."""
        if name not in self.lora_names:
            return []
        from peft.tuners.lora import LoraLayer

        params = []
        for module in self.model.modules():
            if isinstance(module, LoraLayer) and name in module.lora_A:
                params += list(module.lora_A[name].parameters()) + list(module.lora_B[name].parameters())
        return params

    def activate_lora(self, name: str) -> None:
        """Make `name` the active LoRA adapter of every LoRA layer.

        peft's `set_adapter` walks every module and re-freezes parameters (tens of ms on a small
        model); a switch here only retargets the cached LoRA layers, so swapping memories per
        request costs microseconds. Every adapter stays trainable: only the active one ever
        receives gradients.
        """
        if name == self._active_lora:
            return
        if self._lora_layers is None:
            from peft.tuners.lora import LoraLayer

            self.model.set_adapter(name)  # peft's own bookkeeping, once after adapters change
            self._lora_layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
            for layer in self._lora_layers:
                for n in self.lora_names:
                    layer.lora_A[n].requires_grad_(True)
                    layer.lora_B[n].requires_grad_(True)
        for layer in self._lora_layers:
            layer._active_adapter = [name]  # what peft's per-layer set_adapter sets, minus the re-freezing
        self.model.base_model.active_adapter = name
        self._active_lora = name

    def base_model(self) -> nn.Module:
        """The transformers model underneath peft (same weights, LoRA layers included)."""
        from peft import PeftModel

        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model

    # -- forward ---------------------------------------------------------------------------------
    def row_names(self, memory: MemorySpec, batch: int) -> list[str | None]:
        """One memory name (or None) per batch row, validated."""
        names = [memory] * batch if memory is None or isinstance(memory, str) else list(memory)
        if len(names) != batch:
            raise ValueError(f"{len(names)} memory names for a batch of {batch}")
        for n in names:
            if n is not None and n not in self.memory_names:
                raise KeyError(f"no memory named {n!r}; have {self.memory_names}")
        return names

    def prefix(self, names: list[str | None]):
        """The KV prefix for these rows: `(cache, prefix_mask [B, M], prefix_len [B])`."""
        kvs = [self.kv[n] if n is not None and n in self.kv else None for n in names]
        return prefix_cache(kvs, self.model.config)

    def run(self, input_ids: torch.Tensor, names: list[str | None], **kwargs):
        """Call the underlying model with each row's LoRA adapter active (the model output)."""
        with self.lora_for(names):
            return self.model(input_ids=input_ids, **kwargs)

    def forward(self, input_ids: torch.Tensor, memory: MemorySpec = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] for `input_ids` [B, T] with the given memory per batch (a name), per
        row (a list of names/None), or none. `attention_mask` [B, T] marks real tokens (left
        padding allowed)."""
        names = self.row_names(memory, input_ids.shape[0])
        cache, prefix_mask, prefix_len = self.prefix(names)
        prefix_mask = prefix_mask.to(input_ids.device)
        prefix_len = prefix_len.to(input_ids.device)
        tokens_mask = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                       else attention_mask.bool())
        position_ids = prefix_len[:, None] + (tokens_mask.long().cumsum(-1) - 1).clamp(min=0)
        kwargs: dict = {"position_ids": position_ids, "use_cache": cache is not None}
        if cache is not None:
            kwargs["past_key_values"] = cache
        if cache is not None and (attention_mask is not None or not bool(prefix_mask.all())):
            kwargs["attention_mask"] = torch.cat([prefix_mask, tokens_mask], dim=1).long()
        elif cache is None and attention_mask is not None:
            kwargs["attention_mask"] = tokens_mask.long()
        return self.run(input_ids, names, **kwargs).logits

    @contextlib.contextmanager
    def lora_for(self, names: list[str | None]):
        """Within this context every forward routes row i through the LoRA adapter names[i].

        One name for all rows activates that adapter (or none); mixed names are served by
        koff's own hooks: each LoRA layer adds B[i] @ A[i] @ x with the rows' adapter weights
        gathered from stacks built once per context, two batched matmuls per layer whatever the
        number of distinct memories (peft's mixed-adapter path loops over adapters).
        """
        if not self.lora_names:
            yield
            return
        unique = set(names)
        if len(unique) == 1 and names[0] in self.lora_names:
            self.activate_lora(names[0])
            yield
            return
        previous = self._active_lora
        self.activate_lora(self.lora_names[0])  # make sure the layer cache exists
        layers = self._lora_layers
        for layer in layers:
            layer._active_adapter = []  # base weights only; deltas come from the hooks below
        self._active_lora = "__none__"
        handles = []
        try:
            if unique - {None}:
                index = torch.tensor([self.lora_names.index(n) if n in self.lora_names else len(self.lora_names)
                                      for n in names])
                for layer in layers:
                    handles.append(layer.register_forward_hook(self._mixed_hook(layer, index)))
            yield
        finally:
            for h in handles:
                h.remove()
            self._active_lora = None
            self.activate_lora(previous if previous not in (None, "__none__") else self.lora_names[0])

    def _mixed_hook(self, layer, index: torch.Tensor):
        rank = max(layer.lora_A[n].weight.shape[0] for n in self.lora_names if n in layer.lora_A)
        a_rows, b_cols = [], []
        for n in self.lora_names:
            if n not in layer.lora_A:
                a_rows.append(None)
                b_cols.append(None)
                continue
            a = layer.lora_A[n].weight  # [r, in]
            b = layer.lora_B[n].weight * layer.scaling[n]  # [out, r], scaling folded in
            pad = rank - a.shape[0]
            a_rows.append(torch.cat([a, a.new_zeros(pad, a.shape[1])]) if pad else a)
            b_cols.append(torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1) if pad else b)
        ref_a = next(a for a in a_rows if a is not None)
        ref_b = next(b for b in b_cols if b is not None)
        a_stack = torch.stack([a if a is not None else torch.zeros_like(ref_a) for a in a_rows] + [torch.zeros_like(ref_a)])
        b_stack = torch.stack([b if b is not None else torch.zeros_like(ref_b) for b in b_cols] + [torch.zeros_like(ref_b)])
        a_rows_idx = a_stack[index.to(a_stack.device)]  # [B, r, in]
        b_rows_idx = b_stack[index.to(b_stack.device)]  # [B, out, r]

        def add_delta(module, args, output):
            x = args[0].to(a_rows_idx.dtype)
            delta = torch.bmm(torch.bmm(x, a_rows_idx.transpose(1, 2)), b_rows_idx.transpose(1, 2))
            return output + delta.to(output.dtype)

        return add_delta

    @torch.no_grad()
    def capture_kv(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of the dense base model (gates off, adapters off) for `token_ids`."""
        mode = self.gates.mode if self.gates is not None else None
        if self.gates is not None:
            self.gates.mode = "off"
        try:
            with self.lora_for([None]):
                return capture_kv(self.model, token_ids)
        finally:
            if self.gates is not None:
                self.gates.mode = mode


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

"""Hard-concrete L0 gates over FFN neurons (Louizos et al. 2017), one gate per neuron per layer.

Neuron j of layer l owns row j of `gate_proj` and `up_proj` and column j of `down_proj`; its gate
multiplies the j-th input of `down_proj`, so z = 0 is exactly deleting the neuron. The gates are
applied by forward pre-hooks: no model code is copied or edited.

Modes:
  "off"     gates are not applied (the dense model);
  "sample"  a fresh stochastic z per training step (call `resample()` before each forward);
  "mask"    a fixed 0/1 mask (the deterministic backbone used for evaluation and consolidation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from koff.model.base_model import ffn_params_per_neuron, gated_mlps, inspect_model, parameter_counts
from koff.model.memory.parts import current_call

BETA = 2.0 / 3.0
LEFT = -0.1
RIGHT = 1.1
LOG_ALPHA_RANGE = (math.log(1e-2), math.log(1e2))
_KEEP_SHIFT = BETA * math.log(-LEFT / RIGHT)  # log_alpha offset inside P(z != 0)


def _gates_on() -> bool:
    """False inside a call routed with `use_gates=False` (the dense model, e.g. to capture a KV
    memory or score the dense baseline), which leaves the gates' own mode untouched."""
    call = current_call()
    return call is None or call.use_gates


def keep_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z != 0) = sigmoid(log_alpha - beta * log(-l / r))."""
    return torch.sigmoid(log_alpha - _KEEP_SHIFT)


def sample_hard_concrete(log_alpha: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One reparameterised sample z in [0, 1] per gate (differentiable in log_alpha).

    The uniform noise is drawn on the generator's device (koff's is on the CPU) and moved, so the
    same seed gives the same gates on every device and every process of a launch."""
    return hard_concrete(log_alpha, uniform_noise(log_alpha, generator))


def uniform_noise(log_alpha: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The uniform draw behind one hard-concrete sample (on the generator's device, then moved)."""
    device = generator.device if generator is not None else log_alpha.device
    u = torch.rand(log_alpha.shape, generator=generator, device=device, dtype=log_alpha.dtype).to(log_alpha.device)
    return u.clamp(1e-6, 1 - 1e-6)


def hard_concrete(log_alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The stretched, clamped hard-concrete sample for uniform noise `u`."""
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (RIGHT - LEFT) + LEFT).clamp(0.0, 1.0)


def topk_keep_mask(scores: Sequence[torch.Tensor], sparsity: float, scope: str = "global") -> list[torch.Tensor]:
    """Boolean keep-masks removing the lowest-scoring neurons.

    scope "global" ranks all neurons of all layers together and removes exactly
    `round(sparsity * total)` of them; "layer" removes `round(sparsity * width)` in every layer.
    Every FFN neuron of a model owns the same number of parameters, so a neuron count is also a
    parameter share.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope == "layer":
        masks = []
        for s in scores:
            k = round(sparsity * s.numel())
            keep = torch.ones(s.numel(), dtype=torch.bool)
            if k:
                keep[torch.argsort(s.detach().float().cpu(), stable=True)[:k]] = False
            masks.append(keep)
        return masks
    if scope != "global":
        raise ValueError(f"mask scope must be 'global' or 'layer', got {scope!r}")
    flat = torch.cat([s.detach().float().cpu().reshape(-1) for s in scores])
    k = round(sparsity * flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if k:
        keep[torch.argsort(flat, stable=True)[:k]] = False
    return list(torch.split(keep, [s.numel() for s in scores]))


class NeuronGates(nn.Module):
    """log_alpha per FFN neuron per layer, plus the hooks that apply the gates to a model."""

    def __init__(self, widths: Sequence[int], params_per_neuron: Sequence[int], init: float | Sequence[torch.Tensor] = 3.0,
                 log_alpha_range: tuple[float, float] = LOG_ALPHA_RANGE):
        super().__init__()
        if isinstance(init, (int, float)):
            tensors = [torch.full((w,), float(init)) for w in widths]
        else:
            tensors = [t.detach().float().clone() for t in init]
            if [t.numel() for t in tensors] != list(widths):
                raise ValueError("log_alpha init does not match the layer widths")
        self.log_alpha = nn.ParameterList([nn.Parameter(t) for t in tensors])
        self.register_buffer("params_per_neuron", torch.tensor(list(params_per_neuron), dtype=torch.float64),
                             persistent=False)
        self.log_alpha_range = log_alpha_range
        self.mode = "sample"
        self._z: list[torch.Tensor | None] = [None] * len(tensors)
        self._u: list[torch.Tensor | None] = [None] * len(tensors)
        self._mask: list[torch.Tensor] | None = None
        self.bias: list[torch.Tensor] | None = None
        self._handles: list = []
        self.clamp_()

    @classmethod
    def for_model(cls, model: nn.Module, init: float | Sequence[torch.Tensor] = 3.0, **kw) -> NeuronGates:
        """Gates sized for every gated MLP of `model`."""

        return cls(inspect_model(model).intermediate_sizes, ffn_params_per_neuron(model), init=init, **kw)

    @property
    def widths(self) -> list[int]:
        return [p.numel() for p in self.log_alpha]

    # -- attaching -------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> NeuronGates:
        """Register a pre-hook on each layer's `down_proj` (so a LoRA on `down_proj`, whose hook
        reads the same input, sees the gated input too) and the FLAP-bias hook after it."""
        self.detach()
        for i, mlp in enumerate(gated_mlps(model)):
            self._handles.append(mlp.down_proj.register_forward_pre_hook(self._hook(i)))
            self._handles.append(mlp.down_proj.register_forward_hook(self._bias_hook(i)))
        return self

    def _bias_hook(self, layer: int):
        def add(module, args, output):
            if self.mode != "mask" or self.bias is None or not _gates_on():
                return None
            return output + self.bias[layer].to(device=output.device, dtype=output.dtype)

        return add

    def set_bias(self, bias: Sequence[torch.Tensor] | None) -> None:
        """Per-layer vectors added to down_proj's output whenever the fixed mask is applied: the
        mean contribution of the pruned neurons (FLAP's bias compensation). None removes them."""
        dev = self.log_alpha[0].device
        self.bias = None if bias is None else [b.detach().float().to(dev) for b in bias]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, layer: int):
        def apply(module, args):
            if self.mode == "off" or not _gates_on():
                return None
            if self.mode == "mask":
                if self._mask is None:
                    raise RuntimeError("gates are in 'mask' mode but set_mask() was not called")
                z = self._mask[layer]
            else:
                sampled = self._z[layer]
                if sampled is None:
                    raise RuntimeError("gates are in 'sample' mode but resample() was not called")
                z = sampled
            x = args[0]
            return (x * z.to(device=x.device, dtype=x.dtype),) + tuple(args[1:])

        return apply

    # -- the three modes -------------------------------------------------------------------------
    def resample(self, generator: torch.Generator | None = None) -> None:
        """Draw a fresh z for every gate (training); switches to "sample" mode."""
        self.mode = "sample"
        noise = [uniform_noise(la, generator) for la in self.log_alpha]
        self._u = list(noise)
        self._z = [hard_concrete(la, u) for la, u in zip(self.log_alpha, noise)]

    def refresh(self) -> None:
        """The same z as the last `resample`, recomputed from its noise with a fresh autograd
        graph: each micro-batch of an accumulated step backpropagates through its own copy."""
        noise = [u for u in self._u if u is not None]
        if len(noise) != len(self._u):
            raise RuntimeError("NeuronGates.refresh() needs the noise of a resample() first")
        self._z = [hard_concrete(la, u) for la, u in zip(self.log_alpha, noise)]

    def set_mask(self, keep: Sequence[torch.Tensor]) -> None:
        """Use a fixed keep-mask (True = keep); switches to "mask" mode."""
        if [k.numel() for k in keep] != self.widths:
            raise ValueError("mask shape does not match the gates")
        dev = self.log_alpha[0].device
        self._mask = [k.to(device=dev, dtype=torch.float32) for k in keep]
        self.mode = "mask"

    @property
    def mask(self) -> list[torch.Tensor] | None:
        return None if self._mask is None else [m.bool() for m in self._mask]

    # -- statistics ------------------------------------------------------------------------------
    def expected_sparsity(self, shift: float = 0.0) -> torch.Tensor:
        """Expected fraction of prunable parameters removed (differentiable)."""
        kept = torch.zeros((), dtype=torch.float64, device=self.log_alpha[0].device)
        total = 0.0
        per_neuron = cast(torch.Tensor, self.params_per_neuron)  # a buffer: nn.Module's __getattr__ types it Tensor | Module
        for la, n in zip(self.log_alpha, per_neuron.tolist()):
            p = keep_probability((la + shift).clamp(*self.log_alpha_range)) if shift else keep_probability(la)
            kept = kept + p.sum().double() * n
            total += la.numel() * n
        return (1.0 - kept / total).float()

    def final_mask(self, sparsity: float, scope: str = "global") -> list[torch.Tensor]:
        """Deterministic mask keeping the highest keep-probability neurons, removing exactly the
        target fraction."""
        return topk_keep_mask([la.detach() for la in self.log_alpha], sparsity, scope=scope)

    @torch.no_grad()
    def clamp_(self) -> None:
        lo, hi = self.log_alpha_range
        for la in self.log_alpha:
            la.clamp_(lo, hi)

    @torch.no_grad()
    def shift_(self, delta: float) -> None:
        for la in self.log_alpha:
            la.add_(delta)
        self.clamp_()


def sparsity_report(model: nn.Module, keep: Sequence[torch.Tensor] | None, target: float | None = None) -> dict:
    """How much of the base model a keep-mask removes.

    `ffn` is the fraction of prunable (FFN) parameters removed, the quantity s* targets;
    `global` is removed / all parameters; `global_without_embeddings` leaves the input embedding
    (and an untied output head) out of the denominator.
    """

    counts = parameter_counts(model)
    per_neuron = ffn_params_per_neuron(model)
    removed_neurons = [int((~k.bool()).sum()) for k in keep] if keep else [0] * len(per_neuron)
    removed = sum(r * n for r, n in zip(removed_neurons, per_neuron))
    non_emb = counts["total"] - counts["embeddings"]
    return {
        "target": target,
        "ffn": removed / counts["ffn"],
        "global": removed / counts["total"],
        "global_without_embeddings": removed / non_emb,
        "removed_neurons": sum(removed_neurons),
        "removed_neurons_per_layer": removed_neurons,
        "removed_parameters": removed,
        "total_parameters": counts["total"],
        "ffn_parameters": counts["ffn"],
        "embedding_parameters": counts["embeddings"],
    }

"""Driving the gates' expected sparsity to the target s*: the controller interface and registry.

The paper's objective (CoFi / Sheared-LLaMA) is the Lagrangian
    L = L_LM + lambda1 * (s_hat - t) + lambda2 * (s_hat - t)^2,
minimised by the gates and memories and maximised by lambda1, lambda2. koff registers three
controllers by name:

  "lagrangian"  the paper's objective, multipliers trained by gradient ascent at their own lr
                (`train.lr_lambda`, Sheared-LLaMA's 1.0);
  "augmented"   the same plus a fixed quadratic penalty rho * (s_hat - t)^2 (damps the swing);
  "projection"  no multiplier: after every optimizer step all log_alpha are shifted by one
                constant, found by bisection, so that s_hat equals the target exactly. The shift
                plays the multiplier's role and is logged as such.

A controller is looked up in `CONTROLLERS` by name (the CLI's choices and config validation read
the same registry) and offers
  penalty(s_hat, t)       added to the loss on every step that learns gates,
  after_step(gates, t)    after the optimizer step (its own multiplier update, a projection, the clamp),
  log()                   the fields logged per step in metrics.jsonl,
  state_dict() / load_state_dict()   everything a resumed run needs (tensors and numbers),
  to_device(device)       its tensors on the training device (returns the controller).
A new controller is a class registered with `@register_controller("name")` whose constructor takes
the TrainConfig.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from koff.core.errors import ConfigError
from koff.model.gates import NeuronGates


class Controller(Protocol):
    def penalty(self, s_hat: torch.Tensor, target: float) -> torch.Tensor: ...

    def after_step(self, gates: NeuronGates, target: float) -> None: ...

    def log(self) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def to_device(self, device: torch.device | str) -> Controller: ...


CONTROLLERS: dict[str, Callable[..., Controller]] = {}
"""name -> constructor taking the TrainConfig."""


def register_controller(name: str):
    """Class decorator: make a controller available as `train.controller: NAME`."""
    def add(cls):
        if name in CONTROLLERS:
            raise ValueError(f"sparsity controller {name!r} is registered twice")
        CONTROLLERS[name] = cls
        return cls

    return add


def make_controller(name: str, train_cfg) -> Controller:
    """Build the controller `name` for a TrainConfig."""

    if name not in CONTROLLERS:
        raise ConfigError(f"train.controller: unknown sparsity controller {name!r}; expected one of {sorted(CONTROLLERS)}")
    return CONTROLLERS[name](train_cfg)


def target_at(step: int, total_steps: int, target: float, warmup_frac: float, schedule: str = "linear",
              peak: float | None = None, regrow_frac: float = 0.0) -> float:
    """Target sparsity at `step`.

    "linear": a linear warm-up from 0 to `target` over the first `warmup_frac` of training, then
    constant. "overshoot": a linear warm-up to `peak` (> target) over the same steps, a linear way
    back down to `target` over the next `regrow_frac` of training, then constant: the gates prune
    past s* and neurons the memories turn out to need can grow back before the mask is fixed.
    """
    warm = round(warmup_frac * total_steps)
    top = peak if schedule == "overshoot" and peak is not None else target
    if warm > 0 and step < warm:
        return top * (step + 1) / warm
    if top == target:
        return target
    back = round(regrow_frac * total_steps)
    if back <= 0 or step >= warm + back:
        return target
    return top + (target - top) * (step - warm + 1) / back


@register_controller("lagrangian")
class Lagrangian:
    """lambda1 * (s - t) + lambda2 * (s - t)^2 (+ rho * (s - t)^2 when augmented).

    The multipliers are ordinary parameters with their own Adam that *maximises*
    (`maximize=True`), which is how the saddle point is sought; it steps after the main optimizer.
    Not an nn.Module: its `state_dict` holds the optimizer too, which nn.Module's must not.
    """

    def __init__(self, train_cfg=None):
        self.lambda1 = nn.Parameter(torch.zeros(()))
        self.lambda2 = nn.Parameter(torch.zeros(()))
        self.rho = self.quadratic(train_cfg)
        self.optimizer = torch.optim.Adam([self.lambda1, self.lambda2], lr=train_cfg.lr_lambda if train_cfg is not None else 1.0,
                                          maximize=True)

    @staticmethod
    def quadratic(train_cfg) -> float:
        """The fixed coefficient rho of (s - t)^2: none in the plain Lagrangian."""
        return 0.0

    def penalty(self, s_hat: torch.Tensor, target: float) -> torch.Tensor:
        gap = s_hat - target
        out = self.lambda1 * gap + self.lambda2 * gap * gap
        if self.rho:
            out = out + self.rho * gap * gap
        return out

    def after_step(self, gates: NeuronGates, target: float) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        gates.clamp_()

    def log(self) -> dict[str, float]:
        return {"lambda1": self.lambda1.item(), "lambda2": self.lambda2.item()}

    def state_dict(self) -> dict:
        return {"lambda1": self.lambda1.detach().clone(), "lambda2": self.lambda2.detach().clone(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.lambda1.copy_(state["lambda1"].reshape(()))
            self.lambda2.copy_(state["lambda2"].reshape(()))
        self.optimizer.load_state_dict(state["optimizer"])

    def to_device(self, device: torch.device | str) -> Lagrangian:
        with torch.no_grad():  # in place, as nn.Module.to does: the optimizer keeps its parameters
            for p in (self.lambda1, self.lambda2):
                p.data = p.data.to(device)
        return self


@register_controller("augmented")
class AugmentedLagrangian(Lagrangian):
    """The Lagrangian plus a fixed quadratic term rho * (s - t)^2 (`train.rho`)."""

    @staticmethod
    def quadratic(train_cfg) -> float:
        return train_cfg.rho if train_cfg is not None else 1e4


@register_controller("projection")
@dataclass
class Projection:
    """Shift every log_alpha by one constant so that expected sparsity equals the target."""

    train_cfg: object = None
    tolerance: float = 1e-5
    last_shift: float = 0.0
    total_shift: float = 0.0

    def penalty(self, s_hat: torch.Tensor, target: float) -> torch.Tensor:
        return s_hat.new_zeros(())

    @torch.no_grad()
    def after_step(self, gates: NeuronGates, target: float) -> None:
        gates.clamp_()
        shift = solve_shift(gates, target, self.tolerance)
        if shift:
            gates.shift_(shift)
        self.last_shift = shift
        self.total_shift += shift

    def log(self) -> dict[str, float]:
        return {"shift": self.last_shift, "total_shift": self.total_shift}

    def state_dict(self) -> dict:
        return {"last_shift": self.last_shift, "total_shift": self.total_shift}

    def load_state_dict(self, state: dict) -> None:
        self.last_shift, self.total_shift = float(state["last_shift"]), float(state["total_shift"])

    def to_device(self, device: torch.device | str) -> Projection:
        return self


@torch.no_grad()
def solve_shift(gates: NeuronGates, target: float, tolerance: float = 1e-5, iters: int = 60) -> float:
    """The constant c with expected_sparsity(log_alpha + c) == target (bisection; s_hat is
    monotone non-increasing in c). Returns 0 when the target is already met."""
    if abs(float(gates.expected_sparsity()) - target) <= tolerance:
        return 0.0
    lo, hi = -40.0, 40.0  # wider than any clamp range: covers every reachable sparsity
    for _ in range(iters):
        mid = (lo + hi) / 2
        s = float(gates.expected_sparsity(shift=mid))
        if abs(s - target) <= tolerance:
            return mid
        if s > target:  # too sparse: shift up
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2

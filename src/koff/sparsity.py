"""Driving the gates' expected sparsity to the target s*.

The paper's objective (CoFi / Sheared-LLaMA) is the Lagrangian
    L = L_LM + lambda1 * (s_hat - t) + lambda2 * (s_hat - t)^2,
minimised by the gates and memories and maximised by lambda1, lambda2. At CPU step counts its
multipliers need hundreds of steps to wind up and then overshoot (DESIGN.md §12), so koff offers:

  "lagrangian"  the paper's objective, multipliers trained by gradient ascent at their own lr;
  "augmented"   the same plus a fixed quadratic penalty rho * (s_hat - t)^2 (damps the swing);
  "projection"  no multiplier: after every optimizer step all log_alpha are shifted by one
                constant, found by bisection, so that s_hat equals the target exactly. The shift
                plays the multiplier's role and is logged as such. Default: it lands on target
                at every step.

Every controller exposes `penalty(s_hat, t)` (added to the loss) and `after_step(gates, t)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .gates import NeuronGates

CONTROLLERS = ("projection", "lagrangian", "augmented")


def target_at(step: int, total_steps: int, target: float, warmup_frac: float) -> float:
    """Target sparsity at `step`: linear warm-up from 0 to `target` over the first
    `warmup_frac` of training, then constant."""
    warm = round(warmup_frac * total_steps)
    if warm <= 0 or step >= warm:
        return target
    return target * (step + 1) / warm


class Lagrangian(nn.Module):
    """lambda1 * (s - t) + lambda2 * (s - t)^2 (+ rho * (s - t)^2 when augmented).

    The multipliers are ordinary parameters; their optimizer must *maximise* (torch optimizers'
    `maximize=True`), which is how the saddle point is sought.
    """

    def __init__(self, rho: float = 0.0):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.zeros(()))
        self.lambda2 = nn.Parameter(torch.zeros(()))
        self.rho = rho

    def penalty(self, s_hat: torch.Tensor, target: float) -> torch.Tensor:
        gap = s_hat - target
        out = self.lambda1 * gap + self.lambda2 * gap * gap
        if self.rho:
            out = out + self.rho * gap * gap
        return out

    def after_step(self, gates: NeuronGates, target: float) -> None:
        gates.clamp_()

    def state(self) -> dict[str, float]:
        return {"lambda1": self.lambda1.item(), "lambda2": self.lambda2.item()}


@dataclass
class Projection:
    """Shift every log_alpha by one constant so that expected sparsity equals the target."""

    tolerance: float = 1e-5
    last_shift: float = 0.0
    total_shift: float = 0.0

    def parameters(self) -> list:
        return []

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

    def state(self) -> dict[str, float]:
        return {"shift": self.last_shift, "total_shift": self.total_shift}


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


def make_controller(kind: str, rho: float = 1e4):
    """Build a sparsity controller by name (see module docstring)."""
    if kind == "projection":
        return Projection()
    if kind == "lagrangian":
        return Lagrangian()
    if kind == "augmented":
        return Lagrangian(rho=rho)
    raise ValueError(f"unknown sparsity controller {kind!r}; expected one of {CONTROLLERS}")

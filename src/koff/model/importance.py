"""Neuron importance scores from weights and calibration activations.

Used to start the gates from an activation-aware score (docs/design.md §4: 1.3-2x better than equal
starts) and by the one-shot pruning baselines:

  magnitude   L1 norm of the neuron's weights (gate row + up row + down column);
  wanda-sp    ||X_j||_2 * ||W_down[:, j]||_1, with X_j the neuron's input to down_proj
              (Wanda for structured pruning, as in FLAP's comparison);
  flap        Var(X_j) * ||W_down[:, j]||_2^2 (FLAP's fluctuation metric); pruned neurons'
              mean contribution W_down[:, j] * E[X_j] can be put back as a bias.

Statistics are streamed (sums over tokens), never stored per token.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from koff.model.base_model import gated_mlps, plain_linear

SCORES = ("magnitude", "wanda-sp", "flap")


@dataclass
class ActivationStats:
    """Per layer, over all calibration tokens: count, sum and sum of squares of each
    down_proj input (float64)."""

    count: int
    sum: list[torch.Tensor]
    sumsq: list[torch.Tensor]

    @property
    def l2(self) -> list[torch.Tensor]:
        return [s.sqrt() for s in self.sumsq]

    @property
    def mean(self) -> list[torch.Tensor]:
        return [s / self.count for s in self.sum]

    @property
    def variance(self) -> list[torch.Tensor]:
        n = self.count
        return [(q - s * s / n) / max(n - 1, 1) for s, q in zip(self.sum, self.sumsq)]


@torch.no_grad()
def activation_stats(model: nn.Module, batches: Iterable[torch.Tensor], forward=None) -> ActivationStats:
    """Stream calibration batches [B, T] through `model` and accumulate down_proj input statistics.

    `forward(batch)` runs the model (default: `model(input_ids=batch)`), so callers can choose
    which memory or gate mode is active.
    """
    mlps = gated_mlps(model)
    sums = [torch.zeros(plain_linear(m.down_proj).in_features, dtype=torch.float64) for m in mlps]
    sumsq = [torch.zeros_like(s) for s in sums]
    count = [0]

    def hook(i):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[i] += x.sum(0).cpu()
            sumsq[i] += (x * x).sum(0).cpu()
            if i == 0:
                count[0] += x.shape[0]
            return None  # a pre-hook that returns a value would replace the input

        return record

    handles = [m.down_proj.register_forward_pre_hook(hook(i)) for i, m in enumerate(mlps)]
    try:
        for batch in batches:
            if forward is None:
                model(input_ids=batch.to(next(model.parameters()).device))
            else:
                forward(batch)
    finally:
        for h in handles:
            h.remove()
    if count[0] == 0:
        raise ValueError("no calibration tokens")
    return ActivationStats(count=count[0], sum=sums, sumsq=sumsq)


def magnitude_scores(model: nn.Module) -> list[torch.Tensor]:
    """L1 norm of each neuron's weights (gate row + up row + down column)."""
    out = []
    for m in gated_mlps(model):
        g, u, d = (plain_linear(m.gate_proj).weight, plain_linear(m.up_proj).weight, plain_linear(m.down_proj).weight)
        out.append((g.abs().sum(1) + u.abs().sum(1) + d.abs().sum(0)).double().cpu())
    return out


def wanda_sp_scores(model: nn.Module, stats: ActivationStats) -> list[torch.Tensor]:
    """||X_j||_2 * ||W_down[:, j]||_1."""
    return [x * plain_linear(m.down_proj).weight.abs().sum(0).double().cpu() for x, m in zip(stats.l2, gated_mlps(model))]


def flap_scores(model: nn.Module, stats: ActivationStats) -> list[torch.Tensor]:
    """Var(X_j) * ||W_down[:, j]||_2^2 (FLAP's fluctuation metric)."""
    return [v * plain_linear(m.down_proj).weight.double().pow(2).sum(0).cpu()
            for v, m in zip(stats.variance, gated_mlps(model))]


def neuron_scores(kind: str, model: nn.Module, stats: ActivationStats | None = None) -> list[torch.Tensor]:
    """Scores by name (see module docstring); activation-aware kinds need `stats`."""
    if kind == "magnitude":
        return magnitude_scores(model)
    if kind not in SCORES:
        raise ValueError(f"unknown score {kind!r}; expected one of {SCORES}")
    if stats is None:
        raise ValueError(f"score {kind!r} needs calibration statistics")
    return wanda_sp_scores(model, stats) if kind == "wanda-sp" else flap_scores(model, stats)


def log_alpha_from_scores(scores: list[torch.Tensor], center: float = 3.0, scale: float = 2.0) -> list[torch.Tensor]:
    """Gate initialisation: center + scale * (per-layer z-score of log score)."""
    out = []
    for s in scores:
        ls = torch.log(s.double().clamp(min=1e-30))
        z = (ls - ls.mean()) / ls.std().clamp(min=1e-12)
        out.append((center + scale * z).float())
    return out


def flap_compensation(model: nn.Module, stats: ActivationStats, keep: list[torch.Tensor]) -> list[torch.Tensor]:
    """FLAP's bias compensation: per layer, sum over pruned neurons j of W_down[:, j] * E[X_j], the
    mean output the pruned neurons would have added."""
    out = []
    for m, mean, k in zip(gated_mlps(model), stats.mean, keep):
        w = plain_linear(m.down_proj).weight.detach().double().cpu()
        removed = ~k.bool()
        out.append((w[:, removed] @ mean[removed]).float() if removed.any() else torch.zeros(w.shape[0]))
    return out

"""peft internals koff relies on: it initialises LoRA adapters itself, drawing from torch's
global generator in the same order peft 0.21's `LoraLayer.update_layer` does, so a run's memories
start exactly where peft's would (tests/model/memory/test_lora.py checks it)."""

from __future__ import annotations

import math

import torch
from torch import nn


def fresh_lora_a(rank: int, in_features: int, out_features: int) -> torch.Tensor:
    """A fresh LoRA A [rank, in_features], drawn as peft draws it: `nn.Linear(in, r)` and
    `nn.Linear(r, out)` are built (each draws its kaiming-uniform init), then A is drawn again."""
    a = torch.empty(rank, in_features)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    nn.init.kaiming_uniform_(torch.empty(out_features, rank), a=math.sqrt(5))
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return a

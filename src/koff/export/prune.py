"""The physically pruned backbone every export format starts from.

When FFN neuron j of a layer is deleted, row j of gate_proj and up_proj and column j of down_proj
go, and so do row j of a LoRA B on gate/up_proj and column j of a LoRA A on down_proj
(docs/design.md §1). Engines that cannot hold a width (llama.cpp's `deci` skips a layer of width 0,
q8_0 needs multiples of 32) get exact-zero neurons added back: a zero gate row, a zero up row and
a zero down column contribute exactly 0 to the layer's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from koff.core.errors import ArtifactError
from koff.model.backbone_lora import fold_into
from koff.model.base_model import fingerprint, gated_mlps, load_base, parameter_counts
from koff.storage.run_dir import Run, check_base, load_run

FFN_ROWS = ("gate_proj", "up_proj")  # neuron j is row j of these ...
FFN_COLS = ("down_proj",)  # ... and column j of this


def _sliced_linear(old: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = old.weight.detach()
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        new.weight.copy_(w)
        if old.bias is not None:
            new.bias.copy_(old.bias.detach()[rows] if rows is not None else old.bias.detach())
    new.requires_grad_(False)
    return new


def prune_model(model: nn.Module, keep: list[torch.Tensor]) -> list[torch.Tensor]:
    """Delete pruned FFN neurons from `model` in place; returns the kept indices per layer."""
    kept = []
    for mlp, k in zip(gated_mlps(model), keep):
        idx = k.bool().nonzero().squeeze(1)
        for name in FFN_ROWS:
            setattr(mlp, name, _sliced_linear(getattr(mlp, name), rows=idx))
        mlp.down_proj = _sliced_linear(mlp.down_proj, cols=idx)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = int(idx.numel())
        kept.append(idx)
    return kept


def add_down_bias(model: nn.Module, bias: list[torch.Tensor]) -> None:
    """Fold a per-layer output bias (FLAP compensation) into each down_proj."""
    for mlp, b in zip(gated_mlps(model), bias):
        old = mlp.down_proj
        new = nn.Linear(old.in_features, old.out_features, bias=True, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(old.weight)
            new.bias.copy_(b.to(old.weight.dtype) + (old.bias if old.bias is not None else 0))
        new.requires_grad_(False)
        mlp.down_proj = new


def resize_ffn(model: nn.Module, widths: list[int], down_bias: bool = False) -> None:
    """Swap each layer's FFN linears for empty ones of the given width (weights loaded later)."""
    for mlp, w in zip(gated_mlps(model), widths):
        for name in FFN_ROWS:
            old = getattr(mlp, name)
            setattr(mlp, name, nn.Linear(old.in_features, w, bias=old.bias is not None, dtype=old.weight.dtype))
        old = mlp.down_proj
        mlp.down_proj = nn.Linear(w, old.out_features, bias=down_bias or old.bias is not None, dtype=old.weight.dtype)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = w


def _layer_and_module(key: str) -> tuple[int | None, str | None]:
    """('model.layers.3.mlp.up_proj.weight') -> (3, 'up_proj'); (None, None) outside an FFN."""
    parts = key.split(".")
    layer = None
    if "layers" in parts:
        i = parts.index("layers")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            layer = int(parts[i + 1])
    module = next((p for p in parts if p in FFN_ROWS + FFN_COLS), None)
    return layer, module


def padded_widths(widths: list[int], multiple: int = 1, minimum: int = 1) -> list[int]:
    """Each width rounded up to a multiple of `multiple`, and at least `minimum`."""
    return [max(minimum, -(-w // multiple) * multiple) for w in widths]


def _pad_dim(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    extra = size - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def pad_ffn_state(state: dict[str, torch.Tensor], widths: list[int]) -> dict[str, torch.Tensor]:
    """Grow each layer's FFN tensors to `widths` with exact-zero neurons.

    Works on a model state dict (gate/up weights and biases gain zero rows, down_proj weights
    zero columns) and on a peft LoRA state dict (B of gate/up gains zero rows, A of down_proj zero
    columns); a zero neuron adds silu(0) * 0 = 0, so outputs are unchanged.
    """
    out = {}
    for key, t in state.items():
        layer, module = _layer_and_module(key)
        if layer is not None and module is not None:
            w = widths[layer]
            lora = ".lora_A." in key or ".lora_B." in key
            if module in FFN_ROWS and (not lora or ".lora_B." in key):
                t = _pad_dim(t, 0, w)
            elif module in FFN_COLS and key.endswith("weight") and (not lora or ".lora_A." in key):
                t = _pad_dim(t, 1, w)
        out[key] = t.contiguous()
    return out


@dataclass
class PrunedBackbone:
    """A run's backbone with pruned neurons deleted (and FLAP's bias folded in), ready to write."""

    run: Run
    model: Any
    """The pruned transformers model (typed Any: its methods, not nn.Module's `__getattr__` types)."""
    tokenizer: Any
    source: str
    kept: list[torch.Tensor]
    dense_parameters: int
    parameters: int

    @property
    def widths(self) -> list[int]:
        return [int(k.numel()) for k in self.kept]

    @property
    def down_bias(self) -> bool:
        return self.run.bias is not None

    @property
    def inputs(self) -> list[Path]:
        """What an export must never write into or over: the run and the base model's folder."""
        return [Path(self.run.path), Path(self.source)]


def pruned_backbone(run_dir: Path, model: str | None = None, dtype: torch.dtype = torch.float32) -> PrunedBackbone:
    """Load a run and its base model (fingerprint checked, weights in `dtype`) and delete the pruned
    neurons."""
    run = load_run(run_dir)
    if run.keep is None:
        raise ArtifactError(f"{run_dir}: the run has no backbone mask (it is a dense + memories run)")
    base, tok, source = load_base(model or run.meta.base_model.source, dtype=dtype)
    check_base(run, source, fingerprint(source))
    dense = parameter_counts(base)["total"]
    if run.backbone_lora is not None:  # before deleting neurons: a pruned neuron's delta goes with it

        run.backbone_lora.check(base, Path(run.path) / "backbone")
        fold_into(base, run.backbone_lora)
    kept = prune_model(base, run.keep)
    if run.bias is not None:
        add_down_bias(base, run.bias)
    return PrunedBackbone(run=run, model=base, tokenizer=tok, source=source, kept=kept, dense_parameters=dense,
                          parameters=parameter_counts(base)["total"])


def state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as transformers stores them (a tied output head stored once)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state

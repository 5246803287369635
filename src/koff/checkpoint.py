"""Resumable training state: everything the offloading loop needs to continue exactly.

    CHECKPOINT/
      tensors.safetensors   trainable parameters (gates, LoRA, KV), optimizer moments, multipliers,
                            the fixed mask once consolidation started, the gate-noise RNG
      state.json            step, data-stream positions, Python RNG, optimizer hyper-parameters,
                            controller state, running losses

Written to a temporary folder and renamed over the previous checkpoint, so a crash mid-write
leaves the previous one intact. safetensors + JSON only.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .artifact import ArtifactError


def _optimizer_tensors(prefix: str, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(prefix: str, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        if name.startswith(prefix + ".state."):
            idx, key = name[len(prefix) + 7:].split(".", 1)
            state.setdefault(int(idx), {})[key] = t
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(folder: Path, model, optimizer, lam_opt, controller, noise: torch.Generator, loop: dict) -> None:
    """Write the training state (see module docstring) atomically to `folder`."""
    folder = Path(folder)
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    opt_t, opt_meta = _optimizer_tensors("optimizer", optimizer)
    tensors.update(opt_t)
    meta = {"loop": loop, "optimizer": opt_meta}
    if lam_opt is not None:
        lt, lm = _optimizer_tensors("lambda_optimizer", lam_opt)
        tensors.update(lt)
        meta["lambda_optimizer"] = lm
        tensors.update({f"controller.{n}": p.detach().cpu().reshape(1) for n, p in controller.named_parameters()})
    elif controller is not None:
        meta["controller"] = controller.state()
    if model.gates is not None and model.gates.mode == "mask":
        tensors.update({f"mask.{i}": m.to(torch.uint8).cpu() for i, m in enumerate(model.gates.mask)})
    tensors["rng.noise"] = noise.get_state()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        save_file(tensors, str(tmp / "tensors.safetensors"), metadata={"format": "pt"})
        (tmp / "state.json").write_text(json.dumps(meta))
        old = None
        if folder.exists():
            old = folder.with_name(folder.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint folder: (tensors, metadata)."""
    folder = Path(folder)
    if not (folder / "state.json").is_file() and folder.with_name(folder.name + ".old").is_dir():
        folder = folder.with_name(folder.name + ".old")  # interrupted while replacing: the previous one
    try:
        meta = json.loads((folder / "state.json").read_text())
        tensors = load_file(str(folder / "tensors.safetensors"))
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{folder}: unreadable checkpoint ({e})") from None
    return tensors, meta


def restore(model, optimizer, lam_opt, controller, noise: torch.Generator, tensors: dict, meta: dict) -> dict:
    """Load a checkpoint into live training objects; returns the loop state."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            if name.startswith("param."):
                key = name[6:]
                if key not in params or params[key].shape != t.shape:
                    raise ArtifactError(f"checkpoint tensor {key!r} does not fit the model being trained")
                params[key].copy_(t)
    optimizer.load_state_dict(_optimizer_state("optimizer", tensors, meta["optimizer"]))
    if lam_opt is not None:
        lam_opt.load_state_dict(_optimizer_state("lambda_optimizer", tensors, meta["lambda_optimizer"]))
        with torch.no_grad():
            for n, p in controller.named_parameters():
                p.copy_(tensors[f"controller.{n}"].reshape(p.shape))
    elif controller is not None and "controller" in meta:
        for k, v in meta["controller"].items():
            setattr(controller, {"shift": "last_shift"}.get(k, k), v)
    masks = sorted((int(k[5:]), t) for k, t in tensors.items() if k.startswith("mask."))
    if masks:
        model.gates.set_mask([t.bool() for _, t in masks])
    noise.set_state(tensors["rng.noise"])
    return meta["loop"]

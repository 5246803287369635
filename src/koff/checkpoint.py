"""Resumable training state: the trainer's `state_dict()` in safetensors + JSON, nothing pickled.

    CHECKPOINT/
      tensors.safetensors   every tensor of the state (trainable parameters, optimizer moments,
                            controller multipliers, the gate-noise generator, a fixed mask)
      state.json            the rest of the nested state, with each tensor replaced by a reference
                            into tensors.safetensors

The state is whatever `Trainer.state_dict()` returns (nested dicts and lists of numbers, strings
and tensors); `flatten` / `unflatten` turn it into the two files and back, so a new controller or
memory part only has to put its tensors into its own state_dict. A checkpoint is written to a
temporary sibling and swapped in (the previous one kept as CHECKPOINT.old until the swap is done),
so a crash at any moment leaves one complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import ArtifactError

FORMAT = "koff.checkpoint"
FORMAT_VERSION = 2


def flatten(obj, tensors: dict[str, torch.Tensor], path: str = "s"):
    """JSON-ready skeleton of `obj`; its tensors are moved into `tensors` under their path."""
    if torch.is_tensor(obj):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: flatten(v, tensors, f"{path}.{k}") for k, v in obj.items()}}
        return {"__items__": [[k, flatten(v, tensors, f"{path}.{i}")] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {path}")


def unflatten(skeleton, tensors: dict[str, torch.Tensor]):
    """Inverse of `flatten`."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {k: unflatten(v, tensors) for k, v in skeleton["__dict__"].items()}
        if "__items__" in skeleton:
            return {k: unflatten(v, tensors) for k, v in skeleton["__items__"]}
        if "__list__" in skeleton:
            return [unflatten(v, tensors) for v in skeleton["__list__"]]
        raise ValueError(f"unknown checkpoint node {sorted(skeleton)}")
    return skeleton


def save_checkpoint(folder: Path, state: dict) -> None:
    """Write a trainer state atomically to `folder`."""
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(state, tensors)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        save_file(tensors, str(tmp / "tensors.safetensors"), metadata={"format": "pt"})
        (tmp / "state.json").write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION,
                                                    "state": skeleton}))
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


def checkpoint_exists(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / "state.json").is_file() or (folder.with_name(folder.name + ".old") / "state.json").is_file()


def load_checkpoint(folder: Path) -> dict:
    """Read a checkpoint folder back into the nested state `save_checkpoint` was given."""
    folder = Path(folder)
    if not (folder / "state.json").is_file() and folder.with_name(folder.name + ".old").is_dir():
        folder = folder.with_name(folder.name + ".old")  # interrupted while replacing: the previous one
    try:
        meta = json.loads((folder / "state.json").read_text())
        tensors = load_file(str(folder / "tensors.safetensors"))
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{folder}: unreadable checkpoint ({e}); delete it to start the run over") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{folder}: a checkpoint of another format ({meta.get('format')!r} version "
                            f"{meta.get('format_version')!r}; this koff writes {FORMAT!r} version {FORMAT_VERSION}); "
                            "delete it to start the run over")
    try:
        return unflatten(meta["state"], tensors)
    except (KeyError, ValueError, TypeError) as e:
        raise ArtifactError(f"{folder}: malformed checkpoint ({e}); delete it to start the run over") from None

"""Resumable training state: the trainer's `state_dict()` in safetensors + JSON, nothing pickled.

    CHECKPOINT/
      tensors.safetensors   every tensor of the state (trainable parameters, optimizer moments,
                            controller multipliers, the gate-noise generator, a fixed mask)
      state.json            the rest of the nested state, with each tensor replaced by a reference
                            into tensors.safetensors

The state is whatever `Trainer.state_dict()` returns (nested dicts and lists of numbers, strings
and tensors); `flatten` / `unflatten` turn it into the two files and back, so a new controller or
memory part only has to put its tensors into its own state_dict. A checkpoint is written to a
temporary sibling and swapped in by one atomic exchange (`koff.outputs.swap_in`), so a crash at
any moment leaves one complete checkpoint at CHECKPOINT; temporary folders of a crashed save are
removed by the next one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from koff.core import faults
from koff.core.atomic import clean_leftovers, make_temp_dir, remove_tree, swap_in
from koff.core.errors import ArtifactError
from koff.core.files import load_tensors, read_json
from koff.storage.manifests import CheckpointManifest


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
    clean_leftovers(folder)  # the caller holds the run's lock: these are a crashed save's
    old_style = folder.with_name(folder.name + ".old")  # where a non-atomic swap kept the previous one
    tmp = make_temp_dir(folder)
    old = None
    try:
        save_file(tensors, str(tmp / "tensors.safetensors"), metadata={"format": "pt"})
        (tmp / "state.json").write_text(json.dumps(CheckpointManifest(skeleton).to_dict()))
        faults.point("checkpoint.staged")
        old = swap_in(tmp, folder)
    finally:
        for p in (tmp, old):
            if p is not None:
                remove_tree(p)
    remove_tree(old_style)


def checkpoint_exists(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / "state.json").is_file() or (folder.with_name(folder.name + ".old") / "state.json").is_file()


def load_checkpoint(folder: Path) -> dict:
    """Read a checkpoint folder back into the nested state `save_checkpoint` was given."""

    folder = Path(folder)
    if not (folder / "state.json").is_file() and folder.with_name(folder.name + ".old").is_dir():
        folder = folder.with_name(folder.name + ".old")  # interrupted while replacing: the previous one
    hint = "; delete it to start the run over"
    try:
        meta = CheckpointManifest.from_dict(read_json(folder / "state.json"), str(folder / "state.json"))
        tensors = load_tensors(folder / "tensors.safetensors")
    except ArtifactError as e:
        raise ArtifactError(f"{e}{hint}") from None
    missing = sorted(set(meta.tensor_refs) - set(tensors))
    if missing:
        raise ArtifactError(f"{folder / 'state.json'}: refers to tensors {missing[:3]} that "
                            f"{folder / 'tensors.safetensors'} lacks{hint}")
    try:
        return unflatten(meta.state, tensors)
    except (KeyError, ValueError, TypeError) as e:
        raise ArtifactError(f"{folder}: malformed checkpoint ({e}){hint}") from None

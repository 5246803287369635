"""Reading koff's files: JSON objects and safetensors tensors with errors that name the file,
paths that must stay inside a folder, and file hashes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from koff.core.errors import ArtifactError


def read_json(path: Path) -> dict:
    """A JSON object from `path`; errors name the file."""
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"{path} is a folder, expected a JSON file")
    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ArtifactError(f"{path}: not valid JSON (nested too deeply)") from None
    except OSError as e:
        raise ArtifactError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


MAX_ABS = 1e6
"""The largest magnitude a tensor koff stores (gates, LoRA, KV, bias) may hold: trained values are
orders of magnitude below; a file above it was not written by training (a probe loaded KV x 1e30)."""


def load_tensors(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file. With `dtype`, every tensor must have exactly that dtype
    (the one the format specifies) and, being floating point, hold no NaN or Inf."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError) as e:
        raise ArtifactError(f"{path}: not a readable safetensors file ({e})") from None
    if dtype is not None:
        for key, t in tensors.items():
            if t.dtype != dtype:
                raise ArtifactError(f"{path}: tensor {key!r} is {str(t.dtype).removeprefix('torch.')}, "
                                    f"the format stores {str(dtype).removeprefix('torch.')}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ArtifactError(f"{path}: tensor {key!r} holds NaN or Inf values")
            if t.is_floating_point() and t.numel() and float(t.abs().max()) > MAX_ABS:
                raise ArtifactError(f"{path}: tensor {key!r} holds values up to {float(t.abs().max()):.3g}; koff "
                                    f"never stores any above {MAX_ABS:.0e} (they overflow attention and the logits)")
    return tensors


def inside(root: Path, rel: str, where: str) -> Path:
    """`root / rel`, refused unless it stays inside `root`: a relative path without '..', and no
    symlink on the way (a run must not make koff read files elsewhere)."""
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or ".." in parts or rel != Path(rel).as_posix():
        raise ArtifactError(f"{where}: file path {rel!r} must be relative to {root} without '..'")
    p = Path(root)
    for part in parts:
        p = p / part
        if p.is_symlink():
            raise ArtifactError(f"{where}: {p} is a symlink; koff reads only files inside the run itself")
    return p


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

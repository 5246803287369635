"""The run directory: koff's on-disk format for a decomposed model.

    RUN/
      koff.json                  manifest (format, versions, base-model fingerprint, s*, sparsity,
                                 domains, training config, metrics summary, file hashes)
      config.yaml                the configuration that produced the run
      metrics.jsonl              one JSON line per training step
      backbone/mask.safetensors  "layers.{i}.keep": uint8 [width_i], 1 = neuron kept
      backbone/gates.safetensors "layers.{i}.log_alpha": float32 [width_i] (learned gates)
      memories/NAME/memory.json          what the memory holds + its file hashes
      memories/NAME/adapter_config.json  peft LoRA adapter for the *dense* base model
      memories/NAME/adapter_model.safetensors
      memories/NAME/kv.safetensors       "keys", "values": float32 [layers, kv_heads, m, head_dim]
      reference/                 (optional) dense + memories trained the same way: a run of its own
      eval/                      tables written by `koff evaluate`

Everything is safetensors or JSON/YAML: nothing is ever unpickled. Every write goes to a temporary
path first and is renamed into place (`koff.outputs`), so a failure never leaves a half-written
artifact and never destroys an existing one. A memory's files are listed in its own memory.json,
not in koff.json, so adding a memory later leaves every existing file byte-identical.

Loading trusts the format, not the manifest: the files a run or memory must hold follow from its
shape (`koff.manifest`), each must be listed with its sha256, lie inside the folder (no '..', no
symlink) and match; every tensor is checked for dtype, shape and finiteness, and the geometry
recorded is checked against the base model actually loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from koff.core.atomic import atomic_output, atomic_write_text, remove_tree
from koff.core.errors import ArtifactError, ModelError
from koff.core.files import inside, load_tensors, read_json, sha256_file
from koff.core.version import __version__
from koff.model.backbone_lora import BackboneLora
from koff.model.base_model import Geometry, fingerprint, inspect_model, load_base
from koff.model.gates import NeuronGates
from koff.model.koff_model import KoffModel
from koff.model.memory import PART_KINDS, STATE_CLASSES
from koff.model.memory.lora import LoraSection, LoraState
from koff.storage.manifests import FORMAT_VERSION, RUN_FORMAT, MemoryManifest, RunManifest

FORMAT = RUN_FORMAT


# -- in-memory records ---------------------------------------------------------------------------
@dataclass
class MemoryRecord:
    """One domain memory as stored: its parts (kind -> state, e.g. "lora" -> LoraState, "kv" ->
    KVState) plus the extra fields of its memory.json."""

    name: str
    parts: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    meta: MemoryManifest | None = None
    """The typed memory.json (set when the memory was loaded from disk)."""

    def without(self, *kinds: str) -> MemoryRecord:
        """The same memory without the given parts (e.g. `without("kv")`: its LoRA half)."""
        return MemoryRecord(self.name, {k: v for k, v in self.parts.items() if k not in kinds}, dict(self.info))


@dataclass
class Run:
    """A loaded, validated run directory."""

    path: Path
    meta: RunManifest
    """koff.json, typed and validated."""
    keep: list[torch.Tensor] | None
    log_alpha: list[torch.Tensor] | None
    memories: dict[str, MemoryRecord]
    bias: list[torch.Tensor] | None = None
    """FLAP bias compensation added to each layer's down_proj output (one-shot FLAP runs only)."""
    backbone_lora: LoraState | None = None
    """The backbone's shared LoRA adapter (a LoraState; `train.backbone_lora_rank` > 0 only)."""

    @property
    def manifest(self) -> dict:
        """koff.json as the typed manifest writes it."""
        return self.meta.to_dict()

    @property
    def domains(self) -> list[str]:
        """The run's domain names, in training order."""
        return list(self.meta.domains)

    @property
    def target_sparsity(self) -> float:
        """s*: the fraction of FFN parameters the run's mask was trained to remove."""
        return float(self.meta.target_sparsity)

    @property
    def reference(self) -> Run | None:
        """The dense + memories run trained beside this one (RUN/reference), validated, or None."""
        ref = self.path / "reference"
        if not (ref / "koff.json").is_file():
            return None
        run = load_run(ref)
        if run.meta.pruned or run.meta.base_model.fingerprint != self.meta.base_model.fingerprint:
            raise ArtifactError(f"{ref / 'koff.json'}: a run's reference must be the dense + memories run of the same "
                                "base model (pruned: false, the same fingerprint)")
        return run


def memory_record(km, name: str, info: dict | None = None) -> MemoryRecord:
    """Snapshot one memory of a KoffModel."""
    return MemoryRecord(name=name, parts=km.snapshot_memory(name), info=dict(info or {}))


# -- writing -------------------------------------------------------------------------------------
def write_memory(folder: Path, rec: MemoryRecord, base_source: str | None = None,
                 extra: dict[str, bytes] | None = None) -> dict[str, str]:
    """Write one memory's files into `folder` (which must exist and be empty); returns hashes.
    Each part writes its own files and memory.json section (under its kind's name); `extra` files
    (the memory's training metrics) are written and hashed alongside. memory.json is written last:
    a folder without it is not a memory."""

    folder = Path(folder)
    for fname, data in (extra or {}).items():
        (folder / fname).write_bytes(data)
    sections = {kind: rec.parts[kind].save(folder, base_source) for kind in PART_KINDS if kind in rec.parts}
    info = {k: v for k, v in rec.info.items() if k not in ("name", "files", "format", "format_version", "koff_version",
                                                           *PART_KINDS)}
    draft = MemoryManifest(name=rec.name, parts=sections, files={})
    files = {f: sha256_file(folder / f) for f in sorted(draft.required_files() | set(extra or {}))}
    where = str(folder.parent / rec.name / "memory.json")
    manifest = MemoryManifest.from_dict({**draft.to_dict(), **info, "files": files}, where)
    atomic_write_text(folder / "memory.json", json.dumps(manifest.to_dict(), indent=2))
    return files


def save_mask(folder: Path, keep: list[torch.Tensor], log_alpha: list[torch.Tensor] | None,
              bias: list[torch.Tensor] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if bias is not None:
        save_file({f"layers.{i}.down_bias": b.detach().float().cpu().contiguous() for i, b in enumerate(bias)},
                  str(folder / "bias.safetensors"), metadata={"format": "pt"})
    save_file({f"layers.{i}.keep": k.to(torch.uint8).contiguous() for i, k in enumerate(keep)},
              str(folder / "mask.safetensors"), metadata={"format": "pt"})
    if log_alpha is not None:
        save_file({f"layers.{i}.log_alpha": a.detach().float().cpu().contiguous() for i, a in enumerate(log_alpha)},
                  str(folder / "gates.safetensors"), metadata={"format": "pt"})


def write_run(folder: Path, manifest: dict, keep: list[torch.Tensor] | None, log_alpha: list[torch.Tensor] | None,
              memories: list[MemoryRecord], config_yaml: str, bias: list[torch.Tensor] | None = None,
              backbone_lora=None) -> None:
    """Write a complete run into a folder not yet holding one (a temporary folder, or a resumable
    OUTPUT.partial/, which may already hold metrics.jsonl, a checkpoint and a reference). koff.json
    lists the sha256 of every backbone-level file the format requires and is written last, in one
    rename: a folder without it is not a run, and what an interrupted write left is replaced."""

    folder = Path(folder)
    if (folder / "koff.json").exists():
        raise ArtifactError(f"{folder}: holds a finished run already (koff.json)")
    for stale in ("backbone", "memories", "config.yaml"):  # from a write interrupted before koff.json
        remove_tree(folder / stale)
    (folder / "config.yaml").write_text(config_yaml)
    if keep is not None:
        save_mask(folder / "backbone", keep, log_alpha, bias)
    if backbone_lora is not None:  # a LoraState: the backbone's shared adapter, in peft's format
        backbone_lora.save(folder / "backbone", manifest.get("base_model", {}).get("source"))
    for rec in memories:
        d = folder / "memories" / rec.name
        d.mkdir(parents=True)
        write_memory(d, rec, manifest.get("base_model", {}).get("source"))
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, "koff_version": __version__, **manifest, "files": {}}
    raw = full.get("training")
    training: dict = raw if isinstance(raw, dict) else {}
    required = RunManifest.files_for(bool(full.get("pruned")), training.get("mask", "learned"),
                                     bool((training.get("train") or {}).get("backbone_lora_rank")))
    full["files"] = {rel: sha256_file(folder / rel) for rel in sorted(required)}
    typed = RunManifest.from_dict(full, str(folder / "koff.json"))
    atomic_write_text(folder / "koff.json", json.dumps(typed.to_dict(), indent=2))


def add_memory(run_dir: Path, rec: MemoryRecord, base_source: str | None = None, overwrite: bool = False,
               extra: dict[str, bytes] | None = None) -> Path:
    """Add (or with `overwrite`, replace an earlier memory of the same name) one memory in an
    existing run; other files are untouched."""
    final = Path(run_dir) / "memories" / rec.name
    with atomic_output(final, kind="memory", overwrite=overwrite) as tmp:
        write_memory(tmp, rec, base_source, extra)
    return final


# -- reading and validation ----------------------------------------------------------------------


def _check_hashes(folder: Path, files: dict, where: str) -> None:
    for rel, digest in files.items():
        p = inside(folder, rel, where)
        if not p.is_file():
            raise ArtifactError(f"{where}: lists {rel}, which is missing from {folder}")
        if sha256_file(p) != digest:
            raise ArtifactError(f"{p}: contents changed since koff wrote it (sha256 differs from {where})")


def load_memory(folder: Path, geometry: Geometry, against: str = "the base model") -> MemoryRecord:
    """Read and validate one memory folder against the base model's geometry."""

    folder = Path(folder)
    where = str(folder / "memory.json")
    meta = MemoryManifest.from_dict(read_json(inside(folder, "memory.json", where)), where)
    if meta.name != folder.name:
        raise ArtifactError(f"{where}: field 'name' is {meta.name!r} but the folder is {folder.name!r} (a copied or "
                            f"renamed memory folder?); name the folder {meta.name!r} again, or, to serve the memory "
                            f"under another name, load the original folder with a name: koff serve's "
                            f"POST /v1/memories {{\"path\": ..., \"name\": \"{folder.name}\"}}")
    _check_hashes(folder, meta.files, where)
    rec = MemoryRecord(name=meta.name, info=meta.info, meta=meta)
    for kind, section in meta.parts.items():
        rec.parts[kind] = STATE_CLASSES[kind].load(folder, section, where, geometry, against)
    return rec


def _layer_tensors(path: Path, dtype: torch.dtype, name: str, shapes: list[list[int]]) -> list[torch.Tensor]:
    """The per-layer tensors `layers.{i}.{name}` of a backbone file: exactly those keys, each of
    its shape, of the format's dtype, finite."""
    tensors = load_tensors(path, dtype=dtype)
    want = {f"layers.{i}.{name}" for i in range(len(shapes))}
    unknown = sorted(set(tensors) - want)
    if unknown:
        raise ArtifactError(f"{path}: unexpected tensors {unknown[:3]} (expected {name} for {len(shapes)} layers)")
    out = []
    for i, shape in enumerate(shapes):
        key = f"layers.{i}.{name}"
        t = tensors.get(key)
        if t is None:
            raise ArtifactError(f"{path}: missing tensor {key!r}")
        if list(t.shape) != shape:
            raise ArtifactError(f"{path}: tensor {key!r} has shape {list(t.shape)}, expected {shape}")
        out.append(t)
    return out


def load_run(path: Path) -> Run:
    """Read a run directory, validating every field, file, hash, tensor dtype, shape and value."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ArtifactError(f"a run directory must be a path, got {path!r}")
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"run directory {path} does not exist" if not path.exists()
                            else f"{path} is not a run directory (a file)")
    where = str(path / "koff.json")
    raw = read_json(inside(path, "koff.json", where))
    meta = RunManifest.from_dict(raw, where)
    _check_hashes(path, meta.files, where)
    geometry = meta.base_model.geometry()

    keep = log_alpha = bias = backbone_lora = None
    if meta.pruned:
        widths = [[w] for w in geometry.intermediate_sizes]
        keep = _layer_tensors(path / "backbone" / "mask.safetensors", torch.uint8, "keep", widths)
        for i, t in enumerate(keep):
            if not bool(((t == 0) | (t == 1)).all()):
                raise ArtifactError(f"{path / 'backbone/mask.safetensors'}: tensor 'layers.{i}.keep' holds values "
                                    "other than 0/1")
        keep = [t.bool() for t in keep]
        log_alpha = _layer_tensors(path / "backbone" / "gates.safetensors", torch.float32, "log_alpha", widths)
        if "backbone/bias.safetensors" in meta.files:
            bias = _layer_tensors(path / "backbone" / "bias.safetensors", torch.float32, "down_bias",
                                  [[geometry.hidden_size]] * geometry.num_layers)
        if meta.backbone_lora:
            backbone_lora = _load_backbone_lora(path, meta, where)

    memories = {}
    mem_root = path / "memories"
    if mem_root.is_symlink():
        raise ArtifactError(f"{mem_root} is a symlink; koff reads only files inside the run itself")
    if mem_root.is_dir():
        for d in sorted(mem_root.iterdir()):
            if d.is_dir() and not d.name.startswith("."):
                if d.is_symlink():
                    raise ArtifactError(f"{d} is a symlink; koff reads only files inside the run itself")
                memories[d.name] = load_memory(d, geometry, f"koff.json's base model ({where}: base_model)")
    _check_memories(meta, memories, where)
    return Run(path=path, meta=meta, keep=keep, log_alpha=log_alpha, memories=memories, bias=bias,
               backbone_lora=backbone_lora)


def _load_backbone_lora(path: Path, meta: RunManifest, where: str):
    """RUN/backbone's peft adapter (`train.backbone_lora_rank`), checked against the run's training
    config and the geometry it records (the base model itself is checked when it is loaded)."""

    rank = meta.training.train.backbone_lora_rank
    section = LoraSection(rank=rank, alpha=2 * rank, targets=tuple(sorted(meta.training.memory.lora_targets)))
    return LoraState.load(path / "backbone", section, f"{where}: training.train.backbone_lora_rank")


def _check_memories(meta: RunManifest, memories: dict[str, MemoryRecord], where: str) -> None:
    """Every domain has its memory, and every memory is of the shape the run was trained with."""

    cfg = meta.training.memory
    if not cfg.empty:
        missing = [d for d in meta.domains if d not in memories]
        if missing:
            raise ArtifactError(f"{where}: domains {missing} are listed in koff.json but have no "
                                "memories/<name> folder")
    if meta.default_memory is not None and meta.default_memory not in memories:
        raise ArtifactError(f"{where}: default_memory {meta.default_memory!r} has no memories/<name> folder")
    for name, rec in memories.items():
        mwhere = f"memories/{name}/memory.json"
        assert rec.meta is not None, mwhere  # a record read from disk always has its manifest
        for kind, part in PART_KINDS.items():
            section = rec.meta.parts.get(kind)
            if (section is not None) != part.enabled(cfg):
                raise ArtifactError(f"{mwhere}: {'has' if section is not None else 'has no'} {kind} part, but {where} "
                                    f"training.memory {'does not enable' if section is not None else 'enables'} one: "
                                    "every memory of a run has the run's shape")
            if section is not None:
                part.state_class.check_run_shape(section, cfg, f"{mwhere} ({where})")


def check_base(run: Run, source: str, fingerprint: str) -> None:
    """Refuse to apply a run to a base model other than the one it was made from."""
    want = run.meta.base_model.fingerprint
    if fingerprint != want:
        raise ArtifactError(
            f"{run.path / 'koff.json'}: made from base model {run.meta.base_model.source!r} (fingerprint {want}), "
            f"but the model given is {source!r} (fingerprint {fingerprint}); a mask and memories only fit the exact "
            "base model they were trained on (if that model moved, pass its new folder with --model)")


def load_run_base(run: Run, model: str | None = None, dtype: torch.dtype = torch.float32, device=None):
    """The base model of a run, `(model, tokenizer, source)`: from `model` or the recorded source,
    refused unless its fingerprint and geometry are the recorded ones."""

    source = model or run.meta.base_model.source
    try:
        base, tok, resolved = load_base(source, dtype=dtype, device=device)
    except ModelError as e:
        if model is None:
            raise ModelError(f"{run.path / 'koff.json'}: the run's base model {source!r} cannot be loaded ({e}); "
                             "if it moved, pass its new folder with --model") from None
        raise
    check_base(run, resolved, fingerprint(resolved))
    run.meta.base_model.check_model(inspect_model(base), str(run.path / "koff.json"), resolved)
    return base, tok, resolved


def attach_memory(km, rec: MemoryRecord, where: Path | None = None) -> None:
    """Add a stored memory to a KoffModel (validated against the model's shapes)."""
    where = where or Path(rec.name)
    for state in rec.parts.values():
        state.check(km.model, where)
    km.install_memory(rec.name, rec.parts)


def build_model(run: Run, model: str | None = None, memories: list[str] | None = None, runtime=None):
    """Rebuild the decomposed model of a run: `(KoffModel, tokenizer)`.

    The base model is loaded from `model` (default: the source recorded in koff.json) and must
    have the recorded fingerprint and geometry. The backbone mask is applied; `memories` selects
    which memories to attach (default: all). `runtime` (a `koff.runtime.Runtime`) gives the device
    and base-weight dtype (default: float32 on the CPU).
    """

    for name in memories or []:
        if name not in run.memories:
            raise ArtifactError(f"{run.path}: no memory named {name!r}; have {sorted(run.memories)}")
    dtype = runtime.dtype if runtime is not None else torch.float32
    base, tok, source = load_run_base(run, model, dtype=dtype)
    gates = None
    if run.keep is not None:
        gates = NeuronGates.for_model(base, init=run.log_alpha if run.log_alpha is not None else 3.0)
        gates.set_mask(run.keep)
        gates.set_bias(run.bias)
        gates.requires_grad_(False)
    km = KoffModel(base, gates)
    if run.backbone_lora is not None:

        run.backbone_lora.check(base, run.path / "backbone")
        km.set_backbone_lora(BackboneLora.stored(base, run.backbone_lora))
    for name in memories if memories is not None else list(run.memories):
        attach_memory(km, run.memories[name], run.path / "memories" / name)
    if runtime is not None:
        km.to(runtime.device)
    return km, tok

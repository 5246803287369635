"""What a server serves: a backbone (from a run directory or an exported backbone) and the memory
folders it may load, each validated against that backbone.

A memory only fits the backbone it was trained on: the same base model *and* the same FFN mask
(a memory trained on another run's backbone would load and produce noise). A memory folder does not
record either itself, so it is validated against the manifest of the artifact it belongs to, two
levels up:

  - a run's `RUN/memories/NAME/` (with its memory.json): `RUN/koff.json` gives the base model's
    fingerprint, `RUN/backbone/mask.safetensors` the mask (its sha256 checked against koff.json);
    memory.json's own hashes, shapes, dtypes and finiteness are checked by `artifact.load_memory`;
  - an export's `OUT/memories/NAME/` (peft LoRA + kv.safetensors): `OUT/koff_backbone.json` gives
    the fingerprint and the hashes of the memory's files, `OUT/kept_neurons.safetensors` the mask.

The served backbone has the same two facts (`Backbone.fingerprint`, `Backbone.mask_digest`), and
both must match. A run's LoRA is shaped for the dense FFN widths and an export's for the pruned
ones; `PartState.fit_ffn` converts between the two exactly (a pruned neuron's rows / columns are cut, or
zero-filled, and they never reach the output: its gate is 0 in a run, and it does not exist in an
export; `PartState.fit_ffn`), so either kind of memory folder can be loaded into either kind of
server.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from koff.core.errors import ArtifactError, DataError, ServeError
from koff.core.files import load_tensors, read_json, sha256_file
from koff.core.names import check_memory_name
from koff.export import load_backbone
from koff.model.koff_model import KoffModel
from koff.model.memory import STATE_CLASSES
from koff.serve.routing import token_counts
from koff.storage.manifests import BackboneManifest, MemoryManifest, RunManifest
from koff.storage.run_dir import build_model, load_memory, load_run

RUN_MANIFEST = "koff.json"
EXPORT_MANIFEST = "koff_backbone.json"


@dataclass(frozen=True)
class Backbone:
    """The identity of a served backbone: what every memory loaded into it must have been made for."""

    kind: str
    """"run" or "export"."""
    path: Path
    fingerprint: str
    """sha256 fingerprint of the base model (weights + config) the backbone was cut from."""
    keep: tuple[torch.Tensor, ...] | None
    """Per layer, which FFN neurons of the base model are kept (None: all of them, a dense run)."""
    dense_widths: tuple[int, ...]
    """FFN width of each layer of the base model."""
    sliced: bool
    """True when pruned neurons are physically absent (an export): LoRA tensors use the pruned widths."""

    @property
    def mask_digest(self) -> str:
        return mask_digest(self.keep, self.dense_widths)


@dataclass
class StoredMemory:
    """A memory read from disk and validated, ready to install: part kind -> state."""

    name: str
    states: dict
    source: str
    info: dict = field(default_factory=dict)
    """What `/v1/memories` shows: parts, LoRA rank, KV tokens."""
    train_files: tuple[str, ...] = ()
    """The text the memory was trained on, as its run recorded it (for the auto router)."""
    text_field: str = "text"
    token_counts: torch.Tensor | None = None
    """Token-id counts of `train_files` (`fit_router`); None when they could not be read."""

    @property
    def prefix_tokens(self) -> int:
        return sum(state.prefix_tokens for state in self.states.values())


@dataclass
class Served:
    """A loaded backbone with its tokenizer and the memories found beside it."""

    km: KoffModel
    tokenizer: Any
    backbone: Backbone
    memories: list[StoredMemory]
    context: int
    """Maximum positions of the base model (prompt + memory prefix + generated tokens)."""


def mask_digest(keep, widths) -> str:
    """sha256 of the kept-neuron mask of every layer (all ones for a dense backbone)."""
    h = hashlib.sha256()
    for i, w in enumerate(widths):
        k = torch.ones(w, dtype=torch.bool) if keep is None else keep[i].bool()
        if k.numel() != w:
            raise ArtifactError(f"layer {i}: mask of {k.numel()} neurons for an FFN of width {w}")
        h.update(f"{i}:{w}:".encode())
        h.update(k.to(torch.uint8).cpu().numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _memory_info(states: dict) -> dict:
    info: dict = {"parts": sorted(states)}
    for state in states.values():
        info.update(state.describe())
    return info


# -- serving a run or an export ------------------------------------------------------------------
def load_served(path: Path, runtime) -> Served:
    """The backbone at `path` (a run directory or an exported backbone) with all its memories."""
    path = Path(path)
    if (path / RUN_MANIFEST).is_file():
        return _load_run(path, runtime)
    if (path / EXPORT_MANIFEST).is_file():
        return _load_export(path, runtime)
    if not path.exists():
        raise ServeError(f"{path} does not exist; expected a run directory (koff decompose) or an exported "
                         "backbone (koff export)")
    raise ServeError(f"{path} is neither a run directory (no {RUN_MANIFEST}) nor an exported backbone "
                     f"(no {EXPORT_MANIFEST})")


def _context(km: KoffModel) -> int:
    cfg = km.model.config.get_text_config(decoder=True) if hasattr(km.model.config, "get_text_config") \
        else km.model.config
    return int(getattr(cfg, "max_position_embeddings", 2048) or 2048)


def _load_run(path: Path, runtime) -> Served:

    run = load_run(path)
    km, tok = build_model(run, runtime=runtime, memories=[])
    base = run.meta.base_model
    backbone = Backbone("run", path, base.fingerprint, None if run.keep is None else tuple(run.keep),
                        tuple(base.intermediate_sizes), sliced=False)
    memories = [StoredMemory(name, dict(rec.parts), str(path / "memories" / name), _memory_info(rec.parts),
                             *_training_text(run.meta, rec.meta, name))
                for name, rec in run.memories.items()]
    return Served(km, tok, backbone, memories, _context(km))


def _training_text(run: RunManifest, memory: MemoryManifest | None, name: str) -> tuple[tuple[str, ...], str]:
    """The training files of memory `name`: from its memory.json (a memory added later) or its
    run's koff.json (a memory of the decomposition; the run's default memory trained on the general
    data)."""
    own = memory.data if memory is not None else None
    if own is None and name == run.default_memory:
        return run.general, "text"
    record = own if own is not None else run.data.get(name)
    if record is None:
        return (), "text"
    return record.train, record.text_field


def fit_router(stored: StoredMemory, tokenizer, vocab: int) -> None:
    """Count the tokens of the memory's training text for the auto router (if it can be read)."""

    if not stored.train_files:
        return
    try:
        stored.token_counts = token_counts(stored.train_files, tokenizer, vocab, stored.text_field)
    except (DataError, OSError, ValueError):
        stored.token_counts = None


def _load_export(path: Path, runtime) -> Served:

    model, tok = load_backbone(path, dtype=runtime.dtype)
    km = KoffModel(model)
    km.to(runtime.device)
    backbone = _export_backbone(path)
    memories = []
    root = path / "memories"
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if d.is_dir() and not d.name.startswith("."):
                memories.append(read_memory_folder(d, backbone))
    return Served(km, tok, backbone, memories, _context(km))


def _export_manifest(out: Path) -> BackboneManifest:
    """The export's typed manifest; only the files a caller reads are hashed (by that caller), not
    the backbone's weights on every memory load."""
    where = out / EXPORT_MANIFEST
    return BackboneManifest.from_dict(read_json(where), str(where))


def _export_backbone(out: Path, m: BackboneManifest | None = None) -> Backbone:
    where = out / EXPORT_MANIFEST
    m = m if m is not None else _export_manifest(out)
    fp, dense = m.base_model.fingerprint, m.base_model.intermediate_sizes
    kept_file = out / "kept_neurons.safetensors"
    _check_hash(kept_file, m.files.get("kept_neurons.safetensors"), where)
    kept = load_tensors(kept_file)
    keep = []
    for i, w in enumerate(dense):
        idx = kept.get(f"layers.{i}")
        if idx is None or idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32):
            raise ArtifactError(f"{kept_file}: tensor 'layers.{i}' missing or not a 1-D integer tensor")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= w):
            raise ArtifactError(f"{kept_file}: tensor 'layers.{i}' holds indices outside [0, {w})")
        k = torch.zeros(w, dtype=torch.bool)
        k[idx.long()] = True
        keep.append(k)
    return Backbone("export", out, fp, tuple(keep), tuple(dense), sliced=True)


def _check_hash(path: Path, digest, where: Path) -> None:
    if not isinstance(digest, str):
        raise ArtifactError(f"{where}: lists no sha256 for {path.name}")
    if not path.is_file():
        raise ArtifactError(f"{where}: lists {path.name}, which is missing")
    if sha256_file(path) != digest:
        raise ArtifactError(f"{path}: contents changed since koff wrote it (sha256 differs from {where})")


# -- one memory folder ---------------------------------------------------------------------------
def read_memory_folder(folder: Path, backbone: Backbone, name: str | None = None) -> StoredMemory:
    """Read and validate a memory folder (a run's or an export's `memories/NAME`) for `backbone`.

    `name` installs it under another name than its folder's. Raises ArtifactError (a bad or
    foreign memory) or ServeError (not a memory folder).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ServeError(f"memory folder {folder} does not exist")
    owner = folder.parent.parent
    if (folder / "memory.json").is_file():
        if not (owner / RUN_MANIFEST).is_file():
            raise ServeError(f"{folder}: a run's memory is validated against its run's {RUN_MANIFEST}, two levels up, "
                             f"and {owner / RUN_MANIFEST} is missing; load it from inside its run directory")
        states, text = _run_memory(folder, owner, backbone)
    elif (owner / EXPORT_MANIFEST).is_file():
        states, text = _export_memory(folder, owner, backbone)
    else:
        raise ServeError(f"{folder} is not a memory folder: expected a run's memories/NAME (with memory.json, "
                         f"{RUN_MANIFEST} two levels up) or an export's memories/NAME ({EXPORT_MANIFEST} two levels up)")
    final = check_memory_name(name if name is not None else folder.name, "memory name")
    return StoredMemory(final, states, str(folder.resolve()), _memory_info(states), *text)


def _check_same_backbone(fp: str, keep, widths, backbone: Backbone, where: Path) -> None:
    if fp != backbone.fingerprint:
        raise ArtifactError(f"{where}: made from base model fingerprint {fp[:19]}…, but the served backbone was cut "
                            f"from {backbone.fingerprint[:19]}…; a memory only fits the base model it was trained on")
    if tuple(widths) != backbone.dense_widths or mask_digest(keep, widths) != backbone.mask_digest:
        raise ArtifactError(f"{where}: trained on another backbone (its FFN mask differs from the one served from "
                            f"{backbone.path}); a memory only fits the backbone it was trained on")


def _run_memory(folder: Path, run_dir: Path, backbone: Backbone) -> tuple[dict, tuple]:
    where = run_dir / RUN_MANIFEST
    m = RunManifest.from_dict(read_json(where), str(where))
    fp = m.base_model.fingerprint
    geometry = m.base_model.geometry()
    keep = None
    if m.pruned:
        mask_file = run_dir / "backbone" / "mask.safetensors"
        _check_hash(mask_file, m.files.get("backbone/mask.safetensors"), where)
        tensors = load_tensors(mask_file)
        keep = []
        for i, w in enumerate(geometry.intermediate_sizes):
            t = tensors.get(f"layers.{i}.keep")
            if t is None or list(t.shape) != [w]:
                raise ArtifactError(f"{mask_file}: tensor 'layers.{i}.keep' missing or not of shape [{w}]")
            keep.append(t.bool())
    _check_same_backbone(fp, keep, geometry.intermediate_sizes, backbone, where)
    rec = load_memory(folder, geometry)
    states = {kind: state.fit_ffn(backbone.keep, to_sliced=True) if backbone.sliced else state
              for kind, state in rec.parts.items()}
    return states, _training_text(m, rec.meta, folder.name)


def _export_memory(folder: Path, out: Path, backbone: Backbone) -> tuple[dict, tuple]:
    where = out / EXPORT_MANIFEST
    m = _export_manifest(out)
    mine = _export_backbone(out, m)
    assert mine.keep is not None  # an export's backbone always records its kept neurons (_export_backbone)
    _check_same_backbone(mine.fingerprint, mine.keep, mine.dense_widths, backbone, where)
    entry = m.memories.get(folder.name)
    if entry is None:
        raise ArtifactError(f"{where} memories: missing field {folder.name!r}")
    files = entry.files  # never empty: ExportedMemory refuses an entry that lists no files
    for rel, digest in files.items():
        _check_hash(folder / rel, digest, where)
    geometry = m.base_model.geometry()
    here = f"{where} memories.{folder.name}"
    states: dict = {}
    for kind, state_cls in STATE_CLASSES.items():  # an export carries a part when it lists all its files
        if all(f in files for f in state_cls.FILES):
            state = state_cls.load(folder, state_cls.section_from_files(folder, entry.to_dict(), here), here, geometry)
            states[kind] = state if backbone.sliced else state.fit_ffn(mine.keep, to_sliced=False)
    if not states:
        raise ArtifactError(f"{where}: memory {folder.name!r} lists the files of no memory part "
                            f"({', '.join(STATE_CLASSES)})")
    return states, _source_run_text(m, folder.name)


def _source_run_text(export_manifest: BackboneManifest, name: str) -> tuple:
    """An export's memory's training files, from the run it was exported from (if still there)."""
    source = export_manifest.source_run
    if source is None or not (Path(source) / RUN_MANIFEST).is_file():
        return (), "text"
    run_file, memory_file = Path(source) / RUN_MANIFEST, Path(source) / "memories" / name / "memory.json"
    try:
        run = RunManifest.from_dict(read_json(run_file), str(run_file))
        memory = MemoryManifest.from_dict(read_json(memory_file), str(memory_file)) if memory_file.is_file() else None
    except ArtifactError:  # the run changed since the export: the router does without its text
        return (), "text"
    return _training_text(run, memory, name)

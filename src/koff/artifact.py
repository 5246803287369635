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
path first and is renamed into place, so a failure never leaves a half-written artifact and never
destroys an existing one. A memory's files are listed in its own memory.json, not in koff.json, so
adding a memory later leaves every existing file byte-identical.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .base import Geometry, sha256_file
from .errors import ArtifactError  # noqa: F401  (re-exported)

FORMAT = "koff.run"
FORMAT_VERSION = 1
MEMORY_FORMAT = "koff.memory"




# -- atomic writing ------------------------------------------------------------------------------
def atomic_write_text(path: Path, text: str) -> None:
    """Write a file via a temporary sibling and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(final: Path, overwrite: bool = False):
    """Yield a temporary directory that becomes `final` only if the block succeeds.

    With `overwrite`, an existing `final` is replaced only after the new one is complete.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise ArtifactError(f"{final} already exists (choose another output or pass --overwrite)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.rmdir(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# -- in-memory records ---------------------------------------------------------------------------
@dataclass
class MemoryRecord:
    """One domain memory as stored: its parts (kind -> state, e.g. "lora" -> LoraState, "kv" ->
    KVState) plus the extra fields of its memory.json."""

    name: str
    parts: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @classmethod
    def of(cls, name: str, lora_config: dict | None = None, lora_state: dict | None = None,
           kv_keys: torch.Tensor | None = None, kv_values: torch.Tensor | None = None, kv_frozen: int = 0,
           info: dict | None = None) -> MemoryRecord:
        """A record from the tensors of the two shipped kinds (LoRA config + state, KV keys/values)."""
        from .memory import KVState, LoraState

        parts = {}
        if lora_state is not None:
            parts["lora"] = LoraState(dict(lora_config or {}), lora_state)
        if kv_keys is not None:
            parts["kv"] = KVState(kv_keys, kv_values, kv_frozen)
        return cls(name=name, parts=parts, info=dict(info or {}))

    def without(self, *kinds: str) -> MemoryRecord:
        """The same memory without the given parts (e.g. `without("kv")`: its LoRA half)."""
        return MemoryRecord(self.name, {k: v for k, v in self.parts.items() if k not in kinds}, dict(self.info))

    # the two shipped kinds, for readers that handle them specifically (export)
    @property
    def lora(self):
        return self.parts.get("lora")

    @property
    def kv(self):
        return self.parts.get("kv")

    @property
    def lora_config(self) -> dict | None:
        return None if self.lora is None else self.lora.config

    @property
    def lora_state(self) -> dict[str, torch.Tensor] | None:
        return None if self.lora is None else self.lora.tensors

    @property
    def kv_keys(self) -> torch.Tensor | None:
        return None if self.kv is None else self.kv.keys

    @property
    def kv_values(self) -> torch.Tensor | None:
        return None if self.kv is None else self.kv.values

    @property
    def kv_frozen(self) -> int:
        return 0 if self.kv is None else self.kv.num_frozen

    @property
    def kv_tokens(self) -> int:
        return 0 if self.kv is None else self.kv.tokens


@dataclass
class Run:
    """A loaded, validated run directory."""

    path: Path
    manifest: dict
    keep: list[torch.Tensor] | None
    log_alpha: list[torch.Tensor] | None
    memories: dict[str, MemoryRecord]
    bias: list[torch.Tensor] | None = None
    """FLAP bias compensation added to each layer's down_proj output (one-shot FLAP runs only)."""

    @property
    def domains(self) -> list[str]:
        return list(self.manifest["domains"])

    @property
    def target_sparsity(self) -> float:
        return float(self.manifest["target_sparsity"])

    @property
    def reference(self) -> Run | None:
        ref = self.path / "reference"
        return load_run(ref) if (ref / "koff.json").is_file() else None


def memory_record(km, name: str, info: dict | None = None) -> MemoryRecord:
    """Snapshot one memory of a KoffModel."""
    return MemoryRecord(name=name, parts=km.snapshot_memory(name), info=dict(info or {}))


# -- writing -------------------------------------------------------------------------------------
def write_memory(folder: Path, rec: MemoryRecord, base_source: str | None = None,
                 extra: dict[str, bytes] | None = None) -> dict[str, str]:
    """Write one memory's files into `folder` (which must exist and be empty); returns hashes.
    Each part writes its own files and memory.json section (under its kind's name); `extra` files
    (e.g. the memory's training metrics) are written and hashed alongside."""
    from .memory import PART_KINDS

    for fname, data in (extra or {}).items():
        (folder / fname).write_bytes(data)
    sections = {kind: (rec.parts[kind].save(folder, base_source) if kind in rec.parts else None) for kind in PART_KINDS}
    files = {f.name: sha256_file(f) for f in sorted(folder.iterdir())}
    manifest = {
        "format": MEMORY_FORMAT,
        "format_version": FORMAT_VERSION,
        "koff_version": __version__,
        "name": rec.name,
        **sections,
        "files": files,
        **{k: v for k, v in rec.info.items() if k not in ("name", "files", "format", *PART_KINDS)},
    }
    (folder / "memory.json").write_text(json.dumps(manifest, indent=2))
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
              memories: list[MemoryRecord], config_yaml: str, bias: list[torch.Tensor] | None = None) -> None:
    """Write a complete run into a temporary folder (which may already hold metrics.jsonl).
    koff.json lists the sha256 of every backbone-level file."""
    folder = Path(folder)
    (folder / "config.yaml").write_text(config_yaml)
    if keep is not None:
        save_mask(folder / "backbone", keep, log_alpha, bias)
    for rec in memories:
        d = folder / "memories" / rec.name
        d.mkdir(parents=True)
        write_memory(d, rec, manifest.get("base_model", {}).get("source"))
    files = {}
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder).as_posix()
        if f.is_file() and not rel.startswith(("memories/", "reference/", "eval/", "checkpoint/", ".")):
            files[rel] = sha256_file(f)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "koff_version": __version__, **manifest,
                "files": files}
    (folder / "koff.json").write_text(json.dumps(manifest, indent=2))


def add_memory(run_dir: Path, rec: MemoryRecord, base_source: str | None = None, overwrite: bool = False,
               extra: dict[str, bytes] | None = None) -> Path:
    """Add (or with `overwrite`, replace) one memory in an existing run; other files are untouched."""
    final = Path(run_dir) / "memories" / rec.name
    with atomic_directory(final, overwrite=overwrite) as tmp:
        write_memory(tmp, rec, base_source, extra)
    return final


# -- reading and validation ----------------------------------------------------------------------
def read_json(path: Path) -> dict:
    """A JSON object from `path`; errors name the file."""
    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    return data


def require(obj: dict, key: str, types, where: str):
    """`obj[key]`, which must exist and be of `types` (a bool is not an int here)."""
    if key not in obj:
        raise ArtifactError(f"{where}: missing field '{key}'")
    v = obj[key]
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,))):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise ArtifactError(f"{where}: field '{key}' must be {names}, got {type(v).__name__} {v!r}")
    return v


def load_tensors(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file. With `dtype`, every tensor must have exactly that dtype
    (the one the format specifies) and, being floating point, hold no NaN or Inf."""
    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path}: not a readable safetensors file ({e})") from None
    if dtype is not None:
        for key, t in tensors.items():
            if t.dtype != dtype:
                raise ArtifactError(f"{path}: tensor {key!r} is {str(t.dtype).removeprefix('torch.')}, "
                                    f"the format stores {str(dtype).removeprefix('torch.')}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ArtifactError(f"{path}: tensor {key!r} holds NaN or Inf values")
    return tensors


_read_json, _require, _load_tensors = read_json, require, load_tensors


def _check_hashes(folder: Path, files: dict, where: str) -> None:
    for rel, digest in files.items():
        p = folder / rel
        if not p.is_file():
            raise ArtifactError(f"{where}: lists {rel}, which is missing from {folder}")
        if sha256_file(p) != digest:
            raise ArtifactError(f"{p}: contents changed since koff wrote it (sha256 differs from {where})")


def _check_format(data: dict, fmt: str, where: str) -> None:
    if data.get("format") != fmt:
        raise ArtifactError(f"{where}: field 'format' must be {fmt!r}, got {data.get('format')!r}")
    version = _require(data, "format_version", int, where)
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{where}: format_version {version} was written by a newer koff "
                            f"(this koff {__version__} reads up to {FORMAT_VERSION}); upgrade koff")
    if version < 1:
        raise ArtifactError(f"{where}: format_version must be >= 1, got {version}")


def load_memory(folder: Path, geometry: Geometry) -> MemoryRecord:
    """Read and validate one memory folder against the base model's geometry."""
    from .memory import STATE_CLASSES

    where = str(folder / "memory.json")
    data = _read_json(folder / "memory.json")
    _check_format(data, MEMORY_FORMAT, where)
    name = _require(data, "name", str, where)
    if name != folder.name:
        raise ArtifactError(f"{where}: field 'name' is {name!r} but the folder is {folder.name!r}")
    files = _require(data, "files", dict, where)
    _check_hashes(folder, files, where)
    rec = MemoryRecord(name=name, info={k: v for k, v in data.items()
                                        if k not in ("format", "format_version", "koff_version", "name", "files",
                                                     *STATE_CLASSES)})
    for kind, cls in STATE_CLASSES.items():
        section = data.get(kind)
        if section is None:
            continue
        if not isinstance(section, dict):
            raise ArtifactError(f"{where}: field {kind!r} must be an object or null")
        state = cls.load(folder, section, where)
        if kind == "kv":
            state.check_geometry(geometry, folder / "kv.safetensors")
        rec.parts[kind] = state
    if not rec.parts:
        raise ArtifactError(f"{where}: memory holds no part ({' / '.join(STATE_CLASSES)})")
    return rec


def geometry_from_manifest(base: dict, where: str) -> Geometry:
    layers = _require(base, "num_layers", int, where)
    widths = _require(base, "intermediate_sizes", list, where)
    if len(widths) != layers or not all(isinstance(w, int) and w >= 0 for w in widths):
        raise ArtifactError(f"{where}: 'intermediate_sizes' must list {layers} non-negative integers")
    return Geometry(num_layers=layers, hidden_size=_require(base, "hidden_size", int, where),
                    intermediate_sizes=tuple(widths), num_kv_heads=_require(base, "num_kv_heads", int, where),
                    head_dim=_require(base, "head_dim", int, where),
                    architecture=_require(base, "architecture", str, where),
                    model_type=_require(base, "model_type", str, where))


def load_run(path: Path) -> Run:
    """Read a run directory, validating every field, hash and tensor shape."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"run directory {path} does not exist")
    where = str(path / "koff.json")
    m = _read_json(path / "koff.json")
    _check_format(m, FORMAT, where)
    _require(m, "koff_version", str, where)
    base = _require(m, "base_model", dict, where)
    fp = _require(base, "fingerprint", str, f"{where} base_model")
    if not fp.startswith("sha256:"):
        raise ArtifactError(f"{where}: base_model.fingerprint must start with 'sha256:', got {fp!r}")
    geometry = geometry_from_manifest(base, f"{where} base_model")
    target = _require(m, "target_sparsity", (int, float), where)
    if not 0 <= target < 1:
        raise ArtifactError(f"{where}: target_sparsity must be in [0, 1), got {target}")
    pruned = _require(m, "pruned", bool, where)
    domains = _require(m, "domains", list, where)
    if not all(isinstance(d, str) for d in domains):
        raise ArtifactError(f"{where}: 'domains' must be a list of names")
    _require(m, "sparsity", dict, where)
    _require(m, "training", dict, where)
    files = _require(m, "files", dict, where)
    _check_hashes(path, files, where)

    keep = log_alpha = bias = None
    if pruned:
        tensors = _load_tensors(path / "backbone" / "mask.safetensors")
        keep = []
        for i, width in enumerate(geometry.intermediate_sizes):
            key = f"layers.{i}.keep"
            t = tensors.get(key)
            if t is None:
                raise ArtifactError(f"{path / 'backbone/mask.safetensors'}: missing tensor {key!r}")
            if list(t.shape) != [width]:
                raise ArtifactError(f"{path / 'backbone/mask.safetensors'}: tensor {key!r} has shape {list(t.shape)}, "
                                    f"expected [{width}]")
            if not bool(((t == 0) | (t == 1)).all()):
                raise ArtifactError(f"{path / 'backbone/mask.safetensors'}: tensor {key!r} holds values other than 0/1")
            keep.append(t.bool())
        if (path / "backbone" / "gates.safetensors").is_file():
            g = _load_tensors(path / "backbone" / "gates.safetensors")
            log_alpha = []
            for i, width in enumerate(geometry.intermediate_sizes):
                t = g.get(f"layers.{i}.log_alpha")
                if t is None or list(t.shape) != [width]:
                    raise ArtifactError(f"{path / 'backbone/gates.safetensors'}: tensor 'layers.{i}.log_alpha' "
                                        f"missing or not of shape [{width}]")
                log_alpha.append(t)
        if (path / "backbone" / "bias.safetensors").is_file():
            b = _load_tensors(path / "backbone" / "bias.safetensors")
            bias = []
            for i in range(geometry.num_layers):
                t = b.get(f"layers.{i}.down_bias")
                if t is None or list(t.shape) != [geometry.hidden_size]:
                    raise ArtifactError(f"{path / 'backbone/bias.safetensors'}: tensor 'layers.{i}.down_bias' "
                                        f"missing or not of shape [{geometry.hidden_size}]")
                bias.append(t)

    memories = {}
    mem_root = path / "memories"
    if mem_root.is_dir():
        for d in sorted(mem_root.iterdir()):
            if d.is_dir() and not d.name.startswith("."):
                memories[d.name] = load_memory(d, geometry)
    mem_cfg = m["training"].get("memory", {})
    if mem_cfg.get("lora_rank", 0) or mem_cfg.get("kv_tokens", 0):
        missing = [d for d in domains if d not in memories]
        if missing:
            raise ArtifactError(f"{path}: domains {missing} are listed in koff.json but have no memories/<name> folder")
    return Run(path=path, manifest=m, keep=keep, log_alpha=log_alpha, memories=memories, bias=bias)


def check_base(run: Run, source: str, fingerprint: str) -> None:
    """Refuse to apply a run to a base model other than the one it was made from."""
    want = run.manifest["base_model"]["fingerprint"]
    if fingerprint != want:
        raise ArtifactError(
            f"{run.path / 'koff.json'}: made from base model {run.manifest['base_model'].get('source')!r} "
            f"(fingerprint {want[:19]}…), but the model given is {source!r} (fingerprint {fingerprint[:19]}…); "
            "a mask and memories only fit the exact base model they were trained on")


def attach_memory(km, rec: MemoryRecord, where: Path | None = None) -> None:
    """Add a stored memory to a KoffModel (validated against the model's shapes)."""
    where = where or Path(rec.name)
    for state in rec.parts.values():
        state.check(km.model, where)
    km.install_memory(rec.name, rec.parts)


def build_model(run: Run, model: str | None = None, memories: list[str] | None = None, runtime=None):
    """Rebuild the decomposed model of a run: `(KoffModel, tokenizer)`.

    The base model is loaded from `model` (default: the source recorded in koff.json) and must
    have the recorded fingerprint. The backbone mask is applied; `memories` selects which
    memories to attach (default: all). `runtime` (a `koff.runtime.Runtime`) gives the device and
    base-weight dtype (default: float32 on the CPU).
    """
    from .base import fingerprint, load_base
    from .gates import NeuronGates
    from .model import KoffModel

    dtype = runtime.dtype if runtime is not None else torch.float32
    base, tok, source = load_base(model or run.manifest["base_model"]["source"], dtype=dtype)
    check_base(run, source, fingerprint(source))
    gates = None
    if run.keep is not None:
        gates = NeuronGates.for_model(base, init=run.log_alpha if run.log_alpha is not None else 3.0)
        gates.set_mask(run.keep)
        gates.set_bias(run.bias)
        gates.requires_grad_(False)
    km = KoffModel(base, gates)
    for name in memories if memories is not None else list(run.memories):
        if name not in run.memories:
            raise ArtifactError(f"{run.path}: no memory named {name!r}; have {sorted(run.memories)}")
        attach_memory(km, run.memories[name], run.path / "memories" / name)
    if runtime is not None:
        km.to(runtime.device)
    return km, tok

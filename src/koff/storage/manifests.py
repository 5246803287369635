"""koff's manifests, typed: one dataclass per on-disk format, each with `from_dict` (which
validates every field it reads and names the file and field at fault) and `to_dict` (what the
writer stores), so that readers use attributes instead of string keys and loading checks once.

    RunManifest        RUN/koff.json
    MemoryManifest     RUN/memories/NAME/memory.json (a part section each: lora.LoraSection, kv.KVSection)
    CheckpointManifest CHECKPOINT/state.json
    CellRecord         RESULTS/cells/ID.json (koff compare)

Integrity follows from the format, not from the manifest's own word: `RunManifest.required_files`
and `MemoryManifest.required_files` are the files a run or memory of that shape must hold, and
`files` must list exactly those (an emptied or shortened map is an error; a path outside the
folder cannot be listed at all). Fields koff does not know are kept as they are (`extra`) and
written back unchanged: nothing reads them, and a manifest written by a later koff of the same
format version may carry them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from koff.config.recipe import FORMER_DEFAULTS, MASKS, MemoryConfig, TrainConfig
from koff.core.errors import ArtifactError, ConfigError
from koff.core.fields import from_mapping, integer, number, optional, require, short, str_list
from koff.core.names import check_memory_name
from koff.core.version import __version__
from koff.data.text import Domain, file_sha256
from koff.model.base_model import Geometry
from koff.model.memory import STATE_CLASSES

RUN_FORMAT = "koff.run"
MEMORY_FORMAT = "koff.memory"
CHECKPOINT_FORMAT = "koff.checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_VERSION = 2
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _memory_name(name: str, where: str) -> str:

    try:
        return check_memory_name(name, where)
    except ConfigError as e:
        raise ArtifactError(str(e)) from None


def _files(obj: dict, where: str) -> dict[str, str]:
    files = require(obj, "files", dict, where)
    for rel, digest in files.items():
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ArtifactError(f"{where}: files[{rel!r}] must be a sha256 (64 lowercase hex digits), got {short(digest)}")
    return dict(files)


def check_files(files: dict[str, str], required: set[str], where: str) -> None:
    """The `files` map must list exactly the files the format requires."""
    missing = sorted(required - set(files))
    unknown = sorted(set(files) - required)
    if missing:
        raise ArtifactError(f"{where}: field 'files' does not list {missing}, which this format requires "
                            "(the manifest was edited; koff checks every file it loads)")
    if unknown:
        raise ArtifactError(f"{where}: field 'files' lists {unknown}, which are not part of this format "
                            f"(expected exactly {sorted(required)})")


def _format(data: dict, fmt: str, where: str, newest: int = FORMAT_VERSION) -> int:
    if not isinstance(data, dict):
        raise ArtifactError(f"{where}: expected a JSON object")
    if data.get("format") != fmt:
        raise ArtifactError(f"{where}: field 'format' must be {fmt!r}, got {short(data.get('format'))}")
    version = require(data, "format_version", int, where)
    if version > newest:
        raise ArtifactError(f"{where}: format_version {version} was written by a newer koff "
                            f"(this koff {__version__} reads up to {newest}); upgrade koff")
    if version < 1:
        raise ArtifactError(f"{where}: format_version must be >= 1, got {version}")
    return version


def _extra(data: dict, known) -> dict:
    return {k: v for k, v in data.items() if k not in known}


# -- shared records ------------------------------------------------------------------------------
@dataclass(frozen=True)
class BaseModelInfo:
    """The base model a run was made from: where it was, its fingerprint, its geometry."""

    source: str
    fingerprint: str
    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_sizes: tuple[int, ...]
    num_kv_heads: int
    head_dim: int

    GEOMETRY = ("num_layers", "hidden_size", "intermediate_sizes", "num_kv_heads", "head_dim")

    @classmethod
    def from_dict(cls, d: dict, where: str) -> BaseModelInfo:
        fp = require(d, "fingerprint", str, where)
        if not fp.startswith("sha256:") or not _SHA256.fullmatch(fp[7:]):
            raise ArtifactError(f"{where}: field 'fingerprint' must start with 'sha256:' and then hold 64 hex digits, got {short(fp)}")
        layers = integer(d, "num_layers", where, 1)
        widths = require(d, "intermediate_sizes", list, where)
        if len(widths) != layers or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
            raise ArtifactError(f"{where}: field 'intermediate_sizes' must list {layers} positive integers (num_layers), "
                                f"got {short(widths)}")
        return cls(source=require(d, "source", str, where), fingerprint=fp,
                   architecture=require(d, "architecture", str, where), model_type=require(d, "model_type", str, where),
                   num_layers=layers, hidden_size=integer(d, "hidden_size", where, 1), intermediate_sizes=tuple(widths),
                   num_kv_heads=integer(d, "num_kv_heads", where, 1), head_dim=integer(d, "head_dim", where, 1))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["intermediate_sizes"] = list(self.intermediate_sizes)
        return d

    def geometry(self):

        return Geometry(num_layers=self.num_layers, hidden_size=self.hidden_size,
                        intermediate_sizes=tuple(self.intermediate_sizes), num_kv_heads=self.num_kv_heads,
                        head_dim=self.head_dim, architecture=self.architecture, model_type=self.model_type)

    def check_model(self, geo, where: str, source: str) -> None:
        """The geometry recorded here must be that of the base model actually loaded."""
        for key in self.GEOMETRY:
            want, got = getattr(self, key), getattr(geo, key)
            if key == "intermediate_sizes":
                want, got = list(want), list(got)
            if want != got:
                raise ArtifactError(f"{where}: base_model.{key} is {want}, but the base model loaded from {source} has "
                                    f"{got} (the manifest was edited, or the model is not the one the run was made from)")


@dataclass(frozen=True)
class DomainRecord:
    """One domain's files as recorded in a manifest, with the sha256 of its test files (so the
    test-leak guard works even once the test files are gone)."""

    name: str
    train: tuple[str, ...]
    test: tuple[str, ...] = ()
    valid: tuple[str, ...] = ()
    text_field: str = "text"
    test_subsets: dict[str, int] = field(default_factory=dict)
    test_sha256: tuple[str, ...] | None = None

    @classmethod
    def from_dict(cls, d: dict, where: str) -> DomainRecord:
        if not isinstance(d, dict):
            raise ArtifactError(f"{where}: expected an object with the domain's files, got {type(d).__name__}")
        subsets = optional(d, "test_subsets", dict, where, {})
        for k, v in subsets.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ArtifactError(f"{where}: test_subsets[{k!r}] must be a number of lines >= 0, got {short(v)}")
        test = str_list(d, "test", where, required=False)
        hashes = optional(d, "test_sha256", list, where)
        if hashes is not None and (len(hashes) != len(test) or not all(isinstance(h, str) and _SHA256.fullmatch(h)
                                                                        for h in hashes)):
            raise ArtifactError(f"{where}: field 'test_sha256' must list one sha256 per test file ({len(test)})")
        return cls(name=require(d, "name", str, where), train=tuple(str_list(d, "train", where)), test=tuple(test),
                   valid=tuple(str_list(d, "valid", where, required=False)),
                   text_field=optional(d, "text_field", str, where, "text"), test_subsets=dict(subsets),
                   test_sha256=None if hashes is None else tuple(hashes))

    def to_dict(self) -> dict:
        d = {"name": self.name, "train": list(self.train), "test": list(self.test), "valid": list(self.valid),
             "text_field": self.text_field, "test_subsets": dict(self.test_subsets)}
        if self.test_sha256 is not None:
            d["test_sha256"] = list(self.test_sha256)
        return d

    @classmethod
    def of(cls, domain, hashes: bool = True) -> DomainRecord:
        """The record of a `koff.data.Domain` (with its test files' sha256)."""

        train = tuple(str(p) for p in domain.train) + tuple(s.describe() for s in getattr(domain, "datasets", ()))
        return cls(name=domain.name, train=train, test=tuple(str(p) for p in domain.test),
                   valid=tuple(str(p) for p in domain.valid), text_field=domain.text_field,
                   test_subsets=dict(domain.test_subsets),
                   test_sha256=tuple(file_sha256(p) for p in domain.test) if hashes else None)

    def domain(self):
        """As a `koff.data.Domain` (paths as recorded)."""
        from pathlib import Path


        return Domain(name=self.name, train=[Path(p) for p in self.train], test=[Path(p) for p in self.test],
                      valid=[Path(p) for p in self.valid], text_field=self.text_field,
                      test_subsets=dict(self.test_subsets))


@dataclass(frozen=True)
class TrainingRecord:
    """The configuration a run was trained with (koff.json `training`): its memory and train
    sections typed and validated, the rest (domains, files, output) kept as recorded."""

    memory: MemoryConfig
    train: TrainConfig
    mask: str = "learned"
    prune: bool = True
    reference: bool = True
    rest: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> TrainingRecord:

        if not isinstance(d, dict):
            raise ArtifactError(f"{where}: expected an object, got {type(d).__name__}")
        sections: dict[str, Any] = {}
        for key, section_cls in (("memory", MemoryConfig), ("train", TrainConfig)):
            raw = require(d, key, dict, where)
            if key == "train":  # written by a koff before the field existed: what it meant then
                raw = {**FORMER_DEFAULTS, **raw}
            try:
                sections[key] = from_mapping(section_cls, raw, f"{where}.{key}")
                sections[key].validate(f"{where}.{key}")
            except ConfigError as e:
                raise ArtifactError(str(e)) from None
        mask = optional(d, "mask", str, where, "learned")
        if mask not in MASKS:
            raise ArtifactError(f"{where}: field 'mask' must be one of {MASKS}, got {short(mask)}")
        return cls(memory=sections["memory"], train=sections["train"], mask=mask,
                   prune=optional(d, "prune", bool, where, True), reference=optional(d, "reference", bool, where, True),
                   rest=_extra(d, ("memory", "train", "mask", "prune", "reference")))

    def to_dict(self) -> dict:
        return {**self.rest, "memory": dataclasses.asdict(self.memory), "train": dataclasses.asdict(self.train),
                "reference": self.reference, "prune": self.prune, "mask": self.mask}


@dataclass(frozen=True)
class Sparsity:
    """How much of the base model the mask removes (koff.gates.sparsity_report)."""

    ffn: float
    global_: float
    global_without_embeddings: float
    rest: dict = field(default_factory=dict)

    KEYS = ("ffn", "global", "global_without_embeddings")

    @classmethod
    def from_dict(cls, d: dict, where: str) -> Sparsity:
        if not isinstance(d, dict):
            raise ArtifactError(f"{where}: expected an object, got {type(d).__name__}")
        ffn, global_, without_embeddings = (number(d, k, where, 0.0, 1.0) for k in cls.KEYS)
        return cls(ffn, global_, without_embeddings, rest=_extra(d, cls.KEYS))

    def to_dict(self) -> dict:
        return {**self.rest, "ffn": self.ffn, "global": self.global_,
                "global_without_embeddings": self.global_without_embeddings}

    def __getitem__(self, key: str) -> float:
        """`sparsity["global"]`: the report's own names."""
        return self.to_dict()[key]


@dataclass(frozen=True)
class TrainMetrics:
    """The training loop's summary (koff.trainer.Trainer.train)."""

    steps: int
    seconds: float
    steps_run: int | None = None
    rest: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> TrainMetrics:
        if not isinstance(d, dict):
            raise ArtifactError(f"{where}: expected an object, got {type(d).__name__}")
        steps_run = optional(d, "steps_run", int, where)
        return cls(steps=integer(d, "steps", where, 0), seconds=number(d, "seconds", where, 0.0),
                   steps_run=steps_run, rest=_extra(d, ("steps", "seconds", "steps_run")))

    def to_dict(self) -> dict:
        d = {"steps": self.steps, **({"steps_run": self.steps_run} if self.steps_run is not None else {}),
             "seconds": self.seconds, **self.rest}
        return d


# -- RUN/koff.json -------------------------------------------------------------------------------
_RUN_KEYS = ("format", "format_version", "koff_version", "base_model", "target_sparsity", "pruned", "sparsity",
             "domains", "default_memory", "data", "training", "runtime", "metrics", "files")


@dataclass(frozen=True)
class RunManifest:
    """RUN/koff.json."""

    koff_version: str
    base_model: BaseModelInfo
    target_sparsity: float
    pruned: bool
    sparsity: Sparsity
    domains: tuple[str, ...]
    training: TrainingRecord
    metrics: TrainMetrics
    files: dict[str, str]
    data: dict[str, DomainRecord] = field(default_factory=dict)
    general: tuple[str, ...] = ()
    default_memory: str | None = None
    runtime: dict | None = None
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    @property
    def mask(self) -> str:
        return self.training.mask

    @property
    def backbone_lora(self) -> bool:
        """Whether the run's backbone has a shared LoRA adapter (`train.backbone_lora_rank`)."""
        return self.pruned and bool(self.training.train.backbone_lora_rank)

    @staticmethod
    def files_for(pruned: bool, mask: str, backbone_lora: bool = False) -> set[str]:
        """The files a run holds at its top level (its memories list their own): config and
        metrics, and for a pruned run the mask and gates (plus FLAP's bias compensation and the
        backbone's shared LoRA adapter, where it has them)."""
        files = {"config.yaml", "metrics.jsonl"}
        if pruned:
            files |= {"backbone/mask.safetensors", "backbone/gates.safetensors"}
            if mask == "flap":
                files.add("backbone/bias.safetensors")
            if backbone_lora:
                files |= {"backbone/adapter_config.json", "backbone/adapter_model.safetensors"}
        return files

    def required_files(self) -> set[str]:
        return self.files_for(self.pruned, self.training.mask, self.backbone_lora)

    @classmethod
    def from_dict(cls, d: dict, where: str = "koff.json") -> RunManifest:
        version = _format(d, RUN_FORMAT, where)
        target = number(d, "target_sparsity", where)
        if not 0 <= target < 1:
            raise ArtifactError(f"{where}: target_sparsity must be in [0, 1), got {target}")
        domains = str_list(d, "domains", where)
        for name in domains:
            _memory_name(name, f"{where}: domains")
        if len(set(domains)) != len(domains):
            raise ArtifactError(f"{where}: field 'domains' lists a name twice: {domains}")
        default = optional(d, "default_memory", str, where)
        if default is not None:
            _memory_name(default, f"{where}: default_memory")
        data, general = {}, ()
        raw_data = optional(d, "data", dict, where, {})
        for name, rec in raw_data.items():
            if name == "general" and isinstance(rec, list):
                if not all(isinstance(p, str) for p in rec):
                    raise ArtifactError(f"{where}: data.general must be a list of file paths")
                general = tuple(rec)
            else:
                data[name] = DomainRecord.from_dict(rec, f"{where}: data.{name}")
        m = cls(koff_version=require(d, "koff_version", str, where),
                base_model=BaseModelInfo.from_dict(require(d, "base_model", dict, where), f"{where}: base_model"),
                target_sparsity=target, pruned=require(d, "pruned", bool, where),
                sparsity=Sparsity.from_dict(require(d, "sparsity", dict, where), f"{where}: sparsity"),
                domains=tuple(domains),
                training=TrainingRecord.from_dict(require(d, "training", dict, where), f"{where}: training"),
                metrics=TrainMetrics.from_dict(require(d, "metrics", dict, where), f"{where}: metrics"),
                files=_files(d, where), data=data, general=general, default_memory=default,
                runtime=optional(d, "runtime", dict, where), format_version=version, extra=_extra(d, _RUN_KEYS))
        if m.pruned and not m.training.prune:
            raise ArtifactError(f"{where}: field 'pruned' is true but training.prune is false")
        if not m.pruned and m.target_sparsity:
            raise ArtifactError(f"{where}: a run without a mask (pruned: false) must have target_sparsity 0, "
                                f"got {m.target_sparsity}")
        check_files(m.files, m.required_files(), where)
        return m

    def to_dict(self) -> dict:
        data: dict[str, Any] = {name: rec.to_dict() for name, rec in self.data.items()}
        if self.general or "general" not in data:
            data["general"] = list(self.general)
        d = {"format": RUN_FORMAT, "format_version": self.format_version, "koff_version": self.koff_version,
             "base_model": self.base_model.to_dict(), "target_sparsity": self.target_sparsity, "pruned": self.pruned,
             "sparsity": self.sparsity.to_dict(), "domains": list(self.domains), "default_memory": self.default_memory,
             "data": data, "training": self.training.to_dict()}
        if self.runtime is not None:
            d["runtime"] = self.runtime
        d["metrics"] = self.metrics.to_dict()
        return {**d, **self.extra, "files": dict(self.files)}


# -- RUN/memories/NAME/memory.json ---------------------------------------------------------------
_MEMORY_KEYS = ("format", "format_version", "koff_version", "name", "files", "domain", "data", "added_after",
                "trained_steps", "metrics", "general")


@dataclass(frozen=True)
class MemoryManifest:
    """RUN/memories/NAME/memory.json: what the memory holds (one typed section per part kind,
    e.g. lora.LoraSection, kv.KVSection) and the sha256 of its files."""

    name: str
    parts: dict[str, Any]
    files: dict[str, str]
    koff_version: str = __version__
    domain: str | None = None
    data: DomainRecord | None = None
    added_after: bool = False
    trained_steps: int | None = None
    metrics: dict | None = None
    general: tuple[str, ...] | None = None
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    EXTRA_FILES = ("metrics.jsonl",)
    """Files a memory trained by `koff add-domain` holds besides its parts' (its training metrics)."""

    def required_files(self) -> set[str]:

        files = {f for kind in self.parts for f in STATE_CLASSES[kind].FILES}
        if self.added_after:
            files |= set(self.EXTRA_FILES)
        return files

    @classmethod
    def from_dict(cls, d: dict, where: str = "memory.json") -> MemoryManifest:

        version = _format(d, MEMORY_FORMAT, where)
        name = _memory_name(require(d, "name", str, where), f"{where}: name")
        parts = {}
        for kind, state_cls in STATE_CLASSES.items():
            section = d.get(kind)
            if section is None:
                continue
            if not isinstance(section, dict):
                raise ArtifactError(f"{where}: field {kind!r} must be an object or null, got {type(section).__name__}")
            parts[kind] = state_cls.parse_section(section, f"{where} {kind}")
        if not parts:
            raise ArtifactError(f"{where}: memory holds no part ({' / '.join(STATE_CLASSES)})")
        raw_data = optional(d, "data", dict, where)
        general = optional(d, "general", list, where)
        if general is not None and not all(isinstance(p, str) for p in general):
            raise ArtifactError(f"{where}: field 'general' must be a list of file paths")
        m = cls(name=name, parts=parts, files=_files(d, where), koff_version=require(d, "koff_version", str, where),
                domain=optional(d, "domain", str, where),
                data=None if raw_data is None else DomainRecord.from_dict(raw_data, f"{where}: data"),
                added_after=optional(d, "added_after", bool, where, False),
                trained_steps=optional(d, "trained_steps", int, where), metrics=optional(d, "metrics", dict, where),
                general=None if general is None else tuple(general), format_version=version,
                extra=_extra(d, (*_MEMORY_KEYS, *STATE_CLASSES)))
        check_files(m.files, m.required_files(), where)
        return m

    def to_dict(self) -> dict:

        d = {"format": MEMORY_FORMAT, "format_version": self.format_version, "koff_version": self.koff_version,
             "name": self.name}
        for kind in STATE_CLASSES:
            d[kind] = self.parts[kind].to_dict() if kind in self.parts else None
        d["files"] = dict(self.files)
        for key in ("domain", "data", "added_after", "trained_steps", "metrics", "general"):
            v = getattr(self, key)
            if key == "added_after" and not v:
                continue
            if v is not None:
                d[key] = v.to_dict() if key == "data" else (list(v) if key == "general" else v)
        return {**d, **self.extra}

    @property
    def info(self) -> dict:
        """The fields besides format, name, parts and files, as stored."""
        d = self.to_dict()

        return {k: v for k, v in d.items() if k not in ("format", "format_version", "koff_version", "name", "files",
                                                          *STATE_CLASSES)}


# -- CHECKPOINT/state.json -----------------------------------------------------------------------
_NODE_KEYS = ("__tensor__", "__dict__", "__items__", "__list__")


def _check_node(node, where: str, refs: list[str], depth: int = 0) -> None:
    if depth > 64:
        raise ArtifactError(f"{where}: nested deeper than any trainer state")
    if node is None or isinstance(node, (bool, int, str)):
        return
    if isinstance(node, float):
        return  # loss values may be NaN/inf in a diverged run's history; they are data, not tensors
    if not isinstance(node, dict) or len(node) != 1 or next(iter(node)) not in _NODE_KEYS:
        raise ArtifactError(f"{where}: malformed state node {short(node)} (expected one of {_NODE_KEYS})")
    key, value = next(iter(node.items()))
    if key == "__tensor__":
        if not isinstance(value, str):
            raise ArtifactError(f"{where}: a tensor reference must be a string, got {short(value)}")
        refs.append(value)
    elif key == "__dict__":
        if not isinstance(value, dict):
            raise ArtifactError(f"{where}: '__dict__' must hold an object")
        for v in value.values():
            _check_node(v, where, refs, depth + 1)
    else:
        if not isinstance(value, list):
            raise ArtifactError(f"{where}: {key!r} must hold a list")
        for item in value:
            if key == "__items__":
                if not isinstance(item, list) or len(item) != 2:
                    raise ArtifactError(f"{where}: '__items__' entries must be [key, value] pairs")
                _check_node(item[1], where, refs, depth + 1)
            else:
                _check_node(item, where, refs, depth + 1)


@dataclass(frozen=True)
class CheckpointManifest:
    """CHECKPOINT/state.json: the trainer's state with each tensor replaced by a reference into
    tensors.safetensors (koff.checkpoint)."""

    state: Any
    tensor_refs: tuple[str, ...] = ()
    format_version: int = CHECKPOINT_VERSION

    @classmethod
    def from_dict(cls, d: dict, where: str = "state.json") -> CheckpointManifest:
        if not isinstance(d, dict) or d.get("format") != CHECKPOINT_FORMAT or d.get("format_version") != CHECKPOINT_VERSION:
            got = (d.get("format"), d.get("format_version")) if isinstance(d, dict) else (type(d).__name__, None)
            raise ArtifactError(f"{where}: a checkpoint of another format ({short(got[0])} version {short(got[1])}; "
                                f"this koff writes {CHECKPOINT_FORMAT!r} version {CHECKPOINT_VERSION})")
        if "state" not in d:
            raise ArtifactError(f"{where}: missing field 'state'")
        refs: list[str] = []
        _check_node(d["state"], where, refs)
        return cls(state=d["state"], tensor_refs=tuple(refs), format_version=d["format_version"])

    def to_dict(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "format_version": self.format_version, "state": self.state}


# -- RESULTS/cells/ID.json -----------------------------------------------------------------------
def _ppl_row(row, where: str) -> None:
    if not isinstance(row, dict) or "backbone" not in row:
        raise ArtifactError(f"{where}: expected an object with 'backbone' (and 'own') perplexities")
    for which, scores in row.items():
        if not isinstance(scores, dict) or not isinstance(scores.get("test"), dict):
            raise ArtifactError(f"{where}.{which}: expected an object with a 'test' score")
        for subset, s in scores.items():
            if not isinstance(s, dict):
                raise ArtifactError(f"{where}.{which}.{subset}: expected an object with 'ppl' and 'tokens'")
            number(s, "ppl", f"{where}.{which}.{subset}", 1.0)
            integer(s, "tokens", f"{where}.{which}.{subset}", 0)


_CELL_KEYS = ("id", "method", "group", "seed", "kind", "setting", "config", "train", "ppl", "tasks", "sparsity",
              "deterministic", "kept_fraction_per_layer", "curves", "swap")


@dataclass(frozen=True)
class CellRecord:
    """One cell of `koff compare`: how it was trained and what it scored."""

    id: str
    method: str
    group: str
    seed: int
    kind: str
    setting: dict
    config: dict
    train: dict
    ppl: dict
    tasks: dict
    sparsity: dict
    deterministic: bool = False
    kept_fraction_per_layer: list | None = None
    curves: dict = field(default_factory=dict)
    swap: dict | None = None
    rest: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, where: str = "cell") -> CellRecord:
        if not isinstance(d, dict):
            raise ArtifactError(f"{where}: expected a JSON object, got {type(d).__name__}")
        train = require(d, "train", dict, where)
        integer(train, "steps", f"{where}: train", 0)
        integer(train, "tokens", f"{where}: train", 0)
        number(train, "seconds", f"{where}: train", 0.0)
        ppl = require(d, "ppl", dict, where)
        for domain, row in ppl.items():
            _ppl_row(row, f"{where}: ppl.{domain}")
        sparsity = require(d, "sparsity", dict, where)
        for key in ("ffn", "global"):
            number(sparsity, key, f"{where}: sparsity", 0.0, 1.0, required=False)
        tasks = optional(d, "tasks", dict, where, {})
        for name, t in tasks.items():
            if not isinstance(t, dict):
                raise ArtifactError(f"{where}: tasks.{name} must be an object")
            for key in ("acc", "acc_norm", "solution_ppl"):
                number(t, key, f"{where}: tasks.{name}", 0.0, required=False)
        kept = optional(d, "kept_fraction_per_layer", list, where)
        if kept is not None and not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1
                                        for x in kept):
            raise ArtifactError(f"{where}: kept_fraction_per_layer must list fractions in [0, 1]")
        curves = optional(d, "curves", dict, where, {})
        for key, values in curves.items():
            if not isinstance(values, list):
                raise ArtifactError(f"{where}: curves.{key} must be a list")
        swap = optional(d, "swap", dict, where)
        if swap is not None:
            mems, doms = str_list(swap, "memories", f"{where}: swap"), str_list(swap, "domains", f"{where}: swap")
            test = require(swap, "test", list, f"{where}: swap")
            if len(test) != len(mems) or not all(isinstance(r, list) and len(r) == len(doms) for r in test):
                raise ArtifactError(f"{where}: swap.test must be a {len(mems)} x {len(doms)} matrix")
        config = require(d, "config", dict, where)
        if not isinstance(config.get("train", {}), dict):
            raise ArtifactError(f"{where}: config.train must be an object")
        return cls(id=require(d, "id", str, where), method=require(d, "method", str, where),
                   group=require(d, "group", str, where), seed=require(d, "seed", int, where),
                   kind=require(d, "kind", str, where), setting=optional(d, "setting", dict, where, {}),
                   config=config, train=train, ppl=ppl, tasks=tasks, sparsity=sparsity,
                   deterministic=optional(d, "deterministic", bool, where, False), kept_fraction_per_layer=kept,
                   curves=curves, swap=swap, rest=_extra(d, _CELL_KEYS))

    def to_dict(self) -> dict:
        return {"id": self.id, "method": self.method, "group": self.group, "seed": self.seed, "setting": self.setting,
                "deterministic": self.deterministic, "kind": self.kind, "config": self.config, "train": self.train,
                "kept_fraction_per_layer": self.kept_fraction_per_layer, "curves": self.curves, **self.rest,
                "ppl": self.ppl, "tasks": self.tasks, "sparsity": self.sparsity, "swap": self.swap}


# -- OUT/koff_backbone.json (koff export) ---------------------------------------------------------
BACKBONE_FORMAT = "koff.backbone"
BACKBONE_FORMAT_VERSION = 2
"""2 added `export_format`, `stored_intermediate_sizes`, `memories_left_out` and each memory's `carries`."""
EXPORT_FORMATS = ("hf", "gguf", "vllm")
"""The export formats (`koff.export.FORMATS` maps each to its writer)."""
_EXPORTED_MEMORY_KEYS = ("files", "carries", "lora_rank", "kv_tokens", "kv_frozen_tokens", "kv_dropped", "dropped")
_BACKBONE_KEYS = ("format", "format_version", "koff_version", "export_format", "source_run", "base_model",
                  "intermediate_sizes", "stored_intermediate_sizes", "down_proj_bias", "target_sparsity", "sparsity",
                  "parameters", "memories", "memories_left_out", "files")


@dataclass(frozen=True)
class ExportedMemory:
    """One memory of an export: its files (with sha256), the part kinds it carries and what the
    engine could not carry."""

    files: dict[str, str]
    carries: tuple[str, ...]
    lora_rank: int | None = None
    kv_tokens: int = 0
    kv_frozen_tokens: int = 0
    kv_dropped: bool = False
    dropped: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> ExportedMemory:
        if not isinstance(d, dict):
            raise ArtifactError(f"{where}: expected an object, got {type(d).__name__}")
        files = _files(d, where)
        if not files:
            raise ArtifactError(f"{where}: lists no files")
        return cls(files=files, carries=tuple(str_list(d, "carries", where, required=False)),
                   lora_rank=optional(d, "lora_rank", int, where), kv_tokens=optional(d, "kv_tokens", int, where, 0),
                   kv_frozen_tokens=optional(d, "kv_frozen_tokens", int, where, 0),
                   kv_dropped=optional(d, "kv_dropped", bool, where, False),
                   dropped=tuple(str_list(d, "dropped", where, required=False)),
                   extra=_extra(d, _EXPORTED_MEMORY_KEYS))

    def to_dict(self) -> dict:
        d: dict = {"files": dict(self.files), "carries": list(self.carries), "lora_rank": self.lora_rank,
                   "kv_tokens": self.kv_tokens}
        if self.kv_frozen_tokens:
            d["kv_frozen_tokens"] = self.kv_frozen_tokens
        if self.kv_dropped:
            d["kv_dropped"] = True
        if self.dropped:
            d["dropped"] = list(self.dropped)
        return {**d, **self.extra}


@dataclass(frozen=True)
class BackboneManifest:
    """OUT/koff_backbone.json: what an export folder holds, where it came from, and the sha256 of
    its files. `manifest["field"]` reads the stored form (`to_dict`)."""

    export_format: str
    base_model: BaseModelInfo
    intermediate_sizes: tuple[int, ...]
    stored_intermediate_sizes: tuple[int, ...]
    files: dict[str, str]
    memories: dict[str, ExportedMemory]
    memories_left_out: dict[str, str] = field(default_factory=dict)
    source_run: str | None = None
    down_proj_bias: bool = False
    target_sparsity: float = 0.0
    sparsity: Sparsity | None = None
    parameters: dict[str, int] = field(default_factory=dict)
    koff_version: str = __version__
    format_version: int = BACKBONE_FORMAT_VERSION
    extra: dict = field(default_factory=dict)
    """Fields of one format (outtype, gguf_arch, tensor_types, serve_command, ...), as stored."""

    @classmethod
    def from_dict(cls, d: dict, where: str = "koff_backbone.json") -> BackboneManifest:
        version = _format(d, BACKBONE_FORMAT, where, newest=BACKBONE_FORMAT_VERSION)
        export_format = optional(d, "export_format", str, where, "hf")  # version 1 wrote only the hf layout
        if export_format not in EXPORT_FORMATS:
            raise ArtifactError(f"{where}: field 'export_format' must be one of {list(EXPORT_FORMATS)}, "
                                f"got {short(export_format)}")
        widths = require(d, "intermediate_sizes", list, where)
        if not all(isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in widths):
            raise ArtifactError(f"{where}: 'intermediate_sizes' must be a list of non-negative integers")
        stored = optional(d, "stored_intermediate_sizes", list, where, widths)
        if len(stored) != len(widths) or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 or
                                                 (w == 0 and v == 0) for w, v in zip(stored, widths)):
            raise ArtifactError(f"{where}: 'stored_intermediate_sizes' must list one width per layer")
        raw_memories = optional(d, "memories", dict, where, {})
        left = optional(d, "memories_left_out", dict, where, {})
        params = optional(d, "parameters", dict, where, {})
        return cls(export_format=export_format,
                   base_model=BaseModelInfo.from_dict(require(d, "base_model", dict, where), f"{where}: base_model"),
                   intermediate_sizes=tuple(widths), stored_intermediate_sizes=tuple(stored), files=_files(d, where),
                   memories={name: ExportedMemory.from_dict(m, f"{where}: memories.{name}")
                             for name, m in raw_memories.items()},
                   memories_left_out={str(k): str(v) for k, v in left.items()},
                   source_run=optional(d, "source_run", str, where),
                   down_proj_bias=optional(d, "down_proj_bias", bool, where, False),
                   target_sparsity=number(d, "target_sparsity", where, 0.0, 1.0, required=False) or 0.0,
                   sparsity=None if d.get("sparsity") is None else Sparsity.from_dict(d["sparsity"], f"{where}: sparsity"),
                   parameters={str(k): int(v) for k, v in params.items() if isinstance(v, int)},
                   koff_version=optional(d, "koff_version", str, where, __version__), format_version=version,
                   extra=_extra(d, _BACKBONE_KEYS))

    def to_dict(self) -> dict:
        return {"format": BACKBONE_FORMAT, "format_version": self.format_version, "koff_version": self.koff_version,
                "export_format": self.export_format, "source_run": self.source_run,
                "base_model": self.base_model.to_dict(), "intermediate_sizes": list(self.intermediate_sizes),
                "stored_intermediate_sizes": list(self.stored_intermediate_sizes), "down_proj_bias": self.down_proj_bias,
                "target_sparsity": self.target_sparsity,
                "sparsity": None if self.sparsity is None else self.sparsity.to_dict(),
                "parameters": dict(self.parameters), "memories": {n: m.to_dict() for n, m in self.memories.items()},
                "memories_left_out": dict(self.memories_left_out), **self.extra, "files": dict(self.files)}

    def __getitem__(self, key: str):
        return self.to_dict()[key]

    def __contains__(self, key: str) -> bool:
        return key in self.to_dict()

    def get(self, key: str, default=None):
        return self.to_dict().get(key, default)


__all__ = ["BACKBONE_FORMAT", "BACKBONE_FORMAT_VERSION", "EXPORT_FORMATS", "BackboneManifest", "ExportedMemory",
           "BaseModelInfo", "CellRecord", "CheckpointManifest", "DomainRecord", "MemoryManifest", "RunManifest",
           "Sparsity", "TrainMetrics", "TrainingRecord", "check_files", "optional", "require"]

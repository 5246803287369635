"""Run configuration: plain dataclasses, readable from and written to YAML."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from koff.core.errors import ConfigError, DataError
from koff.core.fields import from_mapping
from koff.core.names import check_memory_name
from koff.core.runtime import DTYPES
from koff.data.text import BUNDLED_LANGUAGES, Domain, bundled_domain, general_files
from koff.model.controllers import CONTROLLERS
from koff.model.importance import SCORES
from koff.model.memory import LORA_TARGETS

MASKS = ("learned", *SCORES)
REG_MEMORIES = ("domain", "none", "general")
"""Values of `train.reg_memory` (see TrainConfig)."""
DISTILL_TEACHERS = ("reference", "dense")
"""Values of `train.distill_from` (see TrainConfig)."""
DOMAIN_SAMPLING = ("round-robin", "dynamic")
"""Values of `train.domain_sampling` (see TrainConfig)."""
TARGET_SCHEDULES = ("linear", "overshoot")
"""Values of `train.target_schedule` (see `koff.sparsity.target_at`)."""
GATE_INITS = (*SCORES, "constant")
"""Values of `train.gate_init` (see TrainConfig)."""
MASK_SCOPES = ("global", "layer")
"""Values of `train.mask_scope` (see TrainConfig)."""


def choices(field_name: str) -> tuple[str, ...] | None:
    """The values a string field of TrainConfig may take (None: any), the one list that config
    validation and the command line's choices both read."""
    lists = {"controller": tuple(sorted(CONTROLLERS)), "reg_memory": REG_MEMORIES, "distill_from": DISTILL_TEACHERS,
             "domain_sampling": DOMAIN_SAMPLING, "target_schedule": TARGET_SCHEDULES, "gate_init": GATE_INITS,
             "mask_scope": MASK_SCOPES, "dtype": tuple(sorted(DTYPES))}
    return lists.get(field_name)


POSITIVE = ("steps", "batch_size", "seq_len", "grad_accum", "dbl_every", "calibration_tokens")
"""Whole-number TrainConfig fields that must be at least 1 (the others at least 0)."""

FORMER_DEFAULTS = {"controller": "projection", "reg_memory": "domain"}
"""train fields whose default has changed, with what koff did before the field existed. koff writes
every field into the configs it stores (config.yaml, koff.json), so a stored config that lacks one
of these predates the field and meant this value, not today's default."""


@dataclass
class MemoryConfig:
    """What one domain memory holds."""

    lora_rank: int = 8
    """LoRA rank on every target projection (0: no LoRA)."""
    lora_alpha: float | None = None
    """LoRA scaling numerator (default 2 * rank)."""
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """The projections every memory's LoRA adapts (module names of the base model's linear layers)."""
    kv_tokens: int = 16
    """Trainable KV tokens per layer (0: no KV memory)."""
    kv_frozen_tokens: int = 1
    """Leading KV tokens kept frozen (the attention sink)."""

    @property
    def empty(self) -> bool:
        """True when a memory would hold nothing (no LoRA and no KV tokens)."""
        return self.lora_rank == 0 and self.kv_tokens == 0

    def validate(self, where: str = "memory") -> None:
        """Check every field on its own (raises ConfigError naming `where`.FIELD)."""
        _finite_fields(self, where)
        if self.lora_rank < 0 or self.kv_tokens < 0:
            raise ConfigError(f"{where}.lora_rank and {where}.kv_tokens must be >= 0")
        if self.kv_tokens and not 0 <= self.kv_frozen_tokens <= self.kv_tokens:
            raise ConfigError(f"{where}.kv_frozen_tokens must be in [0, kv_tokens={self.kv_tokens}], "
                              f"got {self.kv_frozen_tokens}")
        if self.lora_alpha is not None and (isinstance(self.lora_alpha, bool)
                                            or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0):
            raise ConfigError(f"{where}.lora_alpha must be a number > 0 (or null: 2 * rank), got {self.lora_alpha!r}")
        if (not isinstance(self.lora_targets, list) or not self.lora_targets
                or not all(isinstance(t, str) and t for t in self.lora_targets)):
            raise ConfigError(f"{where}.lora_targets must be a non-empty list of module names, got {self.lora_targets!r}")


@dataclass
class TrainConfig:
    """The offloading loop's schedule and optimisers."""

    steps: int = 400
    """Optimizer steps (domain and regularization steps together)."""
    batch_size: int = 4
    """Sequences in one optimizer step's global batch (split over grad_accum and processes)."""
    seq_len: int = 128
    """Tokens per training sequence."""
    reg_every: int = 4
    """Every reg_every-th step is a general-data regularization step (0: none)."""
    lr_gates: float = 0.1
    """Adam learning rate of the gates' log alpha."""
    lr_lambda: float = 1.0
    """Learning rate of the Lagrangian multipliers (gradient ascent; Sheared-LLaMA's 1.0)."""
    lr_lora: float = 1e-3
    """Adam learning rate of the LoRA adapters (memories and the backbone's own)."""
    lr_kv: float = 1e-2
    """Adam learning rate of the KV memory tokens."""
    warmup_frac: float = 0.3
    """Fraction of steps over which the target sparsity ramps from 0 to s*."""
    consolidate_frac: float = 0.3
    """Final fraction of steps trained on the fixed final mask (memories only)."""
    controller: str = "lagrangian"
    """Sparsity controller, by name (`koff.sparsity.CONTROLLERS`). The default is the paper's
    Lagrangian: at 300 steps it beat projection on every language (3 of 3 paired seeds), and at
    1,200 steps it ties projection with each domain's memory while its bare backbone stays a usable
    model (docs: Results, "Choosing the default recipe")."""
    rho: float = 1e4
    """Fixed quadratic coefficient of the augmented Lagrangian."""
    gate_init: str = "wanda-sp"
    """"wanda-sp", "flap", "magnitude" (log_alpha from per-layer z-scores of that score) or "constant"."""
    gate_init_center: float = 3.0
    """log alpha of a neuron of average score (and of every neuron with gate_init: constant)."""
    gate_init_scale: float = 2.0
    """log alpha per standard deviation of the per-layer z-score of log score."""
    log_alpha_limit: float = 10.0
    """log_alpha is clamped to [-limit, limit]. Sheared-LLaMA's log 1e2 = 4.6 keeps even the
    surest gate noisy (P(z < 1) = 5% at the bound), which cost 4-12% perplexity at 80 steps
    (docs: Concepts, "What moved quality"); 10 lets confident gates settle."""
    calibration_tokens: int = 4096
    """Tokens of each domain's train text used for activation statistics."""
    mask_scope: str = "global"
    """Final mask: "global" top-k over all layers, or "layer" (the same fraction in every layer)."""
    checkpoint_every: int = 0
    """Save a resumable training state every N steps (0: never). The run is then built in
    OUTPUT.partial/ and `koff decompose --resume` continues it after an interruption."""
    distill: float = 0.0
    """Weight w of logit distillation: loss = (1 - w) * LM + w * KL(teacher || student), with the
    teacher `distill_from` names. 0: off (the paper's objective)."""
    distill_from: str = "reference"
    """The distillation teacher: "reference" (the dense + memories reference, trained first, with
    the same memory; every step) or "dense" (the frozen dense base model itself, no memory, on
    domain steps only: costs one extra forward, no reference run)."""
    reg_memory: str = "general"
    """Which memory a regularization (general-data) step uses: "domain" (a random domain's, the
    paper's), "none" (the bare backbone) or "general" (a memory of its own, trained only on general
    batches: what a request naming no domain gets; the default, since it costs each domain's own
    memory at most 1.4% and gives requests with no domain a better model than dense on held-out
    general text). With no memories (memory.lora_rank and kv_tokens 0) or no regularization steps
    there is no general memory, and "general" trains the bare backbone like "none"."""
    domain_sampling: str = "round-robin"
    """Which domain a domain step draws: "round-robin" (domains take turns) or "dynamic"
    (Sheared-LLaMA's dynamic batch loading: domains are drawn from weights that grow with each
    domain's loss in excess of `dbl_reference`, updated every `dbl_every` steps)."""
    dbl_reference: dict[str, float] | None = None
    """Dynamic sampling's reference loss per domain (nats per token, e.g. the final training loss of
    a dense + memories run of the same budget); required by `domain_sampling: dynamic`."""
    dbl_every: int = 10
    """Steps between two updates of the dynamic domain weights."""
    dbl_eta: float = 1.0
    """Step size of the dynamic weights' update: log w += eta * max(loss - reference, 0)."""
    target_schedule: str = "linear"
    """How the sparsity target moves: "linear" (0 -> s* over warmup_frac, then s*) or "overshoot"
    (0 -> target_peak over warmup_frac, back down to s* over the next regrow_frac, then s*): prune
    past s*, then let neurons come back before the mask is fixed."""
    target_peak: float = 0.4
    """The highest target of the "overshoot" schedule (a fraction of FFN parameters, > s*)."""
    regrow_frac: float = 0.2
    """Fraction of steps over which the "overshoot" schedule returns from target_peak to s*."""
    backbone_lora_rank: int = 0
    """Rank of a LoRA adapter on the backbone itself, shared by every memory and trained on every
    step (0: none). It repairs what pruning removed in place of each domain's memory; export folds
    it into the backbone's weights, so it costs nothing at inference. Pruned runs only."""
    grad_accum: int = 1
    """Micro-batches per optimizer step: `batch_size` (the global batch) is split into this many,
    so the update is the same, with less memory."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass (less activation memory, ~1.3x compute)."""
    dtype: str = "float32"
    """Precision of the frozen base weights (float32, bfloat16, float16); gates and memories
    always train in float32."""
    seed: int = 0
    """Seed of the data order, the gate noise, the memories' initialisation and the regularization memory."""

    # long: one check per field, each a line or two with its own message
    def validate(self, where: str = "train") -> None:
        """Check every field on its own (raises ConfigError naming `where`.FIELD)."""
        t = self
        if t.steps < 1 or t.batch_size < 1 or t.seq_len < 2:
            raise ConfigError(f"{where}.steps and {where}.batch_size must be >= 1 and {where}.seq_len >= 2")
        if t.controller not in CONTROLLERS:
            raise ConfigError(f"{where}.controller must be one of {sorted(CONTROLLERS)}, got {t.controller!r}")
        if t.reg_memory not in REG_MEMORIES:
            raise ConfigError(f"{where}.reg_memory must be one of {REG_MEMORIES}, got {t.reg_memory!r}")
        for key, choices in (("distill_from", DISTILL_TEACHERS), ("domain_sampling", DOMAIN_SAMPLING),
                             ("target_schedule", TARGET_SCHEDULES)):
            if getattr(t, key) not in choices:
                raise ConfigError(f"{where}.{key} must be one of {choices}, got {getattr(t, key)!r}")
        if t.dbl_reference is not None:
            if not isinstance(t.dbl_reference, dict) or not t.dbl_reference or not all(
                    isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    and v >= 0 for k, v in t.dbl_reference.items()):
                raise ConfigError(f"{where}.dbl_reference must map domain names to a reference loss >= 0 (nats), "
                                  f"got {t.dbl_reference!r}")
        if t.domain_sampling == "dynamic" and t.dbl_reference is None:
            raise ConfigError(f"{where}.domain_sampling 'dynamic' needs {where}.dbl_reference: a reference loss per "
                              "domain (e.g. the final training loss of a dense + memories run)")
        if t.dbl_every < 1 or t.dbl_eta <= 0:
            raise ConfigError(f"{where}.dbl_every must be >= 1 and {where}.dbl_eta > 0")
        if not 0 < t.target_peak < 1 or not 0 <= t.regrow_frac <= 1:
            raise ConfigError(f"{where}.target_peak must be in (0, 1) and {where}.regrow_frac in [0, 1]")
        if t.target_schedule == "overshoot" and t.warmup_frac + t.regrow_frac + t.consolidate_frac > 1:
            raise ConfigError(f"{where}.warmup_frac + regrow_frac + consolidate_frac must be at most 1 with the "
                              "overshoot schedule (the target must be back at s* before the mask is fixed)")
        if t.backbone_lora_rank < 0:
            raise ConfigError(f"{where}.backbone_lora_rank must be >= 0, got {t.backbone_lora_rank}")
        if t.dtype not in DTYPES:
            raise ConfigError(f"{where}.dtype must be one of {sorted(DTYPES)}, got {t.dtype!r}")
        if t.grad_accum < 1:
            raise ConfigError(f"{where}.grad_accum must be >= 1, got {t.grad_accum}")
        if t.batch_size % t.grad_accum:
            raise ConfigError(f"{where}.batch_size {t.batch_size} (the global batch) must be divisible by "
                              f"{where}.grad_accum {t.grad_accum}")
        _finite_fields(t, where)
        for key in ("lr_gates", "lr_lambda", "lr_lora", "lr_kv"):
            if getattr(t, key) <= 0:
                raise ConfigError(f"{where}.{key} must be > 0, got {getattr(t, key)}")
        if t.rho < 0:
            raise ConfigError(f"{where}.rho must be >= 0, got {t.rho}")
        if t.log_alpha_limit <= 0:
            raise ConfigError(f"{where}.log_alpha_limit must be > 0, got {t.log_alpha_limit}")
        if t.calibration_tokens < 1:
            raise ConfigError(f"{where}.calibration_tokens must be >= 1, got {t.calibration_tokens}")
        if t.seed < 0:
            raise ConfigError(f"{where}.seed must be >= 0, got {t.seed}")
        if t.gate_init not in GATE_INITS:
            raise ConfigError(f"{where}.gate_init must be wanda-sp, flap, magnitude or constant, got {t.gate_init!r}")
        if t.mask_scope not in MASK_SCOPES:
            raise ConfigError(f"{where}.mask_scope must be 'global' or 'layer', got {t.mask_scope!r}")
        if not (0 <= t.warmup_frac <= 1 and 0 <= t.consolidate_frac < 1 and t.warmup_frac + t.consolidate_frac <= 1):
            raise ConfigError(f"{where}.warmup_frac and {where}.consolidate_frac must be in [0, 1] and sum to at most 1")
        if not 0.0 <= t.distill <= 1.0:
            raise ConfigError(f"{where}.distill must be in [0, 1], got {t.distill}")
        if t.checkpoint_every < 0:
            raise ConfigError(f"{where}.checkpoint_every must be >= 0, got {t.checkpoint_every}")
        if t.reg_every < 0 or t.reg_every == 1:
            raise ConfigError(f"{where}.reg_every must be 0 (no regularization) or >= 2")


def _finite_fields(obj, where: str) -> None:
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{where}.{f.name} must be a finite number, got {v}")


@dataclass
class DecomposeConfig:
    """Everything `koff decompose` needs."""

    domains: list[Domain]
    """The domains, each with its train (and test) files; in YAML a mapping `name: {train: [...], test: [...]}`
    or a list of bundled names (en fr es de it pt)."""
    output: Path
    """The run directory to create."""
    model: str | None = None
    """The base model: a local transformers folder or a hub id (null: the bundled SmolLM2-135M)."""
    general: list[Path] = field(default_factory=list)
    """General-domain files for the regularization steps (the bundled general sets when the config
    names none)."""
    general_datasets: list = field(default_factory=list)
    """General sources that are datasets (`koff.data.sources.DatasetSource`), read after `general`'s files."""
    target_sparsity: float = 0.2
    """s*: the fraction of FFN parameters the final mask removes."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reference: bool = True
    """Also train dense + memories the same way (no gates) into OUTPUT/reference."""
    prune: bool = True
    """False: no gates at all (the dense + memories run itself)."""
    mask: str = "learned"
    """"learned": koff's gates. "magnitude", "wanda-sp" or "flap": a one-shot mask from that score
    at s* (train.mask_scope ranking), fixed from step 0; only memories train (a baseline)."""

    def validate(self) -> None:
        """Check the whole config, fields and how they combine (raises ConfigError naming the field)."""
        if not self.domains:
            raise ConfigError("no domains: give at least one (e.g. --domains en fr es)")
        names = [d.name for d in self.domains]
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate domain names: {names}")

        for d in self.domains:
            check_memory_name(d.name, f"domains.{d.name}")
            if not d.train and not d.datasets:
                raise ConfigError(f"domain {d.name!r} has no training files")
        if self.mask not in MASKS:
            raise ConfigError(f"mask must be one of {MASKS}, got {self.mask!r}")
        if not 0.0 <= self.target_sparsity < 1.0:
            raise ConfigError(f"target_sparsity must be in [0, 1), got {self.target_sparsity}")
        t, m = self.train, self.memory
        names = [d.name for d in self.domains]
        t.validate("train")
        m.validate("memory")
        has_general = bool(self.general or self.general_datasets)
        if t.reg_memory == "general" and not m.empty and t.reg_every and has_general:
            if "general" in names:
                raise ConfigError("train.reg_memory 'general' names its memory 'general', which is also a domain's name; "
                                  "rename that domain")
        if t.reg_every and not has_general:
            raise ConfigError("regularization steps need general data (general: [...]) or train.reg_every: 0")
        if t.domain_sampling == "dynamic":
            missing = [n for n in names if n not in (t.dbl_reference or {})]
            if missing:
                raise ConfigError(f"train.dbl_reference has no reference loss for domain(s) {missing}")
        if t.target_schedule == "overshoot" and self.prune and not t.target_peak > self.target_sparsity:
            raise ConfigError(f"train.target_peak ({t.target_peak}) must be above target_sparsity "
                              f"({self.target_sparsity}) with the overshoot schedule")
        if t.distill > 0 and t.distill_from == "dense" and not self.prune:
            raise ConfigError("train.distill_from 'dense' distils a pruned model from the dense one; a run with "
                              "prune: false is the dense model")

    def to_dict(self) -> dict:
        """The config as YAML / koff.json store it (every field written, paths as strings)."""
        return {
            "model": self.model,
            "domains": {d.name: {k: v for k, v in d.to_dict().items() if k != "name"} for d in self.domains},
            "general": [str(p) for p in self.general] + [{"dataset": g.to_dict()} for g in self.general_datasets],
            "target_sparsity": self.target_sparsity,
            "memory": dataclasses.asdict(self.memory),
            "train": dataclasses.asdict(self.train),
            "reference": self.reference,
            "prune": self.prune,
            "mask": self.mask,
            "output": str(self.output),
        }


def _flag(raw: dict, key: str, default: bool, source: str) -> bool:
    v = raw.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(f"{source}: {key}: expected true or false, got {v!r}")
    return v


def _existing_file(value, where: str) -> Path:
    """An existing data file, as an absolute path (so a run keeps working from any folder)."""
    if not isinstance(value, (str, Path)) or not str(value):
        raise ConfigError(f"{where}: expected a file path, got {value!r}")
    p = Path(os.path.abspath(Path(value).expanduser()))
    if p.is_dir():
        raise ConfigError(f"{where}: {value} is a folder, not a data file (give the .txt or .jsonl files in it)")
    if not p.is_file():
        raise ConfigError(f"{where}: file {value} does not exist")
    return p


def _split_sources(entries: list, where: str, text_field: str = "text", base: Path | None = None):
    """Training entries -> (data files, dataset sources): an entry is a file path, a dataset string
    (hf:..., a .parquet/.arrow file, a save_to_disk folder) or a mapping {dataset: {...}}."""
    from koff.data.sources import DatasetSource, source_from_string

    files, sets = [], []
    for i, e in enumerate(entries):
        if isinstance(e, dict):
            if set(e) != {"dataset"}:
                raise ConfigError(f"{where}[{i}]: expected a file path or a mapping {{dataset: {{path: ...}}}}, "
                                  f"got fields {sorted(map(str, e))}")
            sets.append(DatasetSource.from_dict(e["dataset"], f"{where}[{i}].dataset", text_field))
            continue
        src = source_from_string(e, text_field) if isinstance(e, str) and e else None
        if src is not None:
            sets.append(src)
        else:
            files.append(_existing_file(e, where))
    from koff.data.sources import validate_stream_sources

    validate_stream_sources(files, sets, where)
    return files, sets


def parse_domains(raw, root: Path | None = None) -> list[Domain]:
    """Domains from config: a list of bundled names, or a mapping name -> {train, test, valid,
    text_field}, where a value may also be the string "bundled"."""

    if isinstance(raw, str):
        raw = [raw]
    if isinstance(raw, list):
        out = []
        for n in raw:
            if not isinstance(n, str):
                raise ConfigError(f"domains: expected names of bundled languages, got {n!r}")
            out.append(bundled_domain(check_memory_name(n, "domains"), root))
        return out
    if not isinstance(raw, dict):
        raise ConfigError("domains: expected a list of bundled names or a mapping name -> files")
    out = []
    for name, spec in raw.items():
        if not isinstance(name, str):
            raise ConfigError(f"domains: a domain name must be a string, got {name!r}")
        check_memory_name(name, "domains")
        if spec is None or spec == "bundled":
            out.append(bundled_domain(name, root))
            continue
        if not isinstance(spec, dict) or ("train" not in spec and "dataset" not in spec):
            raise ConfigError(f"domains.{name}: expected a mapping with a 'train' list of files (or a 'dataset')")
        unknown = sorted(str(k) for k in set(spec) - {"train", "test", "valid", "text_field", "test_subsets", "dataset"})
        if unknown:
            raise ConfigError(f"domains.{name}: unknown field(s) {unknown}")
        text_field = spec.get("text_field", "text")
        if not isinstance(text_field, str) or not text_field:
            raise ConfigError(f"domains.{name}.text_field: expected a JSONL field name, got {text_field!r}")
        files, sets = {}, []
        for key in ("train", "test", "valid"):
            v = spec.get(key) or []
            v = [v] if isinstance(v, (str, dict)) else v
            if not isinstance(v, list):
                raise ConfigError(f"domains.{name}.{key}: expected a list of file paths")
            if key == "train":
                if "dataset" in spec:  # shorthand: `dataset: {...}` is one more training source
                    v = [*v, {"dataset": spec["dataset"]}]
                plain, sets = _split_sources(v, f"domains.{name}.train", text_field)
                files[key] = plain
            else:
                files[key] = [_existing_file(p, f"domains.{name}.{key}") for p in v]
        subsets = spec.get("test_subsets") or {}
        if not isinstance(subsets, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                                    and v >= 0 for k, v in subsets.items()):
            raise ConfigError(f"domains.{name}.test_subsets: expected a mapping subset name -> number of leading "
                              f"test lines (>= 0), got {subsets!r}")
        out.append(Domain(name=name, train=files["train"], test=files["test"], valid=files["valid"],
                          text_field=text_field, test_subsets=dict(subsets), datasets=sets))
    return out


def config_from_dict(raw: dict, source: str = "config") -> DecomposeConfig:
    """Build and validate a DecomposeConfig from a YAML-like mapping."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    known = {"model", "domains", "general", "target_sparsity", "memory", "train", "reference", "prune", "mask", "output"}
    unknown = sorted(str(k) for k in set(raw) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown}; known: {sorted(known)}")
    if "domains" not in raw:
        raise ConfigError(f"{source}: missing 'domains'")
    for key in ("model", "output", "mask"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ConfigError(f"{source}: {key}: expected a string, got {raw[key]!r}")
    general_sets: list = []
    try:
        domains = parse_domains(raw["domains"])
        general = raw.get("general", "bundled")
        if general == "bundled":
            general = general_files()
        elif general is None or general == "none" or general == []:
            general = []
        elif isinstance(general, list):
            general, general_sets = _split_sources(general, f"{source}: general")
        else:
            raise ConfigError(f"{source}: general: expected 'bundled', 'none' or a list of files / datasets")
    except DataError as e:
        raise ConfigError(f"{source}: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    sparsity = raw.get("target_sparsity", 0.2)
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool):
        raise ConfigError(f"{source}: target_sparsity: expected a number, got {sparsity!r}")
    cfg = DecomposeConfig(
        domains=domains,
        output=Path(raw.get("output") or "runs/koff"),
        model=raw.get("model"),
        general=general,
        general_datasets=general_sets,
        target_sparsity=float(sparsity),
        memory=from_mapping(MemoryConfig, raw.get("memory"), f"{source}: memory"),
        train=from_mapping(TrainConfig, raw.get("train"), f"{source}: train"),
        reference=_flag(raw, "reference", True, source),
        prune=_flag(raw, "prune", True, source),
        mask=raw.get("mask") or "learned",
    )
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def read_yaml(path: Path, what: str = "config file") -> dict:
    """A YAML file holding a mapping (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{at} ({problem})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def with_former_defaults(raw: dict) -> dict:
    """A config mapping koff stored, with each train field in FORMER_DEFAULTS that it lacks filled in
    with what it meant when it was written (a user's YAML takes today's defaults instead)."""
    train = raw.get("train")
    if not isinstance(train, dict) and train is not None:
        return raw
    return {**raw, "train": {**FORMER_DEFAULTS, **(train or {})}}


def load_config(path: Path, stored: bool = False) -> DecomposeConfig:
    """Read a YAML config file; `stored`: one koff wrote (a run's config.yaml), whose missing
    fields mean what they meant then (`with_former_defaults`)."""
    raw = read_yaml(path)
    return config_from_dict(with_former_defaults(raw) if stored else raw, str(path))


def dump_config(cfg: DecomposeConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def same_config(path: Path, cfg: DecomposeConfig) -> bool:
    """True when the config file at `path` (one koff wrote) says what `cfg` says. The two are
    compared as parsed, defaults filled in, so a file written before a field was added still
    matches while that field has its default (for a field whose default changed since, the default
    of the time: `FORMER_DEFAULTS`); an unreadable or invalid file matches nothing."""
    try:
        return path.read_text() == dump_config(cfg) or load_config(path, stored=True).to_dict() == cfg.to_dict()
    except (ConfigError, OSError):
        return False


__all__ = ["MemoryConfig", "TrainConfig", "DecomposeConfig", "ConfigError", "load_config", "config_from_dict",
           "dump_config", "same_config", "parse_domains", "BUNDLED_LANGUAGES", "FORMER_DEFAULTS", "with_former_defaults"]

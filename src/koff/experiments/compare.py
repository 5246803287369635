"""`koff compare CONFIG`: run a grid of methods x seeds (plus one-seed sweeps) on the same frozen
base model, data and token budget, one JSON result per cell.

The grid config (YAML) names a shared `base` decompose config, the `methods` (overrides of it),
the `seeds`, optional `sweeps`, the evaluation budget and where results go. A cell whose JSON
exists is skipped, so a grid can be filled over several invocations; cells are written
atomically as they finish. `koff report DIR` turns the cells into tables and plots.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from koff.config.recipe import config_from_dict, load_config, read_yaml
from koff.core.atomic import atomic_write_text, remove_tree
from koff.core.claims import claim
from koff.core.errors import ConfigError
from koff.core.version import __version__
from koff.evaluation.perplexity import EvalSettings, block_nll, summarize, test_set
from koff.evaluation.tasks import score_task
from koff.model.base_model import load_base
from koff.model.gates import sparsity_report
from koff.model.koff_model import KoffModel
from koff.storage.manifests import CellRecord
from koff.storage.run_dir import build_model, load_run
from koff.training import preemption
from koff.training.pipeline import decompose


@dataclass
class Cell:
    id: str
    method: str
    group: str
    """"main" or the sweep's name."""
    seed: int
    config: dict
    kind: str = "decompose"
    """"decompose" (train, or a one-shot mask) or "dense" (the unpruned base model, no training)."""
    setting: dict = field(default_factory=dict)
    """The sweep's override for this cell (empty in the main table)."""
    deterministic: bool = False
    """No randomness (dense, one-shot masks without training): run for the first seed only."""


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+=,-]+", "-", text).strip("-")


def _setting_slug(setting: dict) -> str:
    flat = []

    def walk(prefix, d):
        for k, v in sorted(d.items()):
            if isinstance(v, dict) and prefix:  # a mapping-valued field (train.dbl_reference): one entry
                flat.append(f"{k}=" + "+".join(f"{a}-{b}" for a, b in v.items()))
            elif isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            elif isinstance(v, list):
                flat.append(f"{k}={'+'.join(map(str, v))}")
            else:
                flat.append(f"{k}={v}")

    walk("", setting)
    return _slug(",".join(flat))


def load_grid(path: Path) -> dict:
    """Read and check a grid config (every field `expand` reads, with the file and field at fault).

    `extends: OTHER.yaml` (relative to this file) takes `base` and `methods` from another grid, so
    a second grid (other evaluation, other sweeps) trains exactly the same cells; `methods` may then
    be a list naming the ones to keep."""
    spec = read_yaml(path, "grid config")
    if "extends" in spec:
        _extend(spec, path)
    for key in ("base", "methods"):
        if not isinstance(spec.get(key), dict):
            raise ConfigError(f"{path}: '{key}' must be a mapping")
    unknown = sorted(str(k) for k in set(spec) - {"name", "results", "work", "base", "methods", "seeds", "sweeps", "eval",
                                               "cluster"})
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {unknown}")
    spec.setdefault("seeds", [0])
    spec.setdefault("sweeps", {})
    spec.setdefault("eval", {})
    for key in ("name", "results", "work"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise ConfigError(f"{path}: '{key}' must be a string, got {spec[key]!r}")
    _seeds(spec["seeds"], f"{path}: seeds")
    if not isinstance(spec.setdefault("cluster", {}), dict) or not all(isinstance(k, str) for k in spec["cluster"]):
        raise ConfigError(f"{path}: 'cluster' must be a mapping of submitit executor parameters (e.g. timeout_min: "
                          f"240, slurm_partition: gpu), got {spec['cluster']!r}")
    _check_methods(spec["methods"], path)
    _check_sweeps(spec["sweeps"], path)
    _check_eval(spec["eval"], path)
    spec["_path"] = str(path)
    return spec


def _extend(spec: dict, path: Path) -> None:
    """Take `base` and `methods` from the grid `spec` extends."""
    parent_path = spec.pop("extends")
    if not isinstance(parent_path, str) or not parent_path:
        raise ConfigError(f"{path}: 'extends' must be the path of another grid config, got {parent_path!r}")
    parent_file = (Path(path).parent / parent_path)
    parent = read_yaml(parent_file, f"grid config {parent_path!r} (extended by {path})")
    if "extends" in parent:
        raise ConfigError(f"{parent_file}: a grid that is extended cannot extend another one itself")
    spec.setdefault("base", parent.get("base"))
    names = spec.get("methods")
    methods = parent.get("methods")
    parent_methods: dict = methods if isinstance(methods, dict) else {}
    if names is None:
        spec["methods"] = parent_methods
    elif isinstance(names, list):
        unknown = [n for n in names if n not in parent_methods]
        if unknown:
            raise ConfigError(f"{path}: methods {unknown} are not methods of {parent_file}")
        spec["methods"] = {n: parent_methods[n] for n in names}


def _check_methods(methods: dict, path: Path) -> None:
    for name, over in methods.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{path}: methods: a method name must be a string, got {name!r}")
        if over is not None and not isinstance(over, dict):
            raise ConfigError(f"{path}: methods.{name} must be a mapping of overrides (or empty), got {over!r}")
        if over and over.get("kind", "decompose") not in ("decompose", "dense"):
            raise ConfigError(f"{path}: methods.{name}.kind must be 'decompose' or 'dense', got {over['kind']!r}")
        if over and not isinstance(over.get("deterministic", False), bool):
            raise ConfigError(f"{path}: methods.{name}.deterministic must be true or false")


def _check_sweeps(sweeps, path: Path) -> None:
    if not isinstance(sweeps, dict):
        raise ConfigError(f"{path}: 'sweeps' must be a mapping name -> {{methods, settings}}")
    for name, sweep in sweeps.items():
        where = f"{path}: sweeps.{name}"
        if not isinstance(sweep, dict) or "methods" not in sweep or "settings" not in sweep:
            raise ConfigError(f"{where} needs 'methods' and 'settings'")
        if not isinstance(sweep["methods"], list) or not all(isinstance(m, str) for m in sweep["methods"]):
            raise ConfigError(f"{where}.methods must be a list of method names")
        if not isinstance(sweep["settings"], list) or not all(isinstance(x, dict) for x in sweep["settings"]):
            raise ConfigError(f"{where}.settings must be a list of override mappings")
        if "seeds" in sweep:
            _seeds(sweep["seeds"], f"{where}.seeds")


def _check_eval(ev, path: Path) -> None:
    if not isinstance(ev, dict):
        raise ConfigError(f"{path}: 'eval' must be a mapping")
    for key in ("block", "max_tokens", "batch_size"):
        v = ev.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < (2 if key == "block" else 1)):
            raise ConfigError(f"{path}: eval.{key} must be a whole number >= {2 if key == 'block' else 1}, got {v!r}")
    tasks = ev.get("tasks") or {}
    if not isinstance(tasks, dict) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1
                                              for n in tasks.values()):
        raise ConfigError(f"{path}: eval.tasks must map task names to a number of items >= 1, got {tasks!r}")
    if not isinstance(ev.get("swap_for") or [], list):
        raise ConfigError(f"{path}: eval.swap_for must be a list of method names")
    if not isinstance(ev.get("swap_groups") or [], list):
        raise ConfigError(f"{path}: eval.swap_groups must be a list of sweep names")


def _seeds(seeds, where: str) -> None:
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds)):
        raise ConfigError(f"{where}: expected a non-empty list of seeds (whole numbers >= 0), got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: a seed is listed twice: {seeds}")


def expand(spec: dict) -> list[Cell]:
    """Every cell of the grid: methods x seeds, then each sweep's methods x settings x seeds."""
    cells: list[Cell] = []

    def make(method: str, group: str, seed: int, setting: dict) -> Cell:
        if method not in spec["methods"]:
            raise ConfigError(f"{spec['_path']}: sweep {group!r} names unknown method {method!r}")
        over = dict(spec["methods"][method] or {})
        kind = over.pop("kind", "decompose")
        deterministic = over.pop("deterministic", kind == "dense")
        cfg = _merge(_merge(spec["base"], over), setting)
        if not isinstance(cfg.setdefault("train", {}), dict):
            raise ConfigError(f"{spec['_path']}: method {method!r}: 'train' must be a mapping, got {cfg['train']!r}")
        cfg["train"]["seed"] = seed
        cfg["reference"] = False
        suffix = f"__{_setting_slug(setting)}" if setting else ""
        cid = _slug(f"{method}{suffix}__seed{seed}")
        return Cell(cid, method, group, seed, cfg, kind, setting, deterministic)

    def seeds_for(method: str, seeds: list[int]) -> list[int]:
        if method not in spec["methods"]:
            raise ConfigError(f"{spec['_path']}: a sweep names unknown method {method!r}")
        m = spec["methods"][method] or {}
        det = m.get("deterministic", m.get("kind") == "dense")
        return seeds[:1] if det else seeds

    for seed in spec["seeds"]:  # seed-major: a partly filled grid covers every method first
        for method in spec["methods"]:
            if seed in seeds_for(method, spec["seeds"]):
                cells.append(make(method, "main", seed, {}))
    for name, sweep in spec["sweeps"].items():
        if not isinstance(sweep, dict) or "methods" not in sweep or "settings" not in sweep:
            raise ConfigError(f"{spec['_path']}: sweep {name!r} needs 'methods' and 'settings'")
        for method in sweep["methods"]:
            for setting in sweep["settings"]:
                for seed in seeds_for(method, sweep.get("seeds", spec["seeds"][:1])):
                    cells.append(make(method, name, seed, setting))
    seen: dict[str, Cell] = {}
    for c in cells:  # the same cell may appear in two groups: run it once
        seen.setdefault(c.id, c)
    return list(seen.values())


def _curves(metrics: Path, max_points: int = 400) -> dict:
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.is_file() else []
    if not rows:
        return {}
    stride = max(1, len(rows) // max_points)
    keep = rows[::stride]
    out = {"step": [r["step"] for r in keep], "loss": [r["loss"] for r in keep],
           "kind": [r["kind"] for r in keep], "domain": [r["domain"] for r in keep]}
    for key in ("target", "expected_sparsity", "lambda1", "lambda2", "shift", "total_shift"):
        if any(key in r for r in keep):
            out[key] = [r.get(key) for r in keep]
    return out


def evaluate_cell(cell: Cell, run_dir: Path | None, eval_spec: dict, progress: bool, runtime=None) -> dict:
    """Perplexity per domain (own memory, backbone alone, and the default memory when the run has
    one) and the general-ability tasks of what a request naming no domain gets: the default
    memory when the run has one (`train.reg_memory: general`), the backbone alone otherwise."""

    settings = EvalSettings(block=eval_spec.get("block", 256), max_tokens=eval_spec.get("max_tokens"),
                            batch_size=eval_spec.get("batch_size", 4))
    if run_dir is None:
        cfg = config_from_dict({**cell.config, "output": "unused"}, cell.id)
        base, tok, source = load_base(cfg.model, **({"dtype": runtime.dtype, "device": runtime.device} if runtime else {}))
        km = KoffModel(base)
        domains = cfg.domains
        report = sparsity_report(base, None, 0.0)
        memories: list[str] = []
        default = None
    else:
        run = load_run(run_dir)
        km, tok = build_model(run, runtime=runtime)
        domains = [run.meta.data[d].domain() for d in run.domains if d in run.meta.data]
        report = run.meta.sparsity.to_dict()
        memories = sorted(run.memories)
        source = run.meta.base_model.source
        default = run.meta.default_memory if run.meta.default_memory in run.memories else None
    sets = {d.name: test_set(d, tok, settings) for d in domains}
    ppl = {}
    for d in domains:
        ts = sets[d.name]
        row = {"backbone": summarize(block_nll(km, ts.blocks, None, settings.batch_size,
                                               f"{cell.id} {d.name}" if progress else None), ts)}
        if d.name in memories:
            row["own"] = summarize(block_nll(km, ts.blocks, d.name, settings.batch_size,
                                             f"{cell.id} {d.name}+mem" if progress else None), ts)
        if default is not None:
            row["default"] = summarize(block_nll(km, ts.blocks, default, settings.batch_size,
                                                 f"{cell.id} {d.name}+{default}" if progress else None), ts)
        ppl[d.name] = row
    swap: dict[str, Any] | None = None
    wants_swap = ((cell.method in (eval_spec.get("swap_for") or []) and cell.group == "main")
                  or cell.group in (eval_spec.get("swap_groups") or []))
    if wants_swap and memories:
        names = [d.name for d in domains]
        tests: list = []
        swap = {"memories": memories, "domains": names, "test": tests}
        for m in memories:
            tests.append([ppl[d.name]["own"]["test"]["ppl"] if m == d.name else
                                 summarize(block_nll(km, sets[d.name].blocks, m, settings.batch_size),
                                           sets[d.name])["test"]["ppl"] for d in domains])
    tasks = {}
    for name, n in (eval_spec.get("tasks") or {}).items():
        tasks[name] = score_task(km, tok, name, memory=default, max_items=n)
    return {"ppl": ppl, "tasks": tasks, "default_memory": default, "sparsity": report, "swap": swap, "base_model": source,
            "eval_settings": {"block": settings.block, "max_tokens": settings.max_tokens}}


def finished_run(run_dir: Path, cfg) -> bool:
    """True when `run_dir` holds a complete run trained with exactly `cfg`: the configs are compared
    as parsed (defaults filled in), so a run written before a config field was added still counts
    when the new field has its default. How often it was checkpointed does not matter: resuming
    from a checkpoint is exact."""
    config = run_dir / "config.yaml"
    return (run_dir / "koff.json").is_file() and config.is_file() and _stored_cadence(config, cfg) is not None


def _stored_cadence(path: Path, cfg) -> int | None:
    """The `train.checkpoint_every` of the config koff wrote at `path` when that config is `cfg`
    but for it (compared as parsed, defaults filled in); None when it differs or cannot be read."""
    try:
        stored = load_config(path, stored=True)
    except ConfigError:
        return None
    every = stored.train.checkpoint_every
    same = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, checkpoint_every=every))
    return every if stored.to_dict() == same.to_dict() else None


def run_cell(cell: Cell, spec: dict, progress: bool = True, runtime=None, checkpoint_every: int = 0) -> Path:
    """Train (unless dense) and evaluate one cell; write RESULTS/cells/<id>.json atomically.
    Training is always resumable: it saves its state every `checkpoint_every` steps (without it,
    only when a stop signal comes), and a cell interrupted earlier resumes from its last state."""

    results = Path(spec.get("results", "results")) / "cells"
    work = Path(spec.get("work", "runs/grid"))
    out_path = results / f"{cell.id}.json"
    t0 = time.time()
    run_dir = None
    train_info = {"steps": 0, "seconds": 0.0, "tokens": 0}
    if cell.kind == "dense":
        pass
    elif cell.kind == "decompose":
        cfg = config_from_dict({**cell.config, "output": str(work / cell.id)}, cell.id)
        run_dir = work / cell.id
        if not finished_run(run_dir, cfg):  # a run trained earlier (e.g. before an interrupted evaluation) is reused
            cfg.train.checkpoint_every, resume = _cadence(run_dir.with_name(run_dir.name + ".partial"), cfg,
                                                          checkpoint_every)
            decompose(cfg, overwrite=True, progress=progress, runtime=runtime, resume=resume)

        summary = load_run(run_dir).meta.metrics
        t = cfg.train
        steps = summary.steps_run if summary.steps_run is not None else summary.steps
        train_info = {"steps": steps, "seconds": summary.seconds, "tokens": steps * t.batch_size * t.seq_len}
    else:
        raise ConfigError(f"cell {cell.id}: unknown kind {cell.kind!r}")
    result = evaluate_cell(cell, run_dir, spec["eval"], progress, runtime)
    keep = None
    if run_dir is not None:

        run = load_run(run_dir)
        if run.keep is not None:
            keep = [float(k.float().mean()) for k in run.keep]
    record = {
        "id": cell.id, "method": cell.method, "group": cell.group, "seed": cell.seed, "setting": cell.setting,
        "deterministic": cell.deterministic, "kind": cell.kind,
        "config": cell.config, "train": train_info, "kept_fraction_per_layer": keep,
        "curves": _curves(run_dir / "metrics.jsonl") if run_dir is not None else {},
        "command": f"koff compare {spec['_path']}", "grid": spec.get("name"), "koff_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_seconds": round(time.time() - t0, 1),
        **result,
    }

    CellRecord.from_dict(record, str(out_path))  # what `koff report` will read back
    atomic_write_text(out_path, json.dumps(record, indent=1))
    return out_path


def _cadence(partial: Path, cfg, checkpoint_every: int) -> tuple[int, bool]:
    """How often a cell's training checkpoints, and whether it resumes: an interrupted cell of the
    same configuration resumes at the cadence it started with (the result does not depend on it);
    any other partial run is removed. Without a cadence a cell still trains resumably and saves
    only when a stop signal comes (a scheduler's preemption notice)."""
    marker = partial / ".koff-partial.yaml"
    started = _stored_cadence(marker, cfg) if marker.is_file() else None
    if started:
        return started, True
    if partial.exists():
        remove_tree(partial)  # an interrupted cell of another configuration: start it over
    return checkpoint_every or cfg.train.steps, False


def missing_cells(spec: dict, only: list[str] | None = None, ids: list[str] | None = None,
                  limit: int | None = None) -> list[Cell]:
    """The cells of a loaded grid that have no result yet: those whose id contains one of `only`,
    or is one of `ids` (exactly), at most `limit` of them."""
    results = Path(spec.get("results", "results")) / "cells"
    cells = expand(spec)
    if ids:
        unknown = sorted(set(ids) - {c.id for c in cells})
        if unknown:
            raise ConfigError(f"{spec['_path']}: no cell has the id {unknown[0]!r} (see koff compare --dry-run)")
        cells = [c for c in cells if c.id in ids]
    todo = [c for c in cells if not (results / f"{c.id}.json").is_file()]
    if only:
        todo = [c for c in todo if any(o in c.id for o in only)]
    return todo[:limit] if limit is not None else todo


def compare(config: Path, only: list[str] | None = None, limit: int | None = None, progress: bool = True,
            dry_run: bool = False, runtime=None, dtype: str | None = None, checkpoint_every: int = 0,
            ids: list[str] | None = None) -> list[str]:
    """Run every missing cell of a grid (optionally only ids containing one of `only`, or exactly
    `ids`; at most `limit` cells); returns the ids run (or, with `dry_run`, the ids that would
    run). `runtime` sets the device (and evaluation dtype); `dtype` overrides every cell's
    `train.dtype`; `checkpoint_every` makes each cell's training save that often (it changes no
    result). Cells are claimed (`koff.core.claims`), so workers on any number of hosts sharing the
    results folder can fill one grid. A stop signal (`koff.training.preemption`) checkpoints the
    cell in training and raises `Preempted`; a signal during an evaluation stops before the next cell."""
    spec = load_grid(config)
    if dtype is not None:
        spec["base"] = _merge(spec["base"], {"train": {"dtype": dtype}})
    results = Path(spec.get("results", "results")) / "cells"
    todo = missing_cells(spec, only, ids, limit)
    if dry_run:
        return [c.id for c in todo]
    done: list[str] = []
    for c in todo:
        if preemption.received() is not None:
            raise preemption.Preempted(f"koff compare: stopped by a signal after {len(done)} cell(s); the cells "
                                       "left run when the same command runs again", preemption.received())
        if (results / f"{c.id}.json").is_file():
            continue  # another worker finished it meanwhile
        with claim(results / f"{c.id}.lock") as mine:
            if not mine or (results / f"{c.id}.json").is_file():
                continue
            run_cell(c, spec, progress, runtime, checkpoint_every)
            done.append(c.id)
    return done

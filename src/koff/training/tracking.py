"""Experiment trackers: `--report-to tensorboard wandb mlflow trackio` (or `report_to:` in a config).

metrics.jsonl stays the record koff itself reads; a tracker gets a copy of the same records as
they are written, through each library's own API: every numeric field of a record as a scalar
(nested mappings flattened, `domain_weights/en`), its loss again as `loss/<domain>` (one curve per
domain), and its text fields (`phase`, `kind`, ...) as text whenever they change; the run's
config once at the start; evaluation tables (`koff evaluate`, `koff compare` cells) as tables and
Markdown. Only the main process of a launch reports. The libraries are optional
(`pip install 'koff[tracking]'`) and imported only when named.

Where they write, offline by default:
  tensorboard  DIR/tensorboard/NAME/ (event files: `tensorboard --logdir DIR/tensorboard`)
  wandb        DIR/wandb/ (online if you are logged in; WANDB_MODE=offline to keep it local,
               `wandb sync` later); the run id is derived from NAME, so a resumed run continues
               the same W&B run
  mlflow       $MLFLOW_TRACKING_URI, else a local file store DIR/mlruns (`mlflow ui --backend-store-uri`)
  trackio      $TRACKIO_DIR, else DIR/trackio (SQLite; `trackio show`)
with DIR = --tracking-dir, else $KOFF_TRACKING_DIR, else `tracking/` beside the run's folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from koff.core.errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
EXTRA = "koff[tracking]"
_MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny", "trackio": "trackio"}
PROJECT = "koff"
"""Project / experiment name the trackers file runs under (W&B project, MLflow experiment, trackio
project); $KOFF_TRACKING_PROJECT overrides it."""


def parse_report_to(value, where: str = "report_to") -> list[str]:
    """The tracker names of `--report-to` / `report_to:` ("none" or nothing: no tracker)."""
    if value is None:
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{where}: expected a tracker name or a list of them ({', '.join(TRACKERS)}, none), "
                          f"got {value!r}")
    out = []
    for n in names:
        n = n.strip().lower()
        if n == "none":
            continue
        if n not in TRACKERS:
            raise ConfigError(f"{where}: unknown tracker {n!r}; expected {', '.join(TRACKERS)} or none")
        if n not in out:
            out.append(n)
    if "none" in [n.strip().lower() for n in names] and out:
        raise ConfigError(f"{where}: 'none' cannot be combined with trackers {out}")
    return out


def _require(name: str):
    import importlib

    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as e:
        raise ConfigError(f"--report-to {name} needs the {_PACKAGES[name]} package ({e}): "
                          f"pip install '{EXTRA}'") from None


def flatten(record: Mapping, prefix: str = "") -> tuple[dict[str, float], dict[str, str]]:
    """A metrics record split into numeric scalars and text fields; nested mappings become
    `key/sub` (None values are left out: a field with no value at this step)."""
    numbers: dict[str, float] = {}
    texts: dict[str, str] = {}
    for k, v in record.items():
        key = f"{prefix}{k}"
        if isinstance(v, (bool, int, float)):
            numbers[key] = float(v)
        elif isinstance(v, str):
            texts[key] = v
        elif isinstance(v, Mapping):
            n, t = flatten(v, f"{key}/")
            numbers.update(n)
            texts.update(t)
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            numbers.update({f"{key}/{i}": float(x) for i, x in enumerate(v)})
    return numbers, texts


def _markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(empty)"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _run_id(name: str) -> str:
    """A stable id for a run name (W&B ids: letters and digits), so a resumed run reports to the
    run it started."""
    return hashlib.sha256(name.encode()).hexdigest()[:16]


class Backend:
    """One library's side of a tracker."""

    def scalars(self, values: dict[str, float], step: int) -> None: ...
    def text(self, key: str, value: str, step: int) -> None: ...
    def config(self, config: dict) -> None: ...
    def table(self, name: str, rows: list[dict], markdown: str) -> None: ...
    def close(self) -> None: ...


class _TensorBoard(Backend):
    def __init__(self, name: str, directory: Path):
        tb = _require("tensorboard")
        self.logdir = directory / "tensorboard" / name
        self.writer = tb.SummaryWriter(log_dir=str(self.logdir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def text(self, key: str, value: str, step: int) -> None:
        self.writer.add_text(key, value, step)

    def config(self, config: dict) -> None:
        import yaml

        self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def table(self, name: str, rows: list[dict], markdown: str) -> None:
        self.writer.add_text(name, markdown, 0)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class _Wandb(Backend):
    def __init__(self, name: str, directory: Path, config: dict | None):
        wandb = _require("wandb")
        self.wandb = wandb
        (directory / "wandb").parent.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or os.environ.get("KOFF_TRACKING_PROJECT", PROJECT),
                              name=name, id=_run_id(name), resume="allow", dir=str(directory), config=config or {},
                              reinit="create_new")
        self.run.define_metric("koff/step")
        self.run.define_metric("*", step_metric="koff/step")

    def scalars(self, values: dict[str, float], step: int) -> None:
        # W&B drops rows whose step is not above the last one, and a decompose logs the reference's
        # steps 0..N, then the run's 0..N: W&B counts its own steps, koff's is the x-axis "koff/step"
        self.run.log({**values, "koff/step": step})

    def text(self, key: str, value: str, step: int) -> None:
        self.run.summary[key] = value  # W&B keeps one value per key in the summary; the scalars carry the curve

    def config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def table(self, name: str, rows: list[dict], markdown: str) -> None:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        self.run.log({name: self.wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])})
        self.run.summary[f"{name}_markdown"] = markdown

    def close(self) -> None:
        self.run.finish()


class _MLflow(Backend):
    def __init__(self, name: str, directory: Path):
        mlflow = _require("mlflow")
        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a local file store: what runs with the client alone (mlflow-skinny has no SQL backend)
            uri = (directory / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(os.environ.get("KOFF_TRACKING_PROJECT", PROJECT))
        found = mlflow.search_runs(filter_string=f"tags.koff_run_id = '{_run_id(name)}'", output_format="list")
        self.run = mlflow.start_run(run_id=found[0].info.run_id) if found else mlflow.start_run(
            run_name=name, tags={"koff_run_id": _run_id(name)})

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({_mlflow_key(k): v for k, v in values.items()}, step=step)

    def text(self, key: str, value: str, step: int) -> None:
        self.mlflow.set_tag(_mlflow_key(key), value)

    def config(self, config: dict) -> None:
        params: dict = {}

        def walk(prefix: str, d: Mapping) -> None:  # every leaf as written (6 stays "6")
            for k, v in d.items():
                if isinstance(v, Mapping) and v:
                    walk(f"{prefix}{k}.", v)
                else:
                    params[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else v

        walk("", config)
        self.mlflow.log_params({_mlflow_key(k): str(v)[:6000] for k, v in params.items()})
        self.mlflow.log_dict(config, "config.json")

    def table(self, name: str, rows: list[dict], markdown: str) -> None:
        self.mlflow.log_dict({"rows": rows}, f"{name}.json")
        self.mlflow.log_text(markdown, f"{name}.md")

    def close(self) -> None:
        self.mlflow.end_run()


def _mlflow_key(key: str) -> str:
    import re

    # "/" would make a metric both a file and a folder (loss, loss/en) in MLflow's file store
    return re.sub(r"[^A-Za-z0-9_\-. ]", "_", key.replace("/", "."))


class _Trackio(Backend):
    def __init__(self, name: str, directory: Path, config: dict | None):
        os.environ.setdefault("TRACKIO_DIR", str((directory / "trackio").resolve()))
        trackio = _require("trackio")
        self.trackio = trackio
        self.run = trackio.init(project=os.environ.get("KOFF_TRACKING_PROJECT", PROJECT), name=name,
                                config=config or {}, resume="allow", embed=False, auto_log_gpu=False,
                                auto_log_cpu=False)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.trackio.log(values, step=step)

    def text(self, key: str, value: str, step: int) -> None:
        pass  # trackio plots numbers; the text fields stay in metrics.jsonl

    def config(self, config: dict) -> None:
        pass  # given to trackio.init

    def table(self, name: str, rows: list[dict], markdown: str) -> None:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        self.trackio.log({name: self.trackio.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])})

    def close(self) -> None:
        self.trackio.finish()


class Tracker:
    """The trackers of one run: `log` a metrics record, `log_config`, `log_table`, `close`.
    `scoped(prefix)` reports a second model of the same command (the reference) under PREFIX/."""

    def __init__(self, backends: list[Backend], prefix: str = ""):
        self.backends = backends
        self.prefix = prefix
        self._last_text: dict[str, str] = {}
        self._offset = 0

    def scoped(self, prefix: str) -> Tracker:
        child = Tracker(self.backends, f"{self.prefix}{prefix}/")
        return child

    def log(self, record: Mapping, step: int | None = None) -> None:
        """One metrics.jsonl record (its `step` field unless `step` is given)."""
        step = int(record.get("step", 0) if step is None else step)
        numbers, texts = flatten(record, self.prefix)
        numbers.pop(f"{self.prefix}step", None)
        if isinstance(record.get("domain"), str) and isinstance(record.get("loss"), (int, float)):
            numbers[f"{self.prefix}loss/{record['domain']}"] = float(record["loss"])
        for b in self.backends:
            b.scalars(numbers, step)
        for k, v in texts.items():
            if self._last_text.get(k) != v:
                self._last_text[k] = v
                for b in self.backends:
                    b.text(k, v, step)

    def log_config(self, config: dict) -> None:
        for b in self.backends:
            b.config(config)

    def log_table(self, name: str, rows: list[dict], markdown: str | None = None) -> None:
        """An evaluation table: rows of {column: value}."""
        md = markdown if markdown is not None else _markdown_table(rows)
        for b in self.backends:
            b.table(f"{self.prefix}{name}", rows, md)

    def close(self) -> None:
        for b in self.backends:
            b.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tracking_dir(output: Path | None, given: Path | None = None) -> Path:
    """Where file-based trackers write: `given`, $KOFF_TRACKING_DIR, or tracking/ beside `output`."""
    if given is not None:
        return Path(given)
    env = os.environ.get("KOFF_TRACKING_DIR")
    if env:
        return Path(env)
    return (Path(output).parent if output is not None else Path.cwd()) / "tracking"


def open_tracker(names: Iterable[str], run_name: str, directory: Path, config: dict | None = None,
                 is_main: bool = True) -> Tracker | None:
    """A Tracker reporting to each named library (None: no tracker, or not the main process).
    A library that is not installed is named in a ConfigError before anything runs."""
    names = parse_report_to(list(names))
    if not names or not is_main:
        return None
    import importlib.util

    for n in names:  # all missing ones refused before any run is opened (found, not imported: trackio
        try:         # reads TRACKIO_DIR when imported)
            found = importlib.util.find_spec(_MODULES[n].split(".")[0]) is not None
        except (ImportError, ValueError):
            found = False
        if not found or (n == "tensorboard" and importlib.util.find_spec("tensorboard") is None):
            raise ConfigError(f"--report-to {n} needs the {_PACKAGES[n]} package, which is not installed: "
                              f"pip install '{EXTRA}'")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    backends: list[Backend] = []
    try:
        for n in names:
            if n == "tensorboard":
                backends.append(_TensorBoard(run_name, directory))
            elif n == "wandb":
                backends.append(_Wandb(run_name, directory, config))
            elif n == "mlflow":
                backends.append(_MLflow(run_name, directory))
            elif n == "trackio":
                backends.append(_Trackio(run_name, directory, config))
    except BaseException:
        for b in backends:
            b.close()
        raise
    tracker = Tracker(backends)
    if config is not None:
        tracker.log_config(json.loads(json.dumps(config, default=str)))
    return tracker


def eval_rows(result: Mapping) -> list[dict]:
    """An evaluation as table rows, one per model row, one column per domain (test perplexity):
    `koff evaluate`'s result (perplexity.json: rows -> domain -> subset) or a `koff compare`
    cell's (ppl: domain -> row -> subset)."""
    table: dict[str, dict] = {}
    if isinstance(result.get("rows"), Mapping):
        for method, per_domain in result["rows"].items():
            for domain, subsets in per_domain.items():
                table.setdefault(method, {"model": method})[domain] = subsets.get("test", {}).get("ppl")
    elif isinstance(result.get("ppl"), Mapping):
        for domain, per_row in result["ppl"].items():
            for method, subsets in per_row.items():
                table.setdefault(method, {"model": method})[domain] = subsets.get("test", {}).get("ppl")
    return list(table.values())


def log_evaluation(tracker: Tracker | None, result: Mapping, markdown: str | None = None, step: int = 0,
                   name: str = "eval/perplexity") -> None:
    """Report an evaluation: the table, and each of its perplexities as a scalar NAME/MODEL/DOMAIN."""
    if tracker is None:
        return
    rows = eval_rows(result)
    tracker.log_table(name, rows, markdown)
    values = {f"{tracker.prefix}{name}/{r['model']}/{d}": v for r in rows for d, v in r.items()
              if d != "model" and isinstance(v, (int, float))}
    for b in tracker.backends:
        b.scalars(values, step)


__all__ = ["TRACKERS", "EXTRA", "Tracker", "open_tracker", "parse_report_to", "tracking_dir", "flatten", "eval_rows", "log_evaluation"]

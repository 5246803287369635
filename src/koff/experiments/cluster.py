"""A grid on a cluster: one job per missing cell, through submitit (SLURM, or local processes), or
one command line per missing cell for any other scheduler.

Each job runs `compare(grid, ids=[cell])` in its own process, so it claims its cell like any other
worker (`koff.core.claims`): jobs, `koff compare` workers and a second submission of the same grid
never run a cell twice, and a job whose cell is done or claimed exits at once.

Preemption and time limits follow submitit's protocol. submitit's SLURM jobs get
`--signal=USR2@<signal_delay_s>`, and on that signal submitit calls the job's `checkpoint()` and
requeues it. Here the signal (or a SIGTERM / SIGUSR1 from the scheduler) first reaches koff's own
handler (`koff.training.preemption`): the training step in flight completes and the cell's state is
saved. Then the job hands the signal back to submitit, whose handler requeues the same cell, which
resumes from that state. Resuming is exact, so a preempted cell's result equals an uninterrupted one.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from koff.core.errors import ConfigError, KoffError
from koff.experiments.compare import compare, load_grid, missing_cells
from koff.training import preemption

EXECUTORS = ("local", "slurm")
"""Where `koff compare --executor` runs cells: submitit's cluster names."""

DEFAULTS = {"timeout_min": 24 * 60, "slurm_signal_delay_s": 120}
"""Job parameters when neither the grid's `cluster:` nor `--cluster-param` sets them: a day per
job, and two minutes between the preemption notice and the kill (a checkpoint of a 1B model on a
network filesystem takes tens of seconds)."""


def _submitit():
    try:
        import submitit
    except ImportError:
        raise KoffError("koff compare --executor needs submitit: pip install 'koff[cluster]'") from None
    return submitit


def preemption_signal() -> int:
    """The signal submitit's jobs treat as "checkpoint and requeue" (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise)."""
    name = _submitit().JobEnvironment.USR_SIG
    return int(getattr(signal, name if name.startswith("SIG") else "SIG" + name))


@dataclass
class CellJob:
    """One grid cell as a submitit job: called to run the cell, `checkpoint()`-ed to requeue it."""

    grid: str
    cell: str
    cwd: str
    """The submitting command's directory: the grid's relative `results` and `work` paths are taken from it."""
    checkpoint_every: int = 0
    device: str = "auto"
    dtype: str | None = None

    def __call__(self) -> list[str]:
        from koff.core.runtime import Runtime

        os.chdir(self.cwd)
        usr = preemption_signal()
        try:
            with preemption.handle_signals((*preemption.SIGNALS, usr)):
                return compare(Path(self.grid), ids=[self.cell], progress=False,
                               runtime=Runtime.from_env(self.device, self.dtype or "float32"),
                               dtype=self.dtype, checkpoint_every=self.checkpoint_every)
        except preemption.Preempted as e:
            print(f"koff: {e}", file=sys.stderr, flush=True)
            if not e.saved:
                raise
            preemption.reset()
            signal.raise_signal(usr)  # submitit's handler now runs: checkpoint() -> requeue -> exit
            raise  # only where no submitit handler is installed (a CellJob called by hand)

    def checkpoint(self, *args, **kwargs):
        """Requeue the same cell: it resumes from the state its training saved."""
        return _submitit().helpers.DelayedSubmission(self)


def executor_parameters(spec: dict, overrides: dict) -> dict:
    """submitit parameters for a grid's jobs: DEFAULTS, then the grid's `cluster:`, then `overrides`."""
    return {**DEFAULTS, **spec.get("cluster", {}), **overrides}


def make_executor(kind: str, folder: Path, parameters: dict, where: str):
    """A submitit executor of `kind` writing its logs under `folder`, with `parameters` checked."""
    if kind not in EXECUTORS:
        raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)}, got {kind!r}")
    if any(parameters.get(k, 1) != 1 for k in ("nodes", "tasks_per_node", "slurm_ntasks_per_node")):
        raise ConfigError(f"{where}: a cell job runs one process (nodes and tasks_per_node 1); a cell trained by "
                          "several processes is a launch: run `koff compare --commands` lines under torchrun or "
                          "accelerate launch in your own job script")
    submitit = _submitit()
    executor = submitit.AutoExecutor(folder=str(folder), cluster=kind)
    try:
        executor.update_parameters(**parameters)
    except (AssertionError, NameError, TypeError, ValueError) as e:  # submitit names the unknown parameter and lists the valid ones
        raise ConfigError(f"{where}: {' '.join(str(e).split())}") from None
    return executor


def submit(config: Path, executor: str, only: list[str] | None = None, limit: int | None = None,
           checkpoint_every: int = 0, device: str = "auto", dtype: str | None = None,
           parameters: dict | None = None, folder: Path | None = None, wait: bool = False,
           ids: list[str] | None = None) -> list[tuple[str, Any]]:
    """Submit one job per missing cell of the grid at `config` (selected as `compare` selects);
    returns (cell id, submitit job) pairs. With `wait`, blocks until every job ends and raises if
    one failed (naming it and its log)."""
    config = Path(config).resolve()
    spec = load_grid(config)
    cells = missing_cells(spec, only, ids, limit)
    if not cells:
        return []
    folder = Path(folder) if folder is not None else Path(spec.get("results", "results")) / "jobs"
    params = executor_parameters(spec, parameters or {})
    params.setdefault("name", f"koff-{spec.get('name') or config.stem}")
    ex = make_executor(executor, folder, params, f"{config}: cluster (or --cluster-param)")
    jobs = [ex.submit(CellJob(str(config), c.id, os.getcwd(), checkpoint_every, device, dtype)) for c in cells]
    if wait:
        failed = []
        for c, job in zip(cells, jobs):
            try:
                job.result()
            except Exception as e:  # submitit re-raises the job's error (or a lost job's state)
                failed.append(f"{c.id} (job {job.job_id}, log {job.paths.stderr}): {' '.join(str(e).split())[-300:]}")
        if failed:
            raise KoffError(f"{len(failed)} of {len(jobs)} cell job(s) failed: " + "; ".join(failed))
    return [(c.id, job) for c, job in zip(cells, jobs)]


def commands(config: Path, only: list[str] | None = None, limit: int | None = None, extra: Sequence[str] = (),
             ids: list[str] | None = None) -> list[str]:
    """One shell command per missing cell of the grid (for a scheduler submitit does not drive):
    each runs exactly that cell, claims it, and resumes it if it was interrupted."""
    spec = load_grid(Path(config))
    base = ["koff", "compare", str(config)]
    return [shlex.join([*base, "--cell", c.id, *extra]) for c in missing_cells(spec, only, ids, limit)]


__all__ = ["CellJob", "DEFAULTS", "EXECUTORS", "commands", "executor_parameters", "make_executor",
           "preemption_signal", "submit"]

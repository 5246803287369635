"""`koff compare`: run a grid of methods x seeds (cells that have results are skipped)."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from koff.cli.args import add_runtime_args, count, positive_int, runtime
from koff.experiments.cluster import EXECUTORS, commands, submit
from koff.experiments.compare import compare

NAME = "compare"
HELP = "run a grid of methods x seeds (skips cells that have results)"


def _param(text: str) -> tuple[str, object]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. slurm_partition=gpu), got {text!r}")
    return key, yaml.safe_load(value) if value else value  # 240 -> int, gpu -> str, as in the grid's YAML


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="grid config (YAML), e.g. configs/grid.yaml")
    p.add_argument("--only", nargs="+", help="run only cells whose id contains one of these")
    p.add_argument("--cell", action="extend", nargs="+", metavar="ID", help="run exactly these cells (ids as --dry-run lists them)")
    p.add_argument("--limit", type=positive_int, help="run at most N cells this time")
    p.add_argument("--dry-run", action="store_true", help="list the cells that would run")
    p.add_argument("--checkpoint-every", type=count, default=0, metavar="N",
                   help="save each cell's training state every N steps (changes no result); an interrupted cell "
                        "resumes from it. Without it a cell saves only when a stop signal (SIGTERM/SIGUSR1) comes")
    p.add_argument("--executor", choices=EXECUTORS,
                   help="submit one job per missing cell through submitit instead of running them here: 'slurm' "
                        "(sbatch; returns once submitted unless --wait) or 'local' (processes on this machine; waits)")
    p.add_argument("--cluster-param", type=_param, action="append", metavar="KEY=VALUE", default=[],
                   help="a submitit executor parameter over the grid's 'cluster:' mapping (repeatable), e.g. "
                        "timeout_min=240, slurm_partition=gpu, gpus_per_node=1, cpus_per_task=8, mem_gb=64")
    p.add_argument("--jobs-dir", type=Path, help="where submitit keeps job logs (default: RESULTS/jobs)")
    p.add_argument("--wait", action="store_true", help="with --executor slurm: wait for every job to end")
    p.add_argument("--commands", action="store_true",
                   help="print one command line per missing cell (for any other scheduler) and exit")
    add_runtime_args(p, "precision of the base weights, in training and evaluation")
    p.set_defaults(stoppable=True)


def _flags(args: argparse.Namespace) -> list[str]:
    """The flags each cell's own command or job repeats."""
    out = ["--checkpoint-every", str(args.checkpoint_every)] if args.checkpoint_every else []
    if args.device != "auto":
        out += ["--device", args.device]
    return out + (["--dtype", args.dtype] if args.dtype else [])


def run(args: argparse.Namespace) -> int:
    if args.commands:
        for line in commands(args.config, only=args.only, limit=args.limit, extra=_flags(args), ids=args.cell):
            print(line)
        return 0
    if args.executor and not args.dry_run:
        wait = args.wait or args.executor == "local"
        jobs = submit(args.config, args.executor, only=args.only, limit=args.limit,
                      checkpoint_every=args.checkpoint_every, device=args.device, dtype=args.dtype,
                      parameters=dict(args.cluster_param), folder=args.jobs_dir,
                      wait=wait, ids=args.cell)
        if not jobs:
            print("submitted nothing (every cell has a result)")
        for cell, job in jobs:
            print(f"{'ran' if wait else 'submitted'} job {job.job_id}: {cell}  (log {job.paths.stderr})")
        return 0
    ids = compare(args.config, only=args.only, limit=args.limit, dry_run=args.dry_run, runtime=runtime(args),
                  dtype=args.dtype, checkpoint_every=args.checkpoint_every, ids=args.cell)
    verb = "would run" if args.dry_run else "ran"
    print(f"{verb} {len(ids)} cell(s)" + (":\n  " + "\n  ".join(ids) if ids else " (every cell has a result)"))
    return 0

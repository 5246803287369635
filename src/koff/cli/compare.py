"""`koff compare`: run a grid of methods x seeds (cells that have results are skipped)."""

from __future__ import annotations

import argparse
from pathlib import Path

from koff.cli.args import add_runtime_args, count, positive_int, runtime
from koff.experiments.compare import compare

NAME = "compare"
HELP = "run a grid of methods x seeds (skips cells that have results)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="grid config (YAML), e.g. configs/grid.yaml")
    p.add_argument("--only", nargs="+", help="run only cells whose id contains one of these")
    p.add_argument("--limit", type=positive_int, help="run at most N cells this time")
    p.add_argument("--dry-run", action="store_true", help="list the cells that would run")
    p.add_argument("--checkpoint-every", type=count, default=0, metavar="N",
                   help="save each cell's training state every N steps; an interrupted cell resumes from it "
                        "(changes no result)")
    add_runtime_args(p, "precision of the base weights, in training and evaluation")


def run(args: argparse.Namespace) -> int:
    ids = compare(args.config, only=args.only, limit=args.limit, dry_run=args.dry_run, runtime=runtime(args),
                  dtype=args.dtype, checkpoint_every=args.checkpoint_every)
    verb = "would run" if args.dry_run else "ran"
    print(f"{verb} {len(ids)} cell(s)" + (":\n  " + "\n  ".join(ids) if ids else " (every cell has a result)"))
    return 0

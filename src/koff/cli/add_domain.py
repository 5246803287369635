"""`koff add-domain`: train a new memory on a run's frozen backbone and add it to the run."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from koff.cli.args import (
    add_resume_arg,
    add_runtime_args,
    add_tracking_args,
    open_command_tracker,
    positive_int,
    report_to,
    runtime,
)
from koff.core.errors import ConfigError
from koff.core.names import check_memory_name
from koff.data.text import Domain, bundled_domain, general_files
from koff.training.pipeline import add_domain

NAME = "add-domain"
HELP = "train a new memory on a run's frozen backbone and add it"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path)
    p.add_argument("--name", required=True, help="memory name (a bundled language when no --train is given)")
    p.add_argument("--train", type=Path, nargs="+", help="training files (.txt or .jsonl)")
    p.add_argument("--test", type=Path, nargs="+", help="test files")
    p.add_argument("--text-field", default="text")
    p.add_argument("--general", nargs="+", help="general data for regularization ('bundled', 'none' or files; "
                                                "default: the run's)")
    p.add_argument("--steps", type=positive_int, help="training steps (default: the run's)")
    p.add_argument("--no-reference", action="store_true", help="skip training it on the dense reference too")
    p.add_argument("--overwrite", action="store_true", help="replace a memory of the same name")
    add_resume_arg(p, "add-domain")
    p.add_argument("--model", help="base model location, if it moved since the run was made")
    add_runtime_args(p)
    add_tracking_args(p)


def run(args: argparse.Namespace) -> int:
    check_memory_name(args.name, "--name")
    if args.test and not args.train:
        raise ConfigError("--test needs --train: a bundled domain brings its own test files")
    if args.train:
        domain = Domain(name=args.name, train=list(args.train), test=list(args.test or []), text_field=args.text_field)
    else:
        domain = bundled_domain(args.name)
    general = None
    if args.general:
        general = general_files() if args.general == ["bundled"] else [] if args.general == ["none"] else args.general
    rt = runtime(args)
    with contextlib.ExitStack() as stack:
        tracker = open_command_tracker(args, report_to(args), args.run, f"{args.run.name}+{args.name}", None, rt)
        if tracker is not None:
            stack.enter_context(tracker)
        path = add_domain(args.run, domain, steps=args.steps, general=general, reference=not args.no_reference,
                          overwrite=args.overwrite, model=args.model, runtime=rt, resume=args.resume,
                          tracker=tracker)
    print(f"wrote {path}")
    return 0

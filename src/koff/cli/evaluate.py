"""`koff evaluate`: the perplexity table of a run (dense, memories, backbone, swap matrix)."""

from __future__ import annotations

import argparse
from pathlib import Path

from koff.cli.args import (
    add_eval_args,
    add_runtime_args,
    add_tracking_args,
    eval_settings,
    name_files,
    open_command_tracker,
    positive_int,
    report_to,
    runtime,
)
from koff.evaluation.perplexity import evaluate_run, print_result, to_markdown
from koff.evaluation.tasks import TASK_FILES
from koff.training.tracking import log_evaluation

NAME = "evaluate"
HELP = "perplexity table of a run (dense, memories, backbone, swap matrix)"


def task(value: str) -> tuple[str, int]:
    """An argparse type: TASK[=N] (N items, default 200)."""
    name, _, n = value.partition("=")
    if name not in TASK_FILES:
        raise argparse.ArgumentTypeError(f"unknown task {name!r}; known: {', '.join(sorted(TASK_FILES))}")
    return name, positive_int(n) if n else 200


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path)
    p.add_argument("--model", help="base model location, if it moved since the run was made")
    add_eval_args(p)
    p.add_argument("--test", type=name_files, action="append", metavar="NAME=FILE[,FILE]",
                   help="score on these files instead of the run's test splits: a domain's name scores its memory "
                        "on them, a new name scores the backbone and every memory (repeatable)")
    p.add_argument("--tasks", type=task, nargs="+", metavar="TASK[=N]",
                   help="also score general-ability tasks (arc_challenge, piqa, gsm8k, ...; N items, default 200) "
                        "for the dense model, the backbone and the run's default memory")
    p.add_argument("--tag", default="", help="write eval/perplexity-TAG.{json,md} (default: perplexity.{json,md})")
    add_runtime_args(p)
    add_tracking_args(p)


def run(args: argparse.Namespace) -> int:
    settings = eval_settings(args)
    rt = runtime(args)
    result = evaluate_run(args.run, settings, model=args.model, runtime=rt)
    print_result(result)
    names = report_to(args)
    if names:
        with open_command_tracker(args, names, args.run, args.run.name, None, rt) as tracker:
            log_evaluation(tracker, result, to_markdown(result),
                           name="eval/perplexity" + (f"-{settings.tag}" if settings.tag else ""))
    stem = "perplexity" + (f"-{settings.tag}" if settings.tag else "")
    print(f"wrote {args.run / 'eval' / stem}.json and {stem}.md")
    return 0

"""`koff lm-eval`: score a run's backbone + a memory with EleutherAI's lm-evaluation-harness."""

from __future__ import annotations

import argparse
from pathlib import Path

from koff.cli.args import add_runtime_args, positive_int
from koff.core.errors import ConfigError

NAME = "lm-eval"
HELP = "score a run's backbone + a memory with EleutherAI's lm-evaluation-harness"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path)
    p.add_argument("--memory", help="memory name (default: none, the bare backbone)")
    p.add_argument("--tasks", nargs="+", default=["arc_challenge_koff"],
                   help="lm-eval tasks: the bundled local ones (arc_challenge_koff, piqa_koff, openbookqa_koff, "
                        "copa_koff) or any lm-eval task reachable from here")
    p.add_argument("--limit", type=positive_int, help="only the first N documents of each task")
    p.add_argument("--eval-batch-size", type=positive_int, default=16)
    add_runtime_args(p)


def run(args: argparse.Namespace) -> int:
    try:  # an optional extra: imported only when the command runs
        from lm_eval.utils import make_table

        from koff.evaluation.lmeval import evaluate
    except ImportError:
        raise ConfigError("koff lm-eval needs lm-evaluation-harness: pip install 'koff[lmeval]'") from None
    result = evaluate(args.run, args.tasks, memory=args.memory, limit=args.limit, device=args.device,
                      dtype=args.dtype or "float32", batch_size=args.eval_batch_size)
    print(make_table(result))
    return 0

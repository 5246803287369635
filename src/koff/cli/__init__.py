"""The `koff` command line: one module per command, each adding its own parser (`NAME`, `HELP`,
`add_arguments`, `run`). Every command mirrors a Python function (see the docs' CLI reference)."""

from __future__ import annotations

import contextlib
import sys
from types import ModuleType

from koff.cli import (
    add_domain,
    analyze,
    compare,
    decompose,
    demo,
    evaluate,
    export,
    generate,
    lm_eval,
    plan,
    report,
    serve,
)
from koff.cli.args import Parser
from koff.core.errors import KoffError
from koff.core.version import __version__
from koff.training.preemption import EXIT_PREEMPTED, Preempted, handle_signals

COMMANDS: tuple[ModuleType, ...] = (decompose, evaluate, demo, export, generate, add_domain, analyze, compare, plan,
                                    lm_eval, report, serve)
"""The commands, in the order `koff --help` lists them."""


def make_parser() -> Parser:
    """The `koff` command line: one subcommand per job, each with its own flags."""
    parser = Parser(prog="koff", description="The `koff` command line. Every command mirrors a Python function.")
    parser.add_argument("--version", action="version", version=f"koff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.NAME, help=command.HELP)
        command.add_arguments(p)
        p.set_defaults(func=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; KoffErrors and file-system errors are one line on stderr and exit 2."""
    args = make_parser().parse_args(argv)
    try:
        with handle_signals() if getattr(args, "stoppable", False) else contextlib.nullcontext():
            return args.func(args)
    except Preempted as e:
        print(f"koff: {e}", file=sys.stderr)
        # 75 (EX_TEMPFAIL): checkpointed, run again with --resume auto; killed-by-signal's code when nothing was saved
        return EXIT_PREEMPTED if e.saved else 128 + (e.signum or 15)
    except KoffError as e:
        print("koff: error: " + " ".join(str(e).splitlines()), file=sys.stderr)  # one line, always
        return 2
    except OSError as e:  # the file system refused (disk full, permissions, ...): not a bug in koff
        print(f"koff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("koff: interrupted; every file written before is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

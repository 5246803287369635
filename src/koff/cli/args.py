"""What the commands share: argument types, the parser class, runtime and evaluation flags, and
the flags generated from the config dataclasses (one per field, typed, with the field's own
docstring as help and its choices from the list config validation reads)."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

from koff.config.recipe import POSITIVE, MemoryConfig, TrainConfig, choices
from koff.core.fields import field_docs
from koff.core.runtime import DTYPES, Runtime
from koff.evaluation.perplexity import EvalSettings
from koff.training.preemption import EXIT_PREEMPTED
from koff.training.tracking import TRACKERS, open_tracker, parse_report_to, tracking_dir

MAX_NEW_TOKENS = 4096


def positive_int(value: str) -> int:
    """An argparse type: a whole number >= 1."""
    n = count(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {n}")
    return n


def count(value: str) -> int:
    """An argparse type: a whole number >= 0."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {n}")
    return n


def finite(value: str) -> float:
    """An argparse type: a finite number."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return x


def positive_float(value: str) -> float:
    """An argparse type: a finite number > 0."""
    x = finite(value)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {x}")
    return x


def new_tokens(value: str) -> int:
    """An argparse type: tokens to generate, 1 to MAX_NEW_TOKENS."""
    n = positive_int(value)
    if n > MAX_NEW_TOKENS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_NEW_TOKENS}, got {n}")
    return n


def fraction(value: str) -> float:
    """An argparse type: a number strictly between 0 and 1."""
    x = finite(value)
    if not 0 < x < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {x}")
    return x


def temperature(value: str) -> float:
    """An argparse type: a sampling temperature (0: greedy)."""
    t = finite(value)
    if t < 0:
        raise argparse.ArgumentTypeError(f"expected 0 (greedy) or more, got {t}")
    return t


def block(value: str) -> int:
    """An argparse type: an evaluation block length (>= 2 tokens)."""
    n = positive_int(value)
    if n < 2:
        raise argparse.ArgumentTypeError(f"expected a block of at least 2 tokens, got {n}")
    return n


def name_files(value: str) -> tuple[str, list[Path]]:
    """An argparse type: NAME=FILE[,FILE...]."""
    if "=" not in value:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE[,FILE...], got {value!r}")
    name, files = value.split("=", 1)
    return name, [Path(f) for f in files.split(",") if f]


def name_number(value: str) -> tuple[str, float]:
    """An argparse type: NAME=NUMBER."""
    name, sep, number = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=NUMBER, got {value!r}")
    return name, finite(number)


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as koff's: one line on stderr, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"koff: error: {self.prog}: {message} (see {self.prog} --help)\n")


def add_runtime_args(p: argparse.ArgumentParser, dtype_help: str = "precision of the base weights") -> None:
    """--device and --dtype (every command that runs the model takes both)."""
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=sorted(DTYPES), help=f"{dtype_help} (default float32)")


def runtime(args) -> Runtime:
    """The device and precision the flags name."""
    return Runtime.from_env(args.device, args.dtype or "float32")


def add_eval_args(p: argparse.ArgumentParser, max_tokens: int | None = None) -> None:
    """--block, --max-tokens, --eval-batch-size."""
    p.add_argument("--block", type=block, default=256, help="evaluation block length in tokens (default 256)")
    p.add_argument("--max-tokens", type=positive_int, default=max_tokens,
                   help="score only the first N test tokens per domain (default: the whole split)")
    p.add_argument("--eval-batch-size", type=positive_int, default=8)


def eval_settings(args: argparse.Namespace) -> EvalSettings:
    """The EvalSettings the evaluation flags give."""

    tests: dict[str, list[str]] = {}
    for name, files in getattr(args, "test", None) or []:
        tests.setdefault(name, []).extend(str(f) for f in files)
    return EvalSettings(block=args.block, max_tokens=args.max_tokens, batch_size=args.eval_batch_size, tests=tests,
                        tasks=dict(getattr(args, "tasks", None) or []), tag=getattr(args, "tag", "") or "")


CONFIG_SECTIONS = {"train": TrainConfig, "memory": MemoryConfig}
FLAG_NAMES = {"target_sparsity": "sparsity"}
"""Fields whose flag is not the field's own name."""
SKIPPED = {"train": ("dtype",)}
"""Fields the command line sets another way (the base weights' dtype comes with --device as --dtype)."""


def _help(doc: str, default) -> str:
    first = doc.split("\n\n")[0].replace("\n", " ").replace("%", "%%")
    shown = "none" if default is None else " ".join(default) if isinstance(default, list) else default
    return f"{first} (default {shown})"


def add_config_flags(p: argparse.ArgumentParser, section: str, only: tuple[str, ...] | None = None) -> None:
    """One flag per field of a config section (`train` or `memory`): --field-name, typed by the
    field's default, its choices from `koff.config.recipe.choices`, its help the field's docstring.
    Flags given set `section.field`; `config_overrides` collects them."""
    cls = CONFIG_SECTIONS[section]
    docs = field_docs(cls)
    defaults = cls()
    group = p.add_argument_group(f"{section} settings (YAML section `{section}:`)")
    for f in dataclasses.fields(cls):
        if f.name in SKIPPED.get(section, ()) or (only is not None and f.name not in only):
            continue
        default = getattr(defaults, f.name)
        kw: dict = {"dest": f"{section}.{f.name}", "default": None, "help": _help(docs.get(f.name, ""), default)}
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, int):
            kw.update(type=positive_int if f.name in POSITIVE else count, metavar="N")
        elif isinstance(default, float):
            kw.update(type=finite, metavar="X")
        elif isinstance(default, str):
            kw["choices"] = choices(f.name)
        elif isinstance(default, list):
            kw.update(nargs="+", metavar="NAME")
        else:  # a mapping (train.dbl_reference: domain -> reference loss)
            kw.update(nargs="+", type=name_number, metavar="NAME=NUMBER")
        group.add_argument("--" + FLAG_NAMES.get(f.name, f.name).replace("_", "-"), **kw)


def config_overrides(args: argparse.Namespace, section: str) -> dict:
    """The `section` fields given on the command line, as a YAML section would hold them."""
    out = {}
    for key, value in vars(args).items():
        if key.startswith(section + ".") and value is not None:
            out[key.split(".", 1)[1]] = dict(value) if isinstance(value, list) and value and isinstance(value[0], tuple) else value
    return out


def _resume(value: str) -> str:
    if value != "auto":
        raise argparse.ArgumentTypeError(f"expected nothing or 'auto', got {value!r}")
    return value


def add_resume_arg(p: argparse.ArgumentParser, what: str) -> None:
    """--resume [auto]: continue from a checkpoint; 'auto' also starts fresh when there is none."""
    p.add_argument("--resume", nargs="?", const=True, default=False, type=_resume, metavar="auto",
                   help=f"continue an interrupted {what} from its checkpoint; '--resume auto' also starts fresh when "
                        "there is none (and checkpoints on SIGTERM/SIGUSR1 even without --checkpoint-every), so a "
                        f"requeued job can repeat its command line. A stop signal exits {EXIT_PREEMPTED} after "
                        "checkpointing")
    p.set_defaults(stoppable=True)


def add_tracking_args(p: argparse.ArgumentParser) -> None:
    """--report-to and --tracking-dir."""
    p.add_argument("--report-to", nargs="+", metavar="TRACKER", choices=[*TRACKERS, "none"],
                   help=f"also log metrics, config and evaluation tables to {', '.join(TRACKERS)} (several allowed; "
                        "default: the config's 'report_to', else none); metrics.jsonl is always written")
    p.add_argument("--tracking-dir", type=Path,
                   help="where file-based trackers write (default: OUTPUT/../tracking, or $KOFF_TRACKING_DIR)")


def report_to(args, raw_config: dict | None = None) -> list[str]:
    """--report-to, else the config's report_to (a command-line choice replaces the config's)."""
    if args.report_to is not None:
        return parse_report_to(args.report_to, "--report-to")
    where = f"{args.config}: report_to" if getattr(args, "config", None) else "report_to"
    return parse_report_to((raw_config or {}).get("report_to"), where)


def open_command_tracker(args, names: list[str], output: Path, run_name: str, config: dict | None, rt):
    """The tracker of a command (None: --report-to none, or not the main process)."""
    return open_tracker(names, run_name, tracking_dir(output, getattr(args, "tracking_dir", None)), config,
                        is_main=rt.is_main)

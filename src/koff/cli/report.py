"""`koff report`: Markdown tables + PNG plots from the cells of `koff compare`."""

from __future__ import annotations

import argparse
from pathlib import Path

from koff.experiments.report import report

NAME = "report"
HELP = "Markdown tables + PNG plots from the cells of `koff compare`"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", type=Path, help="the grid's results folder (holding cells/)")


def run(args: argparse.Namespace) -> int:
    print(f"wrote {report(args.results)}")
    return 0

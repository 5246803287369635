"""`koff analyze`: which neurons did offloading remove? (LAPE + enrichment statistics)"""

from __future__ import annotations

import argparse
from pathlib import Path

from koff.cli.args import add_runtime_args, fraction, positive_int, runtime
from koff.experiments.analysis import LapeSettings, analyze_run, odds_text
from koff.model.importance import SCORES

NAME = "analyze"
HELP = "which neurons did offloading remove? (LAPE + enrichment statistics)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path)
    p.add_argument("--tokens", type=positive_int, default=16384, help="tokens per language for activation counts")
    p.add_argument("--specific-rate", type=fraction, default=0.01)
    p.add_argument("--activation-quantile", type=fraction, default=0.95)
    p.add_argument("--general-rate", type=fraction, default=0.01)
    p.add_argument("--baselines", nargs="*", default=["magnitude", "wanda-sp"], choices=SCORES)
    p.add_argument("--model", help="base model location, if it moved since the run was made")
    add_runtime_args(p)


def run(args: argparse.Namespace) -> int:
    settings = LapeSettings(tokens=args.tokens, specific_rate=args.specific_rate,
                            activation_quantile=args.activation_quantile, general_rate=args.general_rate)
    out = analyze_run(args.run, settings, baselines=tuple(args.baselines), model=args.model, runtime=runtime(args))
    for name, r in out["masks"].items():
        sp, ge = r["specific"], r["general"]
        print(f"{name:10} specific: OR {odds_text(sp)} p={sp['fisher_p']:.2g} | general: OR {odds_text(ge)} "
              f"p={ge['fisher_p']:.2g}")
    print(f"wrote {args.run / 'analysis'} (specialization.json, .md, plots)")
    return 0

"""`koff decompose`: learn a sparse backbone + per-domain memories."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from koff.cli.args import (
    add_config_flags,
    add_resume_arg,
    add_runtime_args,
    add_tracking_args,
    config_overrides,
    finite,
    name_files,
    open_command_tracker,
    report_to,
)
from koff.config.recipe import MASKS, config_from_dict, read_yaml
from koff.core.errors import ConfigError
from koff.core.runtime import Runtime
from koff.data.sources import source_from_string
from koff.training.pipeline import decompose

NAME = "decompose"
HELP = "learn a sparse backbone + per-domain memories"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config (flags given here override it)")
    p.add_argument("--model", help="base model: local transformers folder or hub id (default: bundled SmolLM2-135M)")
    p.add_argument("--domains", nargs="+", metavar="LANG", help="bundled domains by name (en fr es de it pt)")
    p.add_argument("--train", type=name_files, action="append", default=[], metavar="NAME=FILES",
                   help="a domain of your own: its training sources, comma-separated: .txt (one document per line) "
                        "or .jsonl files, or datasets: hf:PATH:CONFIG@SPLIT (a hub id or local folder; :CONFIG and "
                        "@SPLIT optional), "
                        ".parquet / .arrow files, save_to_disk folders")
    p.add_argument("--test", type=name_files, action="append", default=[], metavar="NAME=FILES",
                   help="test files of a domain")
    p.add_argument("--text-field", default="text",
                   help="JSONL field, or dataset column, holding the text (default: text)")
    p.add_argument("--general", nargs="+", metavar="SOURCE",
                   help="general-domain sources for regularization steps: files, datasets (hf:PATH:CONFIG@SPLIT, "
                        ":CONFIG and @SPLIT optional; .parquet/.arrow files, save_to_disk folders), 'bundled' or "
                        "'none' (default bundled)")
    p.add_argument("--streaming", action="store_true",
                   help="read the dataset sources given here as streams (seeded shuffle buffer, exact resume) "
                        "instead of tokenizing them whole into the token cache")
    p.add_argument("--sparsity", type=finite, help="target s*: fraction of FFN parameters to remove (default 0.2)")
    p.add_argument("--mask", choices=MASKS, help="learned (koff's gates, default) or a one-shot mask from a neuron "
                                                 "score (a baseline: only the memories train)")
    p.add_argument("--fsdp", action="store_true", default=None,
                   help="in a multi-process launch, shard the frozen base over the processes (also set by an "
                        "accelerate FSDP config)")
    p.add_argument("--no-reference", action="store_true", help="skip training dense + memories for comparison")
    p.add_argument("-o", "--output", type=Path, help="run directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    add_resume_arg(p, "run")
    add_config_flags(p, "memory")
    add_config_flags(p, "train")
    add_runtime_args(p, "precision of the frozen base weights; gates and memories train in float32")
    add_tracking_args(p)


def _cli_source(entry: str, text_field: str, streaming: bool):
    """A --train / --general entry: a dataset (hf:PATH:CONFIG@SPLIT, a .parquet/.arrow file,
    a save_to_disk folder) as an explicit `dataset:` mapping, anything else as the file it names."""
    src = source_from_string(entry, text_field, streaming)
    return {"dataset": src.to_dict()} if src is not None else entry


def _domains(args: argparse.Namespace, domains):
    """The domains section: the config's, replaced by --domains / --train when given."""
    if args.test and not args.train:
        raise ConfigError("--test needs --train for the same NAME (a bundled domain brings its own test files)")
    names = list(args.domains or []) + [n for n, _ in args.train]
    if len(set(names)) != len(names):
        raise ConfigError(f"--domains / --train: a domain is given twice: {names}")
    if not (args.domains or args.train):
        return domains
    out: dict = {name: "bundled" for name in args.domains or []}
    tests = dict(args.test)
    for name, files in args.train:
        out[name] = {"train": [_cli_source(str(f), args.text_field, args.streaming) for f in files],
                     "test": [str(f) for f in tests.get(name, [])], "text_field": args.text_field}
    unknown = sorted(set(tests) - {n for n, _ in args.train})
    if unknown:
        raise ConfigError(f"--test given for {unknown}, which have no --train files")
    return out


def build_config(args: argparse.Namespace, with_trackers: bool = False):
    """Merge a YAML config (if any) with command-line flags (with `with_trackers`: also the
    tracker names of --report-to / the config's `report_to`, which are no part of the run's
    configuration: reporting elsewhere changes no result)."""
    raw: dict = read_yaml(args.config) if args.config else {}
    trackers = report_to(args, raw) if with_trackers else []
    raw.pop("report_to", None)
    domains = _domains(args, raw.get("domains"))
    if domains is not None:
        raw["domains"] = domains
    if args.general:
        raw["general"] = (args.general[0] if args.general[0] in ("bundled", "none")
                          else [_cli_source(g, args.text_field, args.streaming) for g in args.general])
    elif args.streaming and not args.train:
        raise ConfigError("--streaming applies to dataset sources given on the command line (--train NAME=hf:..., "
                          "--general hf:...); in a config, set streaming: true on the dataset")
    for flag, key in (("model", "model"), ("sparsity", "target_sparsity"), ("output", "output"), ("mask", "mask")):
        if getattr(args, flag) is not None:
            raw[key] = str(getattr(args, flag)) if flag in ("model", "output") else getattr(args, flag)
    where = str(args.config) if args.config else "command line"
    for section in ("train", "memory"):
        if raw.get(section) is not None and not isinstance(raw[section], dict):
            raise ConfigError(f"{where}: {section}: expected a mapping, got {type(raw[section]).__name__}")
        merged = {**(raw.get(section) or {}), **config_overrides(args, section)}
        if section == "train" and args.dtype is not None:
            merged["dtype"] = args.dtype
        if merged:
            raw[section] = merged
    if args.no_reference:
        raw["reference"] = False
    cfg = config_from_dict(raw, where)
    return (cfg, trackers) if with_trackers else cfg


def run(args: argparse.Namespace) -> int:
    cfg, trackers = build_config(args, with_trackers=True)
    runtime = Runtime.from_env(args.device, cfg.train.dtype, fsdp=args.fsdp)
    with contextlib.ExitStack() as stack:
        tracker = open_command_tracker(args, trackers, Path(cfg.output), Path(cfg.output).name, cfg.to_dict(), runtime)
        if tracker is not None:
            stack.enter_context(tracker)
        out = decompose(cfg, overwrite=args.overwrite, resume=args.resume, runtime=runtime, tracker=tracker)
    if runtime.is_main:
        print(f"wrote {out}")
    return 0

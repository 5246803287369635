"""`koff generate`: generate text with a run's backbone and a memory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from koff.cli.args import MAX_NEW_TOKENS, add_runtime_args, count, new_tokens, runtime, temperature
from koff.core.errors import ConfigError
from koff.evaluation.generation import generate
from koff.storage.run_dir import build_model, load_run

NAME = "generate"
HELP = "generate text with the backbone and a memory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path)
    p.add_argument("prompt", nargs="+")
    p.add_argument("--memory", help="memory name (default: the bare backbone)")
    p.add_argument("--max-new-tokens", type=new_tokens, default=40, help=f"1 to {MAX_NEW_TOKENS} (default 40)")
    p.add_argument("--temperature", type=temperature, default=0.0, help="0 (greedy, default) or more")
    p.add_argument("--seed", type=count, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--model", help="base model location, if it moved since the run was made")
    add_runtime_args(p)


def run(args: argparse.Namespace) -> int:
    loaded = load_run(args.run)
    memory = None if args.memory in (None, "none") else args.memory
    if memory is not None and memory not in loaded.memories:
        raise ConfigError(f"--memory: {args.run} has no memory named {memory!r}; it has {sorted(loaded.memories)} "
                          "(or 'none' for the bare backbone)")
    if any(not p.strip() for p in args.prompt):
        raise ConfigError("PROMPT: every prompt must hold some text, got an empty one")
    km, tok = build_model(loaded, model=args.model, runtime=runtime(args))
    label = memory or "backbone"
    for prompt, text in zip(args.prompt, generate(km, tok, args.prompt, memory, max_new_tokens=args.max_new_tokens,
                                                  temperature=args.temperature, seed=args.seed, chat=args.chat)):
        print(f"[{label}] {prompt}\033[1m{text}\033[0m" if sys.stdout.isatty() else f"[{label}] {prompt}{text}")
    return 0

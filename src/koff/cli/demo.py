"""`koff demo`: the bundled model, en/fr/es, a few minutes of training, then the evaluation."""

from __future__ import annotations

import argparse
from pathlib import Path

from koff.cli.args import add_eval_args, add_runtime_args, eval_settings, positive_int, runtime
from koff.config.recipe import config_from_dict
from koff.evaluation.perplexity import evaluate_run, print_result
from koff.training.pipeline import decompose

NAME = "demo"
HELP = "bundled model, en/fr/es, a few minutes of training, then evaluate"
STEPS = 60


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", type=Path, default=Path("runs/demo"))
    p.add_argument("--steps", type=positive_int, default=STEPS)
    add_eval_args(p, max_tokens=4096)
    add_runtime_args(p)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_dict({
        "domains": ["en", "fr", "es"], "general": "bundled", "target_sparsity": 0.2, "output": str(args.output),
        "train": {"steps": args.steps, "batch_size": 4, "seq_len": 128, "dtype": args.dtype or "float32"},
        "memory": {"lora_rank": 8, "kv_tokens": 16},
    }, "demo")
    rt = runtime(args)
    print(f"koff demo: SmolLM2-135M, domains en/fr/es, s* = 0.2, {args.steps} steps "
          f"(+ the same for dense + memories), then evaluation on {args.max_tokens} test tokens per language "
          f"({rt.device}, {cfg.train.dtype})")
    decompose(cfg, overwrite=True, runtime=rt)
    result = evaluate_run(args.output, eval_settings(args), runtime=rt)
    print_result(result)
    print(f"run: {args.output}  (tables in {args.output / 'eval'})")
    return 0

"""`koff plan`: parameters and estimated peak memory of a decomposition, before loading weights."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from koff.cli.args import add_config_flags, add_runtime_args, config_overrides, count, finite, positive_int
from koff.config.recipe import MemoryConfig, TrainConfig, read_yaml
from koff.core.errors import ConfigError
from koff.core.fields import from_mapping
from koff.model.shapes import SHAPES
from koff.training.plan import format_plan, make_plan, measure_peak

NAME = "plan"
HELP = "parameters and estimated peak memory of a decomposition, before loading weights"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"a model shape ({', '.join(SHAPES)}), a local model folder, or a hub id "
                                   "(default: the bundled SmolLM2-135M)")
    p.add_argument("--config", type=Path, help="a decompose config (YAML) to take memory and batch settings from")
    p.add_argument("--memories", type=count, help="number of memories (default: the config's domains, or 3)")
    p.add_argument("--sparsity", type=finite)
    p.add_argument("--processes", type=positive_int, default=1, help="data-parallel processes (default 1)")
    p.add_argument("--fsdp", action="store_true", help="base weights sharded over the processes (FSDP)")
    p.add_argument("--measure", action="store_true",
                   help="also run 3 real training steps in a fresh process and compare its peak memory")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_config_flags(p, "memory", only=("lora_rank", "kv_tokens"))
    add_config_flags(p, "train", only=("batch_size", "seq_len", "grad_accum", "gradient_checkpointing"))
    add_runtime_args(p, "(with --measure) precision of the base weights")


def run(args: argparse.Namespace) -> int:
    raw = read_yaml(args.config) if args.config else {}
    where = str(args.config or "command line")
    memory = from_mapping(MemoryConfig, raw.get("memory"), f"{where}: memory")
    memory = dataclasses.replace(memory, **config_overrides(args, "memory"))
    memory.validate(f"{where}: memory")
    train = from_mapping(TrainConfig, raw.get("train"), f"{where}: train")
    train = dataclasses.replace(train, **config_overrides(args, "train"))
    domains = raw.get("domains", ["en", "fr", "es"])
    memories = args.memories if args.memories is not None else (len(domains) if isinstance(domains, (list, dict)) else 1)
    sparsity = args.sparsity if args.sparsity is not None else raw.get("target_sparsity", 0.2)
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0 <= sparsity < 1:
        raise ConfigError(f"{where}: target_sparsity (--sparsity) must be a number in [0, 1), got {sparsity!r}")
    if raw.get("model") is not None and not isinstance(raw["model"], str):
        raise ConfigError(f"{where}: model: expected a string, got {raw['model']!r}")
    model = args.model or raw.get("model")
    plan = make_plan(model, memory, batch_size=train.batch_size, seq_len=train.seq_len, grad_accum=train.grad_accum,
                     memories=memories, world_size=args.processes, fsdp=args.fsdp, target_sparsity=sparsity)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    if args.measure:
        dtype = args.dtype or "float32"
        checkpointing = bool(train.gradient_checkpointing)
        key = dtype + ("+checkpointing" if checkpointing else "")
        got = measure_peak(model, memory, plan.micro_batch, train.seq_len, dtype, checkpointing, device=args.device)
        est = plan.estimates[key]["total"]
        measured = got["peak_cuda"] if got["peak_cuda"] is not None else got["peak_rss"]
        what = "peak CUDA allocation" if got["peak_cuda"] is not None else "peak RSS"
        print(f"measured ({key}, 3 training steps, {args.device}): {what} {measured / 2**30:.2f} GB; "
              f"estimate {est / 2**30:.2f} GB; estimate / measured {est / measured:.2f}")
    return 0

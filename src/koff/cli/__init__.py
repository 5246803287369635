"""The `koff` command line. Every command mirrors a Python function (see README)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from koff.core.version import __version__

DEMO_STEPS = 60


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {n}")
    return n


def _count(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {n}")
    return n


def _finite(value: str) -> float:
    import math

    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return x


MAX_NEW_TOKENS = 4096
DTYPES_NAMES = ("float32", "bfloat16", "float16")


def _new_tokens(value: str) -> int:
    n = _positive_int(value)
    if n > MAX_NEW_TOKENS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_NEW_TOKENS}, got {n}")
    return n


def _fraction(value: str) -> float:
    x = _finite(value)
    if not 0 < x < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {x}")
    return x


def _temperature(value: str) -> float:
    t = _finite(value)
    if t < 0:
        raise argparse.ArgumentTypeError(f"expected 0 (greedy) or more, got {t}")
    return t


def _block(value: str) -> int:
    n = _positive_int(value)
    if n < 2:
        raise argparse.ArgumentTypeError(f"expected a block of at least 2 tokens, got {n}")
    return n


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as koff's: one line on stderr, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"koff: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _add_runtime_args(p: argparse.ArgumentParser, dtype_help: str = "precision of the base weights") -> None:
    from koff.core.runtime import DTYPES

    p.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=sorted(DTYPES), help=f"{dtype_help} (default float32)")


def _runtime(args):
    from koff.core.runtime import Runtime

    return Runtime.from_env(args.device, args.dtype or "float32")


def _files(value: str) -> tuple[str, list[Path]]:
    if "=" not in value:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE[,FILE...], got {value!r}")
    name, files = value.split("=", 1)
    return name, [Path(f) for f in files.split(",") if f]


def _add_decompose_args(p: argparse.ArgumentParser) -> None:
    from koff.config.recipe import REG_MEMORIES
    from koff.model.controllers import CONTROLLERS

    p.add_argument("--config", type=Path, help="YAML config (flags given here override it)")
    p.add_argument("--model", help="base model: local transformers folder or hub id (default: bundled SmolLM2-135M)")
    p.add_argument("--domains", nargs="+", metavar="LANG", help="bundled domains by name (en fr es de it pt)")
    p.add_argument("--train", type=_files, action="append", default=[], metavar="NAME=FILES",
                   help="a domain of your own: its training files (.txt one document per line, or .jsonl)")
    p.add_argument("--test", type=_files, action="append", default=[], metavar="NAME=FILES", help="test files of a domain")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--general", nargs="+", metavar="FILE",
                   help="general-domain files for regularization steps ('bundled' or 'none'; default bundled)")
    p.add_argument("--sparsity", type=_finite, help="target s*: fraction of FFN parameters to remove (default 0.2)")
    p.add_argument("--steps", type=_positive_int)
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--seq-len", type=_positive_int)
    p.add_argument("--reg-every", type=_count, help="every N-th step is a general-data step (0: none)")
    p.add_argument("--lora-rank", type=_count, help="LoRA rank per memory (0: no LoRA)")
    p.add_argument("--kv-tokens", type=_count, help="KV memory tokens per layer (0: no KV memory)")
    p.add_argument("--controller", choices=sorted(CONTROLLERS), help="sparsity controller (default lagrangian)")
    p.add_argument("--reg-memory", choices=list(REG_MEMORIES),
                   help="memory of the general steps: a random domain's, none, or a memory of their own (default general)")
    p.add_argument("--grad-accum", type=_positive_int, help="micro-batches per step (the global batch is split)")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute layers in the backward pass (less memory)")
    p.add_argument("--fsdp", action="store_true", default=None,
                   help="in a multi-process launch, shard the frozen base over the processes (also set by an "
                        "accelerate FSDP config)")
    p.add_argument("--lr-gates", type=_finite)
    p.add_argument("--lr-lora", type=_finite)
    p.add_argument("--lr-kv", type=_finite)
    p.add_argument("--lr-lambda", type=_finite)
    p.add_argument("--warmup-frac", type=_finite)
    p.add_argument("--consolidate-frac", type=_finite)
    p.add_argument("--gate-init", choices=["wanda-sp", "flap", "magnitude", "constant"])
    p.add_argument("--mask-scope", choices=["global", "layer"])
    p.add_argument("--seed", type=_count)
    p.add_argument("--no-reference", action="store_true", help="skip training dense + memories for comparison")
    p.add_argument("-o", "--output", type=Path, help="run directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (train.checkpoint_every > 0)")
    p.add_argument("--checkpoint-every", type=_count, help="save a resumable state every N steps")


def build_config(args: argparse.Namespace):
    """Merge a YAML config (if any) with command-line flags."""
    from koff.core.errors import ConfigError
    from koff.config.recipe import config_from_dict, read_yaml

    raw: dict = read_yaml(args.config) if args.config else {}
    domains = raw.get("domains")
    if args.test and not args.train:
        raise ConfigError("--test needs --train for the same NAME (a bundled domain brings its own test files)")
    names = list(args.domains or []) + [n for n, _ in args.train]
    if len(set(names)) != len(names):
        raise ConfigError(f"--domains / --train: a domain is given twice: {names}")
    if args.domains or args.train:
        domains = {}
        for name in args.domains or []:
            domains[name] = "bundled"
        tests = dict(args.test)
        for name, files in args.train:
            domains[name] = {"train": [str(f) for f in files], "test": [str(f) for f in tests.get(name, [])],
                             "text_field": args.text_field}
        unknown = sorted(set(tests) - {n for n, _ in args.train})
        if unknown:
            raise ConfigError(f"--test given for {unknown}, which have no --train files")
    if domains is not None:
        raw["domains"] = domains
    if args.general:
        raw["general"] = args.general[0] if args.general[0] in ("bundled", "none") else args.general
    for flag, key in (("model", "model"), ("sparsity", "target_sparsity"), ("output", "output")):
        if getattr(args, flag) is not None:
            raw[key] = str(getattr(args, flag)) if flag != "sparsity" else getattr(args, flag)
    where = str(args.config) if args.config else "command line"
    for section in ("train", "memory"):
        if raw.get(section) is not None and not isinstance(raw[section], dict):
            raise ConfigError(f"{where}: {section}: expected a mapping, got {type(raw[section]).__name__}")
    train = dict(raw.get("train") or {})
    for key in ("steps", "batch_size", "seq_len", "reg_every", "controller", "lr_gates", "lr_lora", "lr_kv",
                "lr_lambda", "warmup_frac", "consolidate_frac", "gate_init", "mask_scope", "seed", "checkpoint_every",
                "reg_memory", "grad_accum", "gradient_checkpointing", "dtype"):
        if getattr(args, key) is not None:
            train[key] = getattr(args, key)
    if train:
        raw["train"] = train
    memory = dict(raw.get("memory") or {})
    for key in ("lora_rank", "kv_tokens"):
        if getattr(args, key) is not None:
            memory[key] = getattr(args, key)
    if memory:
        raw["memory"] = memory
    if args.no_reference:
        raw["reference"] = False
    return config_from_dict(raw, str(args.config) if args.config else "command line")


def cmd_decompose(args) -> int:
    from koff.training.pipeline import decompose

    from koff.core.runtime import Runtime

    cfg = build_config(args)
    runtime = Runtime.from_env(args.device, cfg.train.dtype, fsdp=args.fsdp)
    out = decompose(cfg, overwrite=args.overwrite, resume=args.resume, runtime=runtime)
    if runtime.is_main:
        print(f"wrote {out}")
    return 0


def _eval_settings(args):
    from koff.evaluation.perplexity import EvalSettings

    tests = {}
    for name, files in getattr(args, "test", None) or []:
        tests.setdefault(name, []).extend(str(f) for f in files)
    return EvalSettings(block=args.block, max_tokens=args.max_tokens, batch_size=args.eval_batch_size, tests=tests,
                        tasks=dict(getattr(args, "tasks", None) or []), tag=getattr(args, "tag", "") or "")


def _task(value: str) -> tuple[str, int]:
    from koff.evaluation.tasks import TASK_FILES

    name, _, n = value.partition("=")
    if name not in TASK_FILES:
        raise argparse.ArgumentTypeError(f"unknown task {name!r}; known: {', '.join(sorted(TASK_FILES))}")
    return name, _positive_int(n) if n else 200


def _add_eval_args(p: argparse.ArgumentParser, max_tokens: int | None = None) -> None:
    p.add_argument("--block", type=_block, default=256, help="evaluation block length in tokens (default 256)")
    p.add_argument("--max-tokens", type=_positive_int, default=max_tokens,
                   help="score only the first N test tokens per domain (default: the whole split)")
    p.add_argument("--eval-batch-size", type=_positive_int, default=8)


def cmd_evaluate(args) -> int:
    from koff.evaluation.perplexity import evaluate_run, print_result

    settings = _eval_settings(args)
    result = evaluate_run(args.run, settings, model=args.model, runtime=_runtime(args))
    print_result(result)
    stem = "perplexity" + (f"-{settings.tag}" if settings.tag else "")
    print(f"wrote {args.run / 'eval' / stem}.json and {stem}.md")
    return 0


def cmd_demo(args) -> int:
    from koff.config.recipe import config_from_dict
    from koff.evaluation.perplexity import evaluate_run, print_result
    from koff.training.pipeline import decompose

    cfg = config_from_dict({
        "domains": ["en", "fr", "es"], "general": "bundled", "target_sparsity": 0.2, "output": str(args.output),
        "train": {"steps": args.steps, "batch_size": 4, "seq_len": 128, "dtype": args.dtype or "float32"},
        "memory": {"lora_rank": 8, "kv_tokens": 16},
    }, "demo")
    runtime = _runtime(args)
    print(f"koff demo: SmolLM2-135M, domains en/fr/es, s* = 0.2, {args.steps} steps "
          f"(+ the same for dense + memories), then evaluation on {args.max_tokens} test tokens per language "
          f"({runtime.device}, {cfg.train.dtype})")
    decompose(cfg, overwrite=True, runtime=runtime)
    result = evaluate_run(args.output, _eval_settings(args), runtime=runtime)
    print_result(result)
    print(f"run: {args.output}  (tables in {args.output / 'eval'})")
    return 0


def cmd_export(args) -> int:
    from koff.export import export_run

    out = export_run(args.run, args.out, model=args.model, overwrite=args.overwrite, format=args.format,
                     outtype=args.outtype, dtype=args.dtype)
    import json

    m = json.loads((out / "koff_backbone.json").read_text())
    p = m["parameters"]
    carried = ", ".join(f"{n} ({'+'.join(v['carries'])})" for n, v in m["memories"].items()) or "none"
    print(f"wrote {out} ({args.format}{' ' + m['outtype'] if 'outtype' in m else ''}): backbone "
          f"{p['backbone']:,} parameters (dense {p['dense']:,}, {1 - p['backbone'] / p['dense']:.1%} removed), "
          f"memories: {carried}")
    for name, why in m.get("memories_left_out", {}).items():
        print(f"  left out memory {name}: {why}")
    if "serve_command" in m:
        print(f"  serve (untested here, needs a GPU): {m['serve_command']}")
    return 0


def cmd_generate(args) -> int:
    from koff.storage.run_dir import build_model, load_run
    from koff.core.errors import ConfigError
    from koff.evaluation.generation import generate

    run = load_run(args.run)
    memory = None if args.memory in (None, "none") else args.memory
    if memory is not None and memory not in run.memories:
        raise ConfigError(f"--memory: {args.run} has no memory named {memory!r}; it has {sorted(run.memories)} "
                          "(or 'none' for the bare backbone)")
    if any(not p.strip() for p in args.prompt):
        raise ConfigError("PROMPT: every prompt must hold some text, got an empty one")
    km, tok = build_model(run, model=args.model, runtime=_runtime(args))
    for prompt, text in zip(args.prompt, generate(km, tok, args.prompt, memory, max_new_tokens=args.max_new_tokens,
                                                  temperature=args.temperature, seed=args.seed, chat=args.chat)):
        print(f"[{memory or 'backbone'}] {prompt}{'' if args.chat else ''}\033[1m{text}\033[0m" if sys.stdout.isatty()
              else f"[{memory or 'backbone'}] {prompt}{text}")
    return 0


def cmd_add_domain(args) -> int:
    from koff.data.text import Domain, bundled_domain
    from koff.core.names import check_memory_name
    from koff.training.pipeline import add_domain

    check_memory_name(args.name, "--name")
    if args.test and not args.train:
        from koff.core.errors import ConfigError

        raise ConfigError("--test needs --train: a bundled domain brings its own test files")
    if args.train:
        domain = Domain(name=args.name, train=list(args.train), test=list(args.test or []), text_field=args.text_field)
    else:
        domain = bundled_domain(args.name)
    general = None
    if args.general:
        from koff.data.text import general_files

        general = general_files() if args.general == ["bundled"] else [] if args.general == ["none"] else args.general
    path = add_domain(args.run, domain, steps=args.steps, general=general, reference=not args.no_reference,
                      overwrite=args.overwrite, model=args.model, runtime=_runtime(args))
    print(f"wrote {path}")
    return 0


def cmd_analyze(args) -> int:
    from koff.experiments.analysis import LapeSettings, analyze_run, odds_text

    settings = LapeSettings(tokens=args.tokens, specific_rate=args.specific_rate,
                            activation_quantile=args.activation_quantile, general_rate=args.general_rate)
    out = analyze_run(args.run, settings, baselines=tuple(args.baselines), model=args.model, runtime=_runtime(args))
    for name, r in out["masks"].items():
        sp, ge = r["specific"], r["general"]
        print(f"{name:10} specific: OR {odds_text(sp)} p={sp['fisher_p']:.2g} | general: OR {odds_text(ge)} p={ge['fisher_p']:.2g}")
    print(f"wrote {args.run / 'analysis'} (specialization.json, .md, plots)")
    return 0


def cmd_compare(args) -> int:
    from koff.experiments.compare import compare

    ids = compare(args.config, only=args.only, limit=args.limit, dry_run=args.dry_run, runtime=_runtime(args),
                  dtype=args.dtype, checkpoint_every=args.checkpoint_every)
    verb = "would run" if args.dry_run else "ran"
    print(f"{verb} {len(ids)} cell(s)" + (":\n  " + "\n  ".join(ids) if ids else " (every cell has a result)"))
    return 0


def cmd_plan(args) -> int:
    import dataclasses
    import json

    from koff.core.errors import ConfigError
    from koff.config.recipe import MemoryConfig, TrainConfig, read_yaml
    from koff.core.fields import from_mapping
    from koff.training.plan import format_plan, make_plan, measure_peak

    raw = read_yaml(args.config) if args.config else {}
    where = str(args.config or "command line")
    memory = from_mapping(MemoryConfig, raw.get("memory"), f"{where}: memory")
    for key in ("lora_rank", "kv_tokens"):
        if getattr(args, key) is not None:
            memory = dataclasses.replace(memory, **{key: getattr(args, key)})
    memory.validate(f"{where}: memory")
    train = from_mapping(TrainConfig, raw.get("train"), f"{where}: train")
    domains = raw.get("domains", ["en", "fr", "es"])
    memories = args.memories if args.memories is not None else (len(domains) if isinstance(domains, (list, dict)) else 1)
    batch = args.batch_size or train.batch_size
    seq = args.seq_len or train.seq_len
    accum = args.grad_accum or train.grad_accum
    sparsity = args.sparsity if args.sparsity is not None else raw.get("target_sparsity", 0.2)
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0 <= sparsity < 1:
        raise ConfigError(f"{where}: target_sparsity (--sparsity) must be a number in [0, 1), got {sparsity!r}")
    if raw.get("model") is not None and not isinstance(raw["model"], str):
        raise ConfigError(f"{where}: model: expected a string, got {raw['model']!r}")
    plan = make_plan(args.model or raw.get("model"), memory, batch_size=batch, seq_len=seq, grad_accum=accum,
                     memories=memories, world_size=args.processes, fsdp=args.fsdp, target_sparsity=sparsity)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(format_plan(plan))
    if args.measure:
        dtype = args.dtype or "float32"
        key = dtype + ("+checkpointing" if args.gradient_checkpointing else "")
        got = measure_peak(args.model or raw.get("model"), memory, plan.micro_batch, seq, dtype,
                           args.gradient_checkpointing, device=args.device)
        est = plan.estimates[key]["total"]
        measured = got["peak_cuda"] if got["peak_cuda"] is not None else got["peak_rss"]
        what = "peak CUDA allocation" if got["peak_cuda"] is not None else "peak RSS"
        print(f"measured ({key}, 3 training steps, {args.device}): {what} {measured / 2**30:.2f} GB; "
              f"estimate {est / 2**30:.2f} GB; estimate / measured {est / measured:.2f}")
    return 0


def cmd_lm_eval(args) -> int:
    from koff.core.errors import ConfigError

    try:
        from lm_eval.utils import make_table

        from koff.evaluation.lmeval import evaluate
    except ImportError:
        raise ConfigError("koff lm-eval needs lm-evaluation-harness: pip install 'koff[lmeval]'") from None
    result = evaluate(args.run, args.tasks, memory=args.memory, limit=args.limit, device=args.device,
                      dtype=args.dtype or "float32", batch_size=args.eval_batch_size)
    print(make_table(result))
    return 0


def cmd_report(args) -> int:
    from koff.experiments.report import report

    path = report(args.results)
    print(f"wrote {path}")
    return 0


def cmd_serve(args) -> int:
    import importlib.util
    import os

    from koff.core.errors import ServeError

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ServeError(f"koff serve needs {' and '.join(missing)}: pip install 'koff[serve]'")
    from koff.serve.app import AppSettings
    from koff.serve.scheduler import EngineConfig
    from koff.serve.server import serve

    key = args.api_key if args.api_key is not None else os.environ.get("KOFF_API_KEY") or None
    engine = EngineConfig(max_batch=args.max_batch, max_queue=args.max_queue, batching=args.batching,
                          router=args.router)
    settings = AppSettings(api_key=key, max_tokens=args.max_tokens, max_context=args.max_context,
                           memory_dirs=tuple(d.resolve() for d in args.memory_dir))
    return serve(args.path, _runtime(args), engine, settings, host=args.host, port=args.port,
                 log_level=args.log_level)


def make_parser() -> argparse.ArgumentParser:
    """The `koff` command line: one subcommand per job, each with its own flags."""
    parser = _Parser(prog="koff", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"koff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("decompose", help="learn a sparse backbone + per-domain memories")
    _add_decompose_args(p)
    _add_runtime_args(p, "precision of the frozen base weights; gates and memories train in float32")
    p.set_defaults(func=cmd_decompose)

    p = sub.add_parser("evaluate", help="perplexity table of a run (dense, memories, backbone, swap matrix)")
    p.add_argument("run", type=Path)
    p.add_argument("--model", help="base model location, if it moved since the run was made")
    _add_eval_args(p)
    p.add_argument("--test", type=_files, action="append", metavar="NAME=FILE[,FILE]",
                   help="score on these files instead of the run's test splits: a domain's name scores its memory "
                        "on them, a new name scores the backbone and every memory (repeatable)")
    p.add_argument("--tasks", type=_task, nargs="+", metavar="TASK[=N]",
                   help="also score general-ability tasks (arc_challenge, piqa, gsm8k, ...; N items, default 200) "
                        "for the dense model, the backbone and the run's default memory")
    p.add_argument("--tag", default="", help="write eval/perplexity-TAG.{json,md} (default: perplexity.{json,md})")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="bundled model, en/fr/es, a few minutes of training, then evaluate")
    p.add_argument("-o", "--output", type=Path, default=Path("runs/demo"))
    p.add_argument("--steps", type=_positive_int, default=DEMO_STEPS)
    _add_eval_args(p, max_tokens=4096)
    _add_runtime_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="physically smaller backbone + memories for transformers, llama.cpp or vLLM")
    p.add_argument("run", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--format", choices=["hf", "gguf", "vllm"], default="hf",
                   help="hf: transformers + remote code, peft memories (default); gguf: llama.cpp backbone + "
                        "LoRA adapters; vllm: nemotron-nas/DeciLM folder + LoRA adapters")
    p.add_argument("--outtype", choices=["f32", "f16", "q8_0"],
                   help="tensor type of the GGUF backbone's matrices (--format gguf only; default f16)")
    p.add_argument("--model", help="base model location, if it moved since the run was made")
    p.add_argument("--dtype", choices=sorted(DTYPES_NAMES),
                   help="(hf, vllm) dtype of the stored backbone weights (default float32; a GGUF uses --outtype)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="generate text with the backbone and a memory")
    p.add_argument("run", type=Path)
    p.add_argument("prompt", nargs="+")
    p.add_argument("--memory", help="memory name (default: the bare backbone)")
    p.add_argument("--max-new-tokens", type=_new_tokens, default=40, help=f"1 to {MAX_NEW_TOKENS} (default 40)")
    p.add_argument("--temperature", type=_temperature, default=0.0, help="0 (greedy, default) or more")
    p.add_argument("--seed", type=_count, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--model", help="base model location, if it moved since the run was made")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("add-domain", help="train a new memory on a run's frozen backbone and add it")
    p.add_argument("run", type=Path)
    p.add_argument("--name", required=True, help="memory name (a bundled language when no --train is given)")
    p.add_argument("--train", type=Path, nargs="+", help="training files (.txt or .jsonl)")
    p.add_argument("--test", type=Path, nargs="+", help="test files")
    p.add_argument("--text-field", default="text")
    p.add_argument("--general", nargs="+", help="general data for regularization ('bundled', 'none' or files; "
                                                "default: the run's)")
    p.add_argument("--steps", type=_positive_int, help="training steps (default: the run's)")
    p.add_argument("--no-reference", action="store_true", help="skip training it on the dense reference too")
    p.add_argument("--overwrite", action="store_true", help="replace a memory of the same name")
    p.add_argument("--model", help="base model location, if it moved since the run was made")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_add_domain)

    p = sub.add_parser("analyze", help="which neurons did offloading remove? (LAPE + enrichment statistics)")
    p.add_argument("run", type=Path)
    p.add_argument("--tokens", type=_positive_int, default=16384, help="tokens per language for activation counts")
    p.add_argument("--specific-rate", type=_fraction, default=0.01)
    p.add_argument("--activation-quantile", type=_fraction, default=0.95)
    p.add_argument("--general-rate", type=_fraction, default=0.01)
    p.add_argument("--baselines", nargs="*", default=["magnitude", "wanda-sp"], choices=["magnitude", "wanda-sp", "flap"])
    p.add_argument("--model", help="base model location, if it moved since the run was made")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("compare", help="run a grid of methods x seeds (skips cells that have results)")
    p.add_argument("config", type=Path, help="grid config (YAML), e.g. configs/grid.yaml")
    p.add_argument("--only", nargs="+", help="run only cells whose id contains one of these")
    p.add_argument("--limit", type=_positive_int, help="run at most N cells this time")
    p.add_argument("--dry-run", action="store_true", help="list the cells that would run")
    p.add_argument("--checkpoint-every", type=_count, default=0, metavar="N",
                   help="save each cell's training state every N steps; an interrupted cell resumes from it "
                        "(changes no result)")
    _add_runtime_args(p, "precision of the base weights, in training and evaluation")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("plan", help="parameters and estimated peak memory of a decomposition, before loading weights")
    p.add_argument("--model", help="a model shape (smollm2-135m, llama-3.2-1b, llama-3.2-3b, llama-3.1-8b, qwen2.5-7b), "
                                   "a local model folder, or a hub id (default: the bundled SmolLM2-135M)")
    p.add_argument("--config", type=Path, help="a decompose config (YAML) to take memory and batch settings from")
    p.add_argument("--memories", type=_count, help="number of memories (default: the config's domains, or 3)")
    p.add_argument("--lora-rank", type=_count)
    p.add_argument("--kv-tokens", type=_count)
    p.add_argument("--sparsity", type=_finite)
    p.add_argument("--batch-size", type=_positive_int, help="global batch (default: the config's, or 4)")
    p.add_argument("--seq-len", type=_positive_int)
    p.add_argument("--grad-accum", type=_positive_int)
    p.add_argument("--processes", type=_positive_int, default=1, help="data-parallel processes (default 1)")
    p.add_argument("--fsdp", action="store_true", help="base weights sharded over the processes (FSDP)")
    p.add_argument("--measure", action="store_true",
                   help="also run 3 real training steps in a fresh process and compare its peak memory")
    p.add_argument("--gradient-checkpointing", action="store_true", help="(with --measure)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    _add_runtime_args(p, "(with --measure) precision of the base weights")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("lm-eval", help="score a run's backbone + a memory with EleutherAI's lm-evaluation-harness")
    p.add_argument("run", type=Path)
    p.add_argument("--memory", help="memory name (default: none, the bare backbone)")
    p.add_argument("--tasks", nargs="+", default=["arc_challenge_koff"],
                   help="lm-eval tasks: the bundled local ones (arc_challenge_koff, piqa_koff, openbookqa_koff, "
                        "copa_koff) or any lm-eval task reachable from here")
    p.add_argument("--limit", type=_positive_int, help="only the first N documents of each task")
    p.add_argument("--eval-batch-size", type=_positive_int, default=16)
    _add_runtime_args(p)
    p.set_defaults(func=cmd_lm_eval)

    p = sub.add_parser("report", help="Markdown tables + PNG plots from the cells of `koff compare`")
    p.add_argument("results", type=Path, help="the grid's results folder (holding cells/)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server: one backbone, a memory chosen per request")
    p.add_argument("path", type=Path, help="a run directory (koff decompose) or an exported backbone (koff export)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_count, default=8000, help="port (default 8000; 0: any free port, printed)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: $KOFF_API_KEY, else none)")
    p.add_argument("--max-batch", type=_positive_int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--max-queue", type=_positive_int, default=64,
                   help="requests waiting for a batch slot; beyond, 429 with Retry-After (default 64)")
    p.add_argument("--batching", choices=["continuous", "static"], default="continuous",
                   help="continuous: admit requests at every token (default); static: a new batch once the last ends")
    p.add_argument("--router", choices=["classifier", "loss"], default="classifier",
                   help="how model 'auto' picks a memory: a token classifier fitted on each memory's training text "
                        "(default; the loss is used while a memory has no readable training text), or the lowest "
                        "loss on the prompt")
    p.add_argument("--max-tokens", type=_new_tokens, default=1024, help="most tokens one request may generate")
    p.add_argument("--max-context", type=_positive_int, help="cap on prompt + memory prefix + generated tokens "
                                                             "(default: the model's)")
    p.add_argument("--memory-dir", type=Path, action="append", default=[],
                   help="allow loading memories only from below this folder (repeatable; default: anywhere)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    _add_runtime_args(p)
    p.set_defaults(func=cmd_serve)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from koff.core.errors import KoffError

    try:
        return args.func(args)
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

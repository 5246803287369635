"""Real shapes on this CPU: a random-weight model with the exact shape of Llama-3.2-1B (built
in-process from its config; no download), trained by koff's own Trainer.

    nice python benchmarks/shapes.py [--model llama-3.2-1b] [--batch-size 2] [--seq-len 64] [--out shapes.json]

Stages, each in a fresh process (so its peak RSS is its own):
  float32   2 training steps, --gradient-checkpointing: step times, peak RSS against `koff plan`
  bfloat16  the same with bfloat16 base weights (slow on CPUs without bf16 units)
  gloo2     one step in a 2-process gloo launch (torch.distributed.run), the global batch split
            over the processes; its trainable tensors after the step against the 1-process step's
The gates, 2 domain memories + the general memory (LoRA r8 on every projection, 16 KV tokens) train
as in `koff decompose`; the data are synthetic token blocks. Results are appended to --out after
each stage, and a rerun skips the stages already there (the whole thing takes a while on a loaded
CPU), then prints the table. Peak RSS is the process's VmHWM with glibc's mmap threshold pinned (as
`koff plan --measure` does), so it follows live memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))


def _trainer(model_name: str, dtype_name: str, batch: int, seq: int, runtime=None):
    import torch
    from transformers import AutoModelForCausalLM

    from koff.config.recipe import MemoryConfig, TrainConfig
    from koff.core.runtime import Runtime, resolve_dtype
    from koff.data.text import BlockStream
    from koff.model.gates import NeuronGates
    from koff.model.koff_model import KoffModel
    from koff.model.shapes import shape_config
    from koff.training.loop import Trainer
    from koff.training.pipeline import Streams, add_memories

    dtype = resolve_dtype(dtype_name)
    config = shape_config(model_name)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    base.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    streams = {d: BlockStream(torch.randint(0, config.vocab_size, (8, seq), generator=g), batch, seed=i)
               for i, d in enumerate(("a", "b"))}
    general = BlockStream(torch.randint(0, config.vocab_size, (8, seq), generator=g), batch, seed=99)
    s = Streams(streams, general, {d: streams[d].blocks[0] for d in streams} | {"general": general.blocks[0]})
    km = KoffModel(base, NeuronGates.for_model(base))
    add_memories(km, ["a", "b", "general"], s.leading, MemoryConfig(lora_rank=8, kv_tokens=16), seed=0)
    cfg = TrainConfig(steps=2, batch_size=batch, seq_len=seq, reg_every=4, warmup_frac=0.5, consolidate_frac=0.0,
                      gradient_checkpointing=True, dtype=dtype_name)
    runtime = runtime or Runtime(torch.device("cpu"), dtype)
    return Trainer(km, s, cfg, 0.2, runtime=runtime, progress=False).setup()


def _trainable(trainer) -> dict:
    return {n: p.detach().float().contiguous().clone() for n, p in trainer.km.named_parameters() if p.requires_grad}


def stage_train(args) -> dict:
    """2 steps at one dtype; writes the trainable tensors after step 0 (float32 stage) for gloo2."""
    from safetensors.torch import save_file

    from koff.training.plan import _peak_rss

    t0 = time.time()
    trainer = _trainer(args.model, args.dtype, args.batch_size, args.seq_len)
    build_s = time.time() - t0
    trainer._t0 = time.time()
    times, losses = [], []
    for step in range(2):
        t = time.perf_counter()
        losses.append(trainer.train_step(step)["loss"])
        times.append(time.perf_counter() - t)
        if step == 0 and args.save:
            save_file(_trainable(trainer), args.save)
    return {"build_s": round(build_s, 1), "step_s": [round(x, 1) for x in times], "loss": losses,
            "peak_rss": _peak_rss()}


def stage_gloo(args) -> dict:
    """One step in each of 2 gloo processes (run under torch.distributed.run); rank 0 reports."""
    import torch
    from safetensors.torch import load_file

    from koff.core.runtime import Runtime
    from koff.training.plan import _peak_rss

    runtime = Runtime.from_env("cpu", "float32")
    trainer = _trainer(args.model, "float32", args.batch_size, args.seq_len, runtime)
    trainer._t0 = time.time()
    t = time.perf_counter()
    loss = trainer.train_step(0)["loss"]
    step_s = time.perf_counter() - t
    peak = torch.tensor([_peak_rss()], dtype=torch.float64)
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    if runtime.rank == 0:
        ref = load_file(args.save)
        got = _trainable(trainer)
        diff = max(float((got[k] - ref[k]).abs().max()) for k in ref)
        scale = max(float(ref[k].abs().max()) for k in ref)
        Path(args.report).write_text(json.dumps({"step_s": round(step_s, 1), "loss": loss, "max_abs_diff": diff,
                                                 "max_abs": scale, "tensors": len(ref),
                                                 "peak_rss_per_process": int(peak.item())}))
    return {}


def _child(stage: str, args, extra: list[str]) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(SRC)}
    base = [__file__, "--stage", stage, "--model", args.model, "--batch-size", str(args.batch_size),
            "--seq-len", str(args.seq_len), *extra]
    if stage == "gloo":
        report = Path(args.out).with_suffix(".gloo.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", *base,
               "--report", str(report)]
        env["OMP_NUM_THREADS"] = str(max(1, args.threads // 2))
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"gloo stage failed:\n{done.stderr[-3000:]}")
        return json.loads(report.read_text())
    done = subprocess.run([sys.executable, *base], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{stage} stage failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--batch-size", type=int, default=2, help="global batch (split over the 2 gloo processes)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--out", default="benchmarks/shapes.json")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--stages", nargs="+", default=["float32", "bfloat16", "gloo2"])
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stage == "train":
        print(json.dumps(stage_train(args)))
        return 0
    if args.stage == "gloo":
        stage_gloo(args)
        return 0

    from koff.config.recipe import MemoryConfig
    from koff.training.plan import make_plan

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    ref_state = str(out.with_suffix(".step0.safetensors"))
    for stage in args.stages:
        key = f"{stage}|{args.model}|b{args.batch_size}|s{args.seq_len}"
        if key in results:
            print(f"{stage}: done earlier (in {out})", flush=True)
            continue
        print(f"{stage}: running ...", flush=True)
        t = time.time()
        if stage == "gloo2":
            if not Path(ref_state).is_file():
                raise SystemExit("gloo2 needs the float32 stage first (its step-0 tensors)")
            got = _child("gloo", args, ["--save", ref_state])
        else:
            got = _child("train", args, ["--dtype", stage, *(["--save", ref_state] if stage == "float32" else [])])
        plan = make_plan(args.model, MemoryConfig(lora_rank=8, kv_tokens=16), batch_size=args.batch_size,
                         seq_len=args.seq_len, memories=3, world_size=2 if stage == "gloo2" else 1)
        dtype = "float32" if stage == "gloo2" else stage
        got["plan"] = plan.estimates[f"{dtype}+checkpointing"]["total"]
        got["wall_s"] = round(time.time() - t, 1)
        results[key] = got
        out.write_text(json.dumps(results, indent=1))
        print(f"{stage}: {json.dumps(got)}", flush=True)

    gb = 2 ** 30
    print(f"\n{args.model} (random weights, exact shape), global batch {args.batch_size} x {args.seq_len} tokens, "
          "gradient checkpointing, gates + 3 memories (LoRA r8, 16 KV tokens)")
    print(f"{'stage':<10} {'step time (s)':>16} {'peak RSS GB':>12} {'koff plan GB':>13} {'plan/RSS':>9}  note")
    for stage in args.stages:
        r = results.get(f"{stage}|{args.model}|b{args.batch_size}|s{args.seq_len}")
        if r is None:
            continue
        rss = r.get("peak_rss") or r.get("peak_rss_per_process")
        steps = ", ".join(map(str, r["step_s"])) if isinstance(r["step_s"], list) else str(r["step_s"])
        note = (f"max |2-proc - 1-proc| = {r['max_abs_diff']:.2e} over {r['tensors']} tensors (max |x| "
                f"{r['max_abs']:.2f}); RSS per process" if stage == "gloo2" else f"loss {r['loss'][0]:.3f}, "
                f"{r['loss'][1]:.3f}")
        print(f"{stage:<10} {steps:>16} {rss / gb:>12.2f} {r['plan'] / gb:>13.2f} {r['plan'] / rss:>9.2f}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

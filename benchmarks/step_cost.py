"""Cost of one koff training step against one plain PEFT LoRA fine-tuning step.

    python benchmarks/step_cost.py [--model PATH] [--batch-size 4] [--seq-len 128] [--steps 8] [--dtype bfloat16]

Both run on the same real model (default: bundled SmolLM2-135M), the same batch and the same LoRA
(rank 8 on q/k/v/o/gate/up/down). koff's step adds hard-concrete gates on every FFN neuron, a
16-token KV memory per layer and the sparsity controller. Each side runs in its own subprocess
(so that peak RSS is its own), twice, alternating; the median step time of each side and the
ratio koff / PEFT are printed side by side. Target: ratio <= 1.3.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def run_side(side: str, model: str | None, batch: int, seq: int, steps: int, warmup: int, dtype: str) -> dict:
    import torch

    from koff.core.runtime import resolve_dtype
    from koff.model.base_model import load_base

    torch.manual_seed(0)
    base, tok, _ = load_base(model, dtype=resolve_dtype(dtype))
    x = torch.randint(0, base.config.vocab_size, (batch, seq))
    if side == "peft":
        from peft import get_peft_model

        from koff.model.memory import lora_config

        pm = get_peft_model(base, lora_config(8).peft_config_object())
        opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-3)

        def step():
            loss = pm(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        from koff.model.controllers import Projection
        from koff.model.gates import NeuronGates
        from koff.model.koff_model import KoffModel, lm_loss
        from koff.model.memory import KVMemory, lora_config

        km = KoffModel(base, NeuronGates.for_model(base))
        k, v = km.capture_kv(x[0, :16])
        km.add_memory("d", lora=lora_config(8), kv=KVMemory(k, v))
        opt = torch.optim.Adam([{"params": list(km.gates.parameters()), "lr": 0.1},
                                {"params": km.parts["lora"].parameters_of("d"), "lr": 1e-3},
                                {"params": km.parts["kv"].parameters_of("d"), "lr": 1e-2}])
        controller = Projection()

        def step():
            km.gates.resample()
            loss = lm_loss(km(x, memory="d"), x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            controller.after_step(km.gates, 0.2)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"side": side, "median_s": statistics.median(times), "times": times,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="frozen base weights (LoRA, gates and KV stay float32 on both sides)")
    ap.add_argument("--side", choices=["koff", "peft"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.model, args.batch_size, args.seq_len, args.steps, args.warmup,
                                  args.dtype)))
        return
    results: dict[str, list[dict]] = {"koff": [], "peft": []}
    for _ in range(args.rounds):
        for side in ("peft", "koff"):
            cmd = [sys.executable, __file__, "--side", side, "--batch-size", str(args.batch_size),
                   "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--dtype", args.dtype]
            if args.model:
                cmd += ["--model", args.model]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[side].append(json.loads(out.strip().splitlines()[-1]))
    step = {s: statistics.median(t for r in rs for t in r["times"]) for s, rs in results.items()}
    rss = {s: max(r["peak_rss_mb"] for r in rs) for s, rs in results.items()}
    print(f"{args.dtype} base, batch {args.batch_size} x {args.seq_len} tokens, {args.rounds} rounds x {args.steps} "
          "timed steps per side")
    print(f"{'':24}{'PEFT LoRA':>12}{'koff':>12}{'koff / PEFT':>14}")
    print(f"{'step time (median, s)':24}{step['peft']:>12.3f}{step['koff']:>12.3f}{step['koff'] / step['peft']:>14.3f}")
    print(f"{'peak RSS (MB)':24}{rss['peft']:>12.0f}{rss['koff']:>12.0f}{rss['koff'] / rss['peft']:>14.3f}")
    print(f"target: step-time ratio <= 1.3 -> {'met' if step['koff'] / step['peft'] <= 1.3 else 'MISSED'}")
    from koff.config.recipe import MemoryConfig
    from koff.training.plan import make_plan

    est = make_plan(args.model, MemoryConfig(lora_rank=8, kv_tokens=16), batch_size=args.batch_size,
                    seq_len=args.seq_len, memories=1, dtypes=(args.dtype,)).estimates[args.dtype]["total"] / 2**20
    print(f"koff plan's estimate of the koff side's peak: {est:.0f} MB; measured / estimate "
          f"{rss['koff'] / est:.2f} (RSS with glibc's default allocator, which keeps freed blocks)")


if __name__ == "__main__":
    main()

"""GPU check: koff training at real model shapes, bfloat16, gradient checkpointing, in one command.

    PYTHONPATH=src python benchmarks/gpu.py [--models smollm2-135m llama-3.2-1b llama-3.2-3b llama-3.1-8b]
                                           [--steps 30] [--batch-size 4] [--seq-len 512]

The GPU machines this project borrows reach no network and take at most 64 MiB of files along, so
every model is built in-process from its config values (koff.shapes) with random weights, and
trained on synthetic tokens: short repeating token patterns, one per domain, so that the memories
have something to learn. Per model it prints
  tokens/s of koff training (gates + LoRA r=8 + KV m=16, projection controller, bf16 base, GC),
  koff / plain peft LoRA step time on the same model, batch and precision (target <= 1.3),
  peak GPU memory next to `koff plan`'s estimate for the same settings,
  whether the loss falls and the expected sparsity lands on the target.
Models are run smallest first and skipped (with a line saying so) when their estimate does not fit
the GPU. On a machine without a GPU it says so and exits 0; `--smoke` runs the same code on the CPU
with tiny shapes (a test of this script, not a measurement).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

DEFAULT_MODELS = ("smollm2-135m", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b")
SMOKE_SHAPE = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 1024, "tie_word_embeddings": True}


def synthetic_streams(vocab: int, batch: int, seq: int, domains: tuple[str, ...], seed: int = 0):
    """koff data streams of synthetic text: each domain repeats its own two 32-token patterns (at
    random offsets), so a memory can learn its domain within a few dozen steps."""
    from koff.data.text import BlockStream
    from koff.training.pipeline import Streams

    g = torch.Generator().manual_seed(seed)

    def blocks(n: int) -> torch.Tensor:
        patterns = [torch.randint(10, vocab, (32,), generator=g) for _ in range(2)]
        rows = []
        for i in range(n):
            offset = int(torch.randint(0, 32, (1,), generator=g))
            rows.append(patterns[i % 2].repeat(seq // 32 + 2)[offset: offset + seq])
        return torch.stack(rows)

    streams = {d: BlockStream(blocks(64), batch, seed=i) for i, d in enumerate(domains)}
    general = BlockStream(blocks(64), batch, seed=99)
    return Streams(streams, general, {d: streams[d].blocks[0] for d in domains} | {"general": general.blocks[0]})


def build(config, device, dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    return model


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def koff_run(config, device, dtype, args) -> dict:
    """A short koff decomposition (the real Trainer) on synthetic domains: loss, ŝ, time, memory."""
    from koff.config.recipe import MemoryConfig, TrainConfig
    from koff.core.runtime import Runtime
    from koff.model.gates import NeuronGates
    from koff.model.koff_model import KoffModel
    from koff.training.loop import Trainer
    from koff.training.pipeline import add_memories

    base = build(config, device, dtype)
    km = KoffModel(base, NeuronGates.for_model(base).to(device))
    mem = MemoryConfig(lora_rank=8, kv_tokens=16)
    streams = synthetic_streams(config.vocab_size, args.batch_size, args.seq_len, ("a", "b"))
    add_memories(km, ["a", "b", "general"], streams.leading, mem, seed=0)  # the default recipe's general memory
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, reg_every=4,
                      warmup_frac=0.3, consolidate_frac=0.2, gradient_checkpointing=True,
                      dtype={torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype])
    trainer = Trainer(km, streams, cfg, 0.2, runtime=Runtime(device, dtype), progress=False).setup()
    records = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer._t0 = time.time()
    times = []
    for step in range(cfg.steps):
        sync(device)
        t = time.perf_counter()
        records.append(trainer.train_step(step))
        sync(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    warm = round(cfg.warmup_frac * cfg.steps)
    domain_losses = [r["loss"] for r in records if r["kind"] == "domain"]
    main = [r for r in records[warm:] if r["phase"] == "main"]
    step_time = statistics.median(times[3:])  # after warm-up of kernels and allocator
    del trainer, km, base
    return {"step_s": step_time, "tokens_s": args.batch_size * args.seq_len / step_time, "peak": peak,
            "loss_first": statistics.fmean(domain_losses[:4]), "loss_last": statistics.fmean(domain_losses[-4:]),
            "s_hat_gap": max(abs(r["expected_sparsity"] - r["target"]) for r in main) if main else None}


def peft_step_time(config, device, dtype, args) -> float:
    """Median step time of plain peft LoRA (r=8, same projections) with transformers' checkpointing."""
    from peft import get_peft_model

    from koff.model.koff_model import lm_loss
    from koff.model.memory import lora_config

    base = build(config, device, dtype)
    pm = get_peft_model(base, lora_config(8).peft_config_object())
    if hasattr(pm, "activation_checkpointing_enable"):  # transformers >= 5.24
        pm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm.enable_input_require_grads()
    pm.train()
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    x = synthetic_streams(config.vocab_size, args.batch_size, args.seq_len, ("a",)).domains["a"].next().to(device)
    times = []
    for _ in range(max(8, args.steps // 3)):
        sync(device)
        t = time.perf_counter()
        lm_loss(pm(input_ids=x).logits, x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t)
    del pm, base, opt
    return statistics.median(times[3:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks this script runs")
    args = ap.parse_args()

    import transformers

    from koff.config.recipe import MemoryConfig
    from koff.model.shapes import shape_config
    from koff.training.plan import make_plan

    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        from transformers import AutoConfig

        values = dict(SMOKE_SHAPE)
        shapes = {"smoke": AutoConfig.for_model(values.pop("model_type"), **values)}
        args.seq_len, args.steps = min(args.seq_len, 64), min(args.steps, 12)
    elif not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA GPU on this machine; nothing measured (use --smoke to test the script)")
        return 0
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        shapes = {name: shape_config(name) for name in args.models}
    name_of = {torch.bfloat16: "bfloat16", torch.float32: "float32"}
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    print(f"{gpu}; torch {torch.__version__}, transformers {transformers.__version__}; {name_of[dtype]} base, "
          f"gradient checkpointing, batch {args.batch_size} x {args.seq_len} tokens, {args.steps} koff steps per model")
    print(f"{'model':14}{'koff tok/s':>11}{'koff s/step':>12}{'peft s/step':>12}{'koff/peft':>10}"
          f"{'peak GB':>9}{'plan GB':>9}{'loss first→last':>17}{'max |ŝ-t|':>11}")
    for name, config in shapes.items():
        t0 = time.time()
        key = name_of[dtype] + "+checkpointing"
        plan = make_plan(config, MemoryConfig(lora_rank=8, kv_tokens=16), batch_size=args.batch_size,
                         seq_len=args.seq_len, memories=2, dtypes=(name_of[dtype],))
        est = plan.estimates[key]
        est_gpu = est["total"] - est["runtime"]
        if total is not None and est_gpu is not None and est_gpu > 0.9 * total:
            print(f"{name:14} skipped: plan estimates {est_gpu / 2**30:.1f} GB, the GPU has {total / 2**30:.1f} GB")
            continue
        try:
            k = koff_run(config, device, dtype, args)
            gc.collect()
            torch.cuda.empty_cache() if device.type == "cuda" else None
            p = peft_step_time(config, device, dtype, args)
        except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - GPU only
            print(f"{name:14} out of memory: {str(e).splitlines()[0]}")
            continue
        finally:
            gc.collect()
            torch.cuda.empty_cache() if device.type == "cuda" else None
        peak = "-" if k["peak"] is None else f"{k['peak'] / 2**30:.2f}"
        planned = "-" if est_gpu is None else f"{est_gpu / 2**30:.2f}"
        gap = "-" if k["s_hat_gap"] is None else f"{k['s_hat_gap']:.4f}"
        print(f"{name:14}{k['tokens_s']:>11.0f}{k['step_s']:>12.3f}{p:>12.3f}{k['step_s'] / p:>10.2f}{peak:>9}"
              f"{planned:>9}{k['loss_first']:>8.2f}→{k['loss_last']:<8.2f}{gap:>11}   ({time.time() - t0:.0f} s)")
    print("targets: koff/peft <= 1.3; loss falls; |ŝ - t| <= 0.01 after warm-up; plan within 25% of peak")
    return 0


if __name__ == "__main__":
    sys.exit(main())

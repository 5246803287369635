"""Serving a backbone with swappable memories: latency, swap time, mixed batches, bytes on disk.

    python benchmarks/inference.py [--model PATH] [--run RUN] [--repeats 9]

All measured side by side in one run on the real model (default: bundled SmolLM2-135M):
  (a) forward latency of the physically pruned backbone vs the dense model at s* = 0.2 and 0.4,
      divided by the ideal speedup from parameter counts (parameters used in matmuls: every
      linear layer incl. the output head). Target >= 0.9.
  (b) time to switch the active memory (LoRA adapter + KV prefix) of a KoffModel. Target <= 5 ms.
  (c) greedy-generation tokens/s of a batch of 8 prompts with 3 different memories mixed vs the
      same batch with one memory. Target >= 0.8.
  (d) bytes on disk of backbone + N memories vs N full fine-tuned copies of the dense model.
Masks are one-shot Wanda-sp masks (global ranking, like koff's learned masks) unless --run gives a
koff run, whose mask, memories and export are used for (a) at its s* and for (d).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def matmul_params(model) -> int:
    """Parameters that take part in matrix products (all linear layers, incl. a tied lm_head)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def timed_pair(first, second, repeats: int) -> tuple[float, float]:
    """Median seconds of two callables, timed alternately (first, second, first, ...) after one
    warm-up each, so that drift in machine speed hits both sides alike."""
    first(), second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in zip((first, second), times):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return statistics.median(times[0]), statistics.median(times[1])


def wanda_masks(base, tok, sparsities):
    from koff.data.text import bundled_domain, pack, tokenize_files
    from koff.model.gates import topk_keep_mask
    from koff.model.importance import activation_stats, wanda_sp_scores

    batches = []
    for lang in ("en", "fr", "es"):
        d = bundled_domain(lang)
        blocks = pack(tokenize_files(d.train, tok), 128, 2048)
        batches += [blocks[i: i + 4] for i in range(0, len(blocks), 4)]
    scores = wanda_sp_scores(base, activation_stats(base, batches))
    return {s: topk_keep_mask(scores, s, scope="global") for s in sparsities}


def add_random_memories(km, names, kv_tokens=16, rank=8):
    from koff.model.memory import KVMemory, lora_config

    for name in names:
        k, v = km.capture_kv(torch.randint(100, 20000, (kv_tokens,)))
        km.add_memory(name, lora=lora_config(rank), kv=KVMemory(k, v))
    with torch.no_grad():
        for n, p in km.parts.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--run", type=Path, help="a koff run to export and measure (default: one-shot masks)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--memories", type=int, default=3, help="N for the bytes-on-disk comparison")
    args = ap.parse_args()

    from koff.evaluation.generation import generate
    from koff.export import prune_model
    from koff.model.base_model import load_base
    from koff.model.gates import NeuronGates
    from koff.model.koff_model import KoffModel

    torch.manual_seed(0)
    dense, tok, source = load_base(args.model)
    x = torch.randint(100, 20000, (args.batch_size, args.seq_len))

    # (a) latency of physically pruned backbones
    masks = {}
    if args.run:
        from koff.storage.run_dir import load_run

        run = load_run(args.run)
        masks[run.target_sparsity] = run.keep
    for s, keep in wanda_masks(dense, tok, [0.2, 0.4]).items():
        masks.setdefault(s, keep)
    print(f"(a) forward latency, batch {args.batch_size} x {args.seq_len} tokens, median of {args.repeats} (alternating)")
    print(f"    {'s*':>5} {'dense ms':>10} {'backbone ms':>12} {'speedup':>8} {'ideal':>7} {'ratio':>7}  (target >= 0.9)")
    with torch.inference_mode():
        for s, keep in sorted(masks.items()):
            small, _, _ = load_base(source)
            prune_model(small, keep)
            t_dense, t_small = timed_pair(lambda: dense(input_ids=x), lambda small=small: small(input_ids=x), args.repeats)
            ideal = matmul_params(dense) / matmul_params(small)
            speed = t_dense / t_small
            print(f"    {s:>5} {t_dense * 1e3:>10.1f} {t_small * 1e3:>12.1f} {speed:>8.3f} {ideal:>7.3f} {speed / ideal:>7.3f}")
            del small

    # (b) memory switch time
    gates = NeuronGates.for_model(dense)
    gates.set_mask(masks[0.2])
    km = KoffModel(dense, gates)
    names = ["en", "fr", "es"]
    add_random_memories(km, names)
    switches = []
    for i in range(60):
        name = names[i % 3]
        t = time.perf_counter()
        km.route(name, args.batch_size)  # a call's routing: its LoRA weights and KV prefix, nothing switched
        switches.append(time.perf_counter() - t)
    sw = statistics.median(switches[3:])
    print(f"(b) route a call to a memory (LoRA + KV prefix): median {sw * 1e3:.2f} ms over {len(switches) - 3} "
          f"switches, max {max(switches[3:]) * 1e3:.2f} ms  (target <= 5 ms)")

    # (c) mixed-domain vs single-domain generation
    prompts = ["The history of the city", "La historia de la ciudad", "L'histoire de la ville", "Scientists found that",
               "Los científicos", "Les scientifiques ont", "In the morning, the", "El gobierno anunció"]
    prompts = (prompts * ((args.batch_size + 7) // 8))[: args.batch_size]
    mixed = [names[i % 3] for i in range(args.batch_size)]
    run_single = lambda: generate(km, tok, prompts, "en", max_new_tokens=args.new_tokens)
    run_mixed = lambda: generate(km, tok, prompts, mixed, max_new_tokens=args.new_tokens)
    t_single, t_mixed = timed_pair(run_single, run_mixed, max(3, args.repeats // 2))
    n_tokens = args.batch_size * args.new_tokens
    print(f"(c) greedy generation, batch {args.batch_size}, {args.new_tokens} new tokens per row: single memory "
          f"{n_tokens / t_single:.1f} tok/s, 3 memories mixed {n_tokens / t_mixed:.1f} tok/s, ratio "
          f"{t_single / t_mixed:.3f}  (target >= 0.8)")

    # (d) bytes on disk
    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import save_file

        tmp = Path(tmp)
        dense_bytes = sum(p.stat().st_size for p in Path(source).glob("*.safetensors"))
        if args.run:
            from koff.export import export_run

            export_run(args.run, tmp / "export")
            backbone = (tmp / "export" / "model.safetensors").stat().st_size
            mems = [dir_bytes(d) for d in (tmp / "export" / "memories").iterdir()]
            per_memory = statistics.fmean(mems)
            label = f"run {args.run}"
        else:
            small, _, _ = load_base(source)
            prune_model(small, masks[0.2])
            state = {k: v.contiguous() for k, v in small.state_dict().items() if k != "lm_head.weight"}
            save_file(state, str(tmp / "backbone.safetensors"))
            backbone = (tmp / "backbone.safetensors").stat().st_size
            from koff.storage.run_dir import memory_record, write_memory

            (tmp / "m").mkdir()
            write_memory(tmp / "m", memory_record(km, "en"))
            per_memory = dir_bytes(tmp / "m")
            label = "one-shot s*=0.2 mask, LoRA r=8 + KV m=16 memories"
        n = args.memories
        ours = backbone + n * per_memory
        copies = n * dense_bytes
        print(f"(d) bytes on disk ({label}): backbone {backbone / 1e6:.1f} MB + {n} memories x "
              f"{per_memory / 1e6:.2f} MB = {ours / 1e6:.1f} MB vs {n} full copies x {dense_bytes / 1e6:.1f} MB = "
              f"{copies / 1e6:.1f} MB: {copies / ours:.2f}x smaller")


if __name__ == "__main__":
    main()

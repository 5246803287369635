"""Exported backbones in llama.cpp: pruned vs dense GGUF speed, and bytes on disk of every format.

    python benchmarks/engines.py [--run RUN] [--model PATH] [--outtypes f16 q8_0] [--threads 2]

Measured side by side in one run (llama.cpp through llama-cpp-python, CPU):
  (a) prompt processing (one batch of --prompt-tokens tokens) and generation (--gen-tokens
      single-token decode steps after an 8-token prompt), tokens/s of the pruned backbone GGUF
      against the dense GGUF of the same base at the same outtype, timed alternately; the ideal
      ratio is the ratio of weights that take part in matrix products (every 2-D tensor but the
      embedding lookup; a tied output head counted once), read from the two files, so padding
      (q8_0 widths rounded up to 32) is included. "+ LoRA" loads one memory's adapter.
  (b) bytes on disk of each export format (hf, vllm, gguf at each outtype) and of the dense base.
  (c) with --quality-tokens N (and a run whose memories have both halves): perplexity of backbone
      + own memory on the first N test tokens per domain (koff's evaluation blocks), as koff serves
      it (LoRA + KV), as an engine without a KV prefix serves it (the LoRA half, in koff), and as
      llama.cpp serves it (GGUF at each outtype + the LoRA adapter).
With no --run, a one-shot Wanda-sp mask at s* = 0.2 (global ranking, so layers get different
widths, like koff's learned masks) with two-step memories (sizes only) is built first.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def matmul_weights(gguf_path: Path) -> int:
    """Elements of the 2-D tensors llama.cpp multiplies (token_embd only when it is the output head)."""
    import gguf

    tensors = {t.name: int(t.n_elements) for t in gguf.GGUFReader(str(gguf_path)).tensors if len(t.shape) == 2}
    total = sum(n for name, n in tensors.items() if name != "token_embd.weight")
    if "output.weight" not in tensors:  # tied: the embedding is also the output matmul
        total += tensors["token_embd.weight"]
    return total


def oneshot_run(root: Path, model: str | None) -> Path:
    """A run with a one-shot Wanda-sp mask (s* = 0.2, global) and 2-step LoRA + KV memories."""
    from koff.config.recipe import config_from_dict
    from koff.training.pipeline import decompose

    cfg = config_from_dict({
        "model": model or "smollm2-135m", "domains": ["en", "fr", "es"], "general": "bundled",
        "target_sparsity": 0.2, "mask": "wanda-sp", "output": str(root / "run"), "reference": False,
        "memory": {"lora_rank": 8, "kv_tokens": 16},
        "train": {"steps": 2, "batch_size": 2, "seq_len": 64, "mask_scope": "global", "calibration_tokens": 4096},
    }, "benchmarks/engines.py")
    decompose(cfg, progress=False)
    return root / "run"


def _llm(path: Path, threads: int, n_ctx: int, lora: Path | None = None):
    import llama_cpp

    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, n_threads_batch=threads,
                           verbose=False, seed=0, lora_path=None if lora is None else str(lora))


def _pp(llm, ids: list[int]) -> float:
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    return time.perf_counter() - t


def _tg(llm, ids: list[int], steps: int) -> float:
    llm.reset()
    llm.eval(ids[:8])
    t = time.perf_counter()
    for tok in ids[8: 8 + steps]:
        llm.eval([tok])
    return time.perf_counter() - t


def timed_alternating(fns: list, repeats: int) -> list[float]:
    """Median seconds of each callable, called in turn (a, b, c, a, b, c, ...) after one warm-up
    each, so that drift in machine load hits all sides alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            out.append(fn())
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a koff run to export (default: a one-shot Wanda-sp s*=0.2 mask)")
    ap.add_argument("--model", help="base model (default: the run's, or the bundled SmolLM2-135M)")
    ap.add_argument("--outtypes", nargs="+", default=["f16", "q8_0"], choices=["f32", "f16", "q8_0"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quality-tokens", type=int, default=0, help="(c): test tokens per domain (0: skip)")
    ap.add_argument("--block", type=int, default=256, help="(c): evaluation block length")
    args = ap.parse_args()

    import llama_cpp
    import torch

    from koff.export import export_run
    from koff.export.gguf import write_gguf_model
    from koff.model.base_model import load_base
    from koff.storage.run_dir import load_run

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run_dir = args.run or oneshot_run(tmp, args.model)
        run = load_run(run_dir)
        dense, tok, source = load_base(args.model or run.manifest["base_model"]["source"])
        label = (f"run {args.run}" if args.run else "one-shot Wanda-sp mask (global), s* = 0.2") + \
            f"; FFN kept {1 - run.manifest['sparsity']['ffn']:.3f}"
        exports = {"hf": export_run(run_dir, tmp / "hf", model=args.model),
                   "vllm": export_run(run_dir, tmp / "vllm", model=args.model, format="vllm")}
        dense_gguf = {}
        for ot in args.outtypes:
            exports[f"gguf {ot}"] = export_run(run_dir, tmp / f"gguf-{ot}", model=args.model, format="gguf", outtype=ot)
            dense_gguf[ot] = tmp / f"dense-{ot}.gguf"
            write_gguf_model(dense, tok, dense_gguf[ot], ot, name="dense base")
        del dense

        from koff.data.text import bundled_domain

        ids = tok(bundled_domain("en").test[0].read_text(encoding="utf-8")[:20000])["input_ids"]
        need = max(args.prompt_tokens, 8 + args.gen_tokens)
        ids = (ids * (need // max(1, len(ids)) + 1))[:need]
        memory = sorted(run.memories)[0] if run.memories else None
        n_ctx = need + 16
        print(f"llama.cpp via llama-cpp-python {llama_cpp.__version__}, {args.threads} threads; {label}")
        print(f"(a) prompt processing: {args.prompt_tokens} tokens in one batch; generation: {args.gen_tokens} "
              f"single-token decode steps; median of {args.repeats}, alternating")
        print(f"    {'outtype':<7} {'model':<18} {'pp tok/s':>9} {'tg tok/s':>9} {'matmul weights':>15}")
        torch.set_num_threads(1)
        for ot in args.outtypes:
            pruned_path = exports[f"gguf {ot}"] / "model.gguf"
            models = [("dense", dense_gguf[ot], None), ("pruned", pruned_path, None)]
            if memory is not None:
                models.append((f"pruned + LoRA {memory}", pruned_path,
                               exports[f"gguf {ot}"] / "memories" / memory / "lora.gguf"))
            llms = [_llm(p, args.threads, n_ctx, lora) for _, p, lora in models]
            pp = timed_alternating([lambda m=m: _pp(m, ids[: args.prompt_tokens]) for m in llms], args.repeats)
            tg = timed_alternating([lambda m=m: _tg(m, ids, args.gen_tokens) for m in llms], args.repeats)
            weights = [matmul_weights(p) for _, p, _ in models]
            for (name, _, _), t_pp, t_tg, w in zip(models, pp, tg, weights):
                print(f"    {ot:<7} {name:<18} {args.prompt_tokens / t_pp:>9.1f} {args.gen_tokens / t_tg:>9.1f} "
                      f"{w:>15,}")
            ideal = weights[0] / weights[1]
            print(f"    {ot:<7} {'pruned / dense':<18} {pp[0] / pp[1]:>9.3f} {tg[0] / tg[1]:>9.3f}   ideal {ideal:.3f}"
                  f"  (pp {pp[0] / pp[1] / ideal:.2f} of ideal, tg {tg[0] / tg[1] / ideal:.2f} of ideal)")
            del llms

        print("(b) bytes on disk")
        base_bytes = sum(p.stat().st_size for p in Path(source).glob("*.safetensors"))
        print(f"    dense base model (safetensors, {source}): {base_bytes / 1e6:.1f} MB")
        for ot in args.outtypes:
            print(f"    dense GGUF {ot}: {dense_gguf[ot].stat().st_size / 1e6:.1f} MB")
        for name, out in exports.items():
            mem_dir = out / "memories"
            mems = sorted(mem_dir.iterdir()) if mem_dir.is_dir() else []
            total = dir_bytes(out)
            mem_total = sum(dir_bytes(d) for d in mems)
            per = f"{mem_total / len(mems) / 1e6:.2f} MB per memory" if mems else "no memories"
            print(f"    {name:<9} export: {total / 1e6:.1f} MB = backbone folder {(total - mem_total) / 1e6:.1f} MB + "
                  f"{len(mems)} memories, {per}")

        if args.quality_tokens:
            quality(run_dir, args, {ot: exports[f"gguf {ot}"] for ot in args.outtypes})


def _llama_block_nll(llm, blocks) -> float:
    """Summed next-token NLL of each block, as koff scores it (positions 1..block-1)."""
    import numpy as np

    total = 0.0
    for row in blocks.tolist():
        llm.reset()
        llm.eval(row)
        logits = np.asarray(llm.scores[: len(row) - 1], dtype=np.float64)
        logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        total += float((logz - logits[np.arange(len(row) - 1), row[1:]]).sum())
    return total


def quality(run_dir: Path, args, gguf_exports: dict[str, Path]) -> None:
    """(c): the same memories served with and without their KV half, in koff and in llama.cpp."""
    import dataclasses
    import math

    import llama_cpp

    from koff.data.text import Domain
    from koff.evaluation.perplexity import EvalSettings, block_nll, test_set
    from koff.storage.run_dir import attach_memory, build_model, load_run

    run = load_run(run_dir)
    full, tok = build_model(run, args.model)
    half, _ = build_model(run, args.model, memories=[])
    for rec in run.memories.values():
        attach_memory(half, dataclasses.replace(rec, kv_keys=None, kv_values=None))
    settings = EvalSettings(block=args.block, max_tokens=args.quality_tokens)
    data = run.manifest.get("data", {})
    domains = [Domain.from_dict(data[n]) for n in run.domains if n in data and n in run.memories]
    cols = ["koff LoRA+KV", "koff LoRA half"] + [f"llama.cpp {ot} + LoRA" for ot in gguf_exports]
    print(f"(c) perplexity, backbone + own memory, first {args.quality_tokens} test tokens per domain "
          f"({args.block}-token blocks)")
    print("    " + f"{'domain':<7}" + "".join(f"{c:>22}" for c in cols) + f"{'LoRA half / LoRA+KV':>22}")
    for d in domains:
        ts = test_set(d, tok, settings)
        n = ts.blocks.shape[0] * (ts.blocks.shape[1] - 1)
        ppl = [math.exp(float(block_nll(km, ts.blocks, d.name, 4).sum()) / n) for km in (full, half)]
        for _outtype, out in gguf_exports.items():
            llm = llama_cpp.Llama(str(out / "model.gguf"), lora_path=str(out / "memories" / d.name / "lora.gguf"),
                                  n_ctx=args.block, n_batch=args.block, logits_all=True, n_threads=args.threads,
                                  n_threads_batch=args.threads, verbose=False, seed=0)
            ppl.append(math.exp(_llama_block_nll(llm, ts.blocks) / n))
            del llm
        print("    " + f"{d.name:<7}" + "".join(f"{p:>22.2f}" for p in ppl) + f"{ppl[1] / ppl[0]:>22.3f}")


if __name__ == "__main__":
    main()

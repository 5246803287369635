"""`koff export`: a physically smaller backbone + memories for transformers, llama.cpp or vLLM."""

from __future__ import annotations

import argparse
from pathlib import Path

from koff.core.runtime import DTYPES
from koff.export import FORMATS, OUTTYPES, export_run, read_backbone_manifest

NAME = "export"
HELP = "physically smaller backbone + memories for transformers, llama.cpp or vLLM"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--format", choices=tuple(FORMATS), default="hf",
                   help="hf: transformers + remote code, peft memories (default); gguf: llama.cpp backbone + "
                        "LoRA adapters; vllm: nemotron-nas/DeciLM folder + LoRA adapters")
    p.add_argument("--outtype", choices=OUTTYPES,
                   help="tensor type of the GGUF backbone's matrices (--format gguf only; default f16)")
    p.add_argument("--model", help="base model location, if it moved since the run was made")
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="(hf, vllm) dtype of the stored backbone weights (default float32; a GGUF uses --outtype)")
    p.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    out = export_run(args.run, args.out, model=args.model, overwrite=args.overwrite, format=args.format,
                     outtype=args.outtype, dtype=args.dtype)
    m = read_backbone_manifest(out)
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

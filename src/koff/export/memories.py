"""Which half of a memory an engine can carry, and whether it can carry that LoRA at all.

koff's memory is a LoRA adapter plus a KV prefix. transformers + peft carry both (the KV half as a
CARTRIDGE adapter); llama.cpp and vLLM have no per-request KV prefix, so there a memory is its LoRA
half, and a memory without a LoRA is left out of the export (recorded in the manifest).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from koff.core.errors import ArtifactError
from koff.storage.run_dir import MemoryRecord
from koff.core.files import sha256_file
from koff.export.prune import PrunedBackbone, pad_ffn_state, slice_lora_state

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
ENGINE_LORA_TARGETS = {"gguf": ATTENTION + FFN, "vllm": ATTENTION + FFN}
ENGINE_NAMES = {"gguf": "llama.cpp", "vllm": "vLLM"}


def lora_modules(rec: MemoryRecord) -> set[str]:
    """Names of the modules a stored LoRA adapts (`q_proj`, ...), read from its tensors."""
    names = set()
    for key in rec.lora_state or {}:
        parts = key.split(".")
        for marker in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
            if marker in parts:
                names.add(parts[parts.index(marker) - 1])
    return names


def check_lora_for_engine(rec: MemoryRecord, engine: str, where: Path) -> None:
    """Raise ArtifactError if `engine` ("gguf" or "vllm") cannot apply this memory's LoRA exactly."""
    name = ENGINE_NAMES[engine]
    cfg = rec.lora_config or {}
    src = Path(where) / "adapter_config.json"
    allowed = ENGINE_LORA_TARGETS[engine]
    extra = sorted(lora_modules(rec) - set(allowed))
    if extra:
        raise ArtifactError(f"{src}: LoRA targets {extra} have no {name} counterpart; {name} takes a LoRA on "
                            f"{', '.join(allowed)} (memory {rec.name!r})")
    if cfg.get("use_dora"):
        raise ArtifactError(f"{src}: 'use_dora' is true; {name} applies plain LoRA only (memory {rec.name!r})")
    if cfg.get("bias", "none") != "none":
        raise ArtifactError(f"{src}: 'bias' is {cfg.get('bias')!r}; {name} LoRA adapters carry no bias "
                            f"(expected 'none', memory {rec.name!r})")
    if cfg.get("modules_to_save"):
        raise ArtifactError(f"{src}: 'modules_to_save' {cfg['modules_to_save']} cannot be carried by a {name} "
                            f"LoRA adapter (memory {rec.name!r})")
    if engine == "gguf" and cfg.get("alpha_pattern"):
        raise ArtifactError(f"{src}: 'alpha_pattern' is set; a llama.cpp adapter has one alpha for all "
                            f"tensors (memory {rec.name!r})")


def split_for_engine(memories: dict[str, MemoryRecord], engine: str, run_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The memories whose LoRA half `engine` carries (checked), and {name: why} for those left out."""
    kept, left_out = [], {}
    for name, rec in sorted(memories.items()):
        if rec.lora_state is None:
            left_out[name] = f"KV-only memory; {ENGINE_NAMES[engine]} has no per-request KV prefix"
            continue
        check_lora_for_engine(rec, engine, Path(run_dir) / "memories" / name)
        kept.append(name)
    return kept, left_out


def write_lora_halves(pb: PrunedBackbone, tmp: Path, names: list[str], widths: list[int],
                      write: Callable[[Path, MemoryRecord, dict[str, torch.Tensor]], list[str]]) -> dict[str, dict]:
    """Write the LoRA half of each named memory of `pb`'s run under `tmp/memories/NAME`, sliced to
    the kept neurons and padded to `widths`; `write(folder, record, state)` writes one adapter in
    the engine's format and returns its file names. Returns the manifest entry of each memory."""
    memories = {}
    for name in names:
        rec = pb.run.memories[name]
        d = tmp / "memories" / name
        d.mkdir(parents=True)
        files = write(d, rec, pad_ffn_state(slice_lora_state(rec.lora_state, pb.kept), widths))
        memories[name] = {"files": {f: sha256_file(d / f) for f in files}, "carries": ["lora"],
                          "lora_rank": rec.lora_config["r"], "kv_tokens": rec.kv_tokens,
                          "kv_dropped": rec.kv_keys is not None}
    return memories

"""Which parts of a memory an engine can carry, and whether it can carry that LoRA at all.

An exporter carries the part kinds its engine has a counterpart for (`CARRIES`): transformers +
peft carry the LoRA and the KV prefix (as a CARTRIDGE adapter); llama.cpp and vLLM have no
per-request KV prefix, so there a memory is its LoRA half, and a memory without a LoRA is left out
of the export. Any other part a memory holds (a kind registered later) is dropped and named in the
export's manifest; nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from koff.core.errors import ArtifactError
from koff.core.files import sha256_file
from koff.export.prune import PrunedBackbone, pad_ffn_state
from koff.storage.run_dir import MemoryRecord

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
ENGINE_LORA_TARGETS = {"gguf": ATTENTION + FFN, "vllm": ATTENTION + FFN}
ENGINE_NAMES = {"gguf": "llama.cpp", "vllm": "vLLM", "hf": "transformers + peft"}
CARRIES = {"hf": ("lora", "kv"), "gguf": ("lora",), "vllm": ("lora",)}
"""The memory part kinds each export format carries."""


def dropped_parts(rec: MemoryRecord, engine: str) -> list[str]:
    """The parts of `rec` that `engine` has no counterpart for."""
    return sorted(kind for kind in rec.parts if kind not in CARRIES[engine])


def lora_of(rec: MemoryRecord):
    """The memory's LoRA part (a LoraState), or None."""
    return rec.parts.get("lora")


def lora_modules(rec: MemoryRecord) -> set[str]:
    """Names of the modules a stored LoRA adapts (`q_proj`, ...), read from its tensors."""
    names = set()
    lora = lora_of(rec)
    for key in (lora.tensors if lora is not None else {}):
        parts = key.split(".")
        for marker in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
            if marker in parts:
                names.add(parts[parts.index(marker) - 1])
    return names


def check_lora_for_engine(rec: MemoryRecord, engine: str, where: Path) -> None:
    """Raise ArtifactError if `engine` ("gguf" or "vllm") cannot apply this memory's LoRA exactly."""
    name = ENGINE_NAMES[engine]
    lora = lora_of(rec)
    cfg = lora.config if lora is not None else {}
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
        if lora_of(rec) is None:
            others = ", ".join(rec.parts) or "no part"
            left_out[name] = f"no LoRA part ({others}); {ENGINE_NAMES[engine]} has no per-request KV prefix"
            continue
        check_lora_for_engine(rec, engine, Path(run_dir) / "memories" / name)
        kept.append(name)
    return kept, left_out


def write_lora_halves(pb: PrunedBackbone, tmp: Path, names: list[str], widths: list[int],
                      write: Callable[[Path, MemoryRecord, dict[str, torch.Tensor]], list[str]],
                      engine: str) -> dict[str, dict]:
    """Write the LoRA half of each named memory of `pb`'s run under `tmp/memories/NAME`, sliced to
    the kept neurons and padded to `widths`; `write(folder, record, state)` writes one adapter in
    the engine's format and returns its file names. Returns the manifest entry of each memory."""
    memories = {}
    for name in names:
        rec = pb.run.memories[name]
        d = tmp / "memories" / name
        d.mkdir(parents=True)
        lora = lora_of(rec)
        files = write(d, rec, pad_ffn_state(lora.fit_ffn(pb.run.keep, to_sliced=True).tensors, widths))
        kv = rec.parts.get("kv")
        memories[name] = {"files": {f: sha256_file(d / f) for f in files}, "carries": ["lora"],
                          "lora_rank": lora.rank, "kv_tokens": kv.tokens if kv is not None else 0,
                          "kv_dropped": kv is not None, "dropped": dropped_parts(rec, engine)}
    return memories

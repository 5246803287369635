"""Per-domain memories: the part interface and registry (`parts`), and the two part kinds koff
ships, LoRA adapters (`lora`) and a trainable KV prefix (`kv`). Importing this package registers
both kinds."""

from koff.model.memory.kv import KVMemory, KVPart, KVState, build_prefix, capture_kv, prefix_cache
from koff.model.memory.lora import LORA_TARGETS, LoraPart, LoraSpec, LoraState, lora_config, target_modules
from koff.model.memory.parts import (
                                     PART_KINDS,
                                     STATE_CLASSES,
                                     Call,
                                     MemoryPart,
                                     PartState,
                                     Prefix,
                                     current_call,
                                     register_part,
                                     routed,
)

__all__ = ["PART_KINDS", "STATE_CLASSES", "Call", "MemoryPart", "PartState", "Prefix", "current_call", "register_part", "routed",
           "LORA_TARGETS", "LoraPart", "LoraSpec", "LoraState", "lora_config", "target_modules",
           "KVMemory", "KVPart", "KVState", "build_prefix", "capture_kv", "prefix_cache"]

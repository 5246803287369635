"""Per-domain memories: LoRA adapters (through peft) plus a trainable KV memory.

A KV memory holds, for every layer, m key and m value vectors per KV head, shaped
`[layers, kv_heads, m, head_dim]`. It is placed in front of the attention cache exactly like past
key/values (keys stored after rotary embedding, as a real cache holds them), so real tokens sit at
positions m, m+1, ... It is initialised from the base model's own cache of m real domain tokens
(as in Cartridges, arXiv 2506.06266) and its first `num_frozen` tokens (the attention sink) never
train.

LoRA and prefix-style KV cannot be mixed inside one peft model, so koff owns the pairing: the LoRA
half is a named peft adapter, the KV half a `KVMemory` module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class KVMemory(nn.Module):
    """Trainable key/value prefix for every layer: `keys`, `values` of shape [L, H, m, d]."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, num_frozen: int = 1):
        super().__init__()
        if keys.shape != values.shape or keys.dim() != 4:
            raise ValueError(f"KV memory keys {tuple(keys.shape)} and values {tuple(values.shape)} must both be "
                             "[layers, kv_heads, tokens, head_dim]")
        if not 0 <= num_frozen <= keys.shape[2]:
            raise ValueError(f"num_frozen={num_frozen} is outside [0, {keys.shape[2]}]")
        self.keys = nn.Parameter(keys.detach().float().clone())
        self.values = nn.Parameter(values.detach().float().clone())
        self.num_frozen = num_frozen
        if num_frozen:
            for p in (self.keys, self.values):
                p.register_hook(self._freeze_sink)

    def _freeze_sink(self, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:, :, : self.num_frozen] = 0
        return grad

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[2]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.keys.shape)


@torch.no_grad()
def capture_kv(model: nn.Module, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own cache for `token_ids` (1-D): keys and values, each [L, H, m, d].

    Callers make sure gates and adapters are off (see `KoffModel.capture_kv`).
    """
    if token_ids.dim() != 1 or token_ids.numel() == 0:
        raise ValueError("capture_kv needs a non-empty 1-D tensor of token ids")
    out = model(input_ids=token_ids[None], use_cache=True)
    cache = out.past_key_values
    keys = torch.stack([layer.keys[0] for layer in cache.layers])
    values = torch.stack([layer.values[0] for layer in cache.layers])
    return keys.float(), values.float()


def prefix_cache(memories: Sequence[KVMemory | None], config) -> tuple[object | None, torch.Tensor, torch.Tensor]:
    """Build a transformers cache holding one KV prefix per batch row.

    Returns `(cache, prefix_mask [B, M], prefix_len [B])`. Rows with a shorter (or no) memory are
    left-padded with masked zeros up to the longest memory M. With no memory at all the cache is
    None and M = 0.
    """
    from transformers import DynamicCache

    batch = len(memories)
    lens = torch.tensor([0 if m is None else m.num_tokens for m in memories], dtype=torch.long)
    longest = int(lens.max()) if batch else 0
    if longest == 0:
        return None, torch.zeros(batch, 0, dtype=torch.bool), lens
    first = next(m for m in memories if m is not None)
    if all(m is first for m in memories):
        # one memory for the whole batch: expand (no copy, gradients flow to the single tensor)
        layers = [(first.keys[l][None].expand(batch, -1, -1, -1), first.values[l][None].expand(batch, -1, -1, -1))
                  for l in range(first.keys.shape[0])]
        return DynamicCache(layers, config=config), torch.ones(batch, longest, dtype=torch.bool), lens
    shape = first.shape
    for m in memories:
        if m is not None and (m.shape[0], m.shape[1], m.shape[3]) != (shape[0], shape[1], shape[3]):
            raise ValueError(f"KV memories of shapes {m.shape} and {shape} cannot share a batch")
    keys, values = [], []
    for m in memories:
        pad = longest - (0 if m is None else m.num_tokens)
        zeros = first.keys.new_zeros(shape[0], shape[1], pad, shape[3])
        keys.append(zeros if m is None else torch.cat([zeros, m.keys], dim=2))
        values.append(zeros if m is None else torch.cat([zeros, m.values], dim=2))
    k = torch.stack(keys, dim=1)  # [L, B, H, M, d]
    v = torch.stack(values, dim=1)
    mask = torch.arange(longest)[None, :] >= (longest - lens)[:, None]
    return DynamicCache([(k[l], v[l]) for l in range(shape[0])], config=config), mask, lens


def lora_config(rank: int, alpha: float | None = None, targets: Sequence[str] = LORA_TARGETS, dropout: float = 0.0):
    """A peft LoraConfig for one memory (alpha defaults to 2 * rank)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, target_modules=list(targets),
                      lora_dropout=dropout, bias="none", task_type="CAUSAL_LM")

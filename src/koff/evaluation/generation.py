"""Text generation with memories swapped per request.

`generate` takes a batch of prompts and one memory name per prompt: one routed call
(`KoffModel.route`) serves every decoding step, so each row gets its own LoRA delta (the used
memories' adapters stacked once, two matmuls per layer) and its own KV prefix (rows with a
shorter or no memory are padded with masked slots); prompts are left-padded, and each row's
positions continue after its own memory. The backbone is shared by all rows and never copied.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from koff.core.errors import ConfigError
from koff.model.koff_model import KoffModel


@torch.no_grad()
def generate(km: KoffModel, tokenizer, prompts: Sequence[str], memory: str | None | Sequence[str | None] = None,
             max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0, chat: bool = False) -> list[str]:
    """Continue each prompt with its memory (greedy when temperature is 0); returns the new text.

    `memory` is one name for the whole batch, or one name (or None for the bare backbone) per prompt.
    `chat` wraps each prompt in the tokenizer's chat template as a user turn.
    """
    prompts = list(prompts)
    if not prompts:
        return []
    names = km.row_names(memory, len(prompts))
    if chat and getattr(tokenizer, "chat_template", None) is None:

        raise ConfigError("--chat: the base model's tokenizer has no chat template; leave --chat out")
    if chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if any(len(e) == 0 for e in encoded):

        raise ConfigError("every prompt must have at least one token")
    width = max(len(e) for e in encoded)
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], dtype=torch.bool)
    device = next(km.model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)

    call = km.route(names, len(names))  # one routing (for mixed rows: one adapter stack) for all steps
    cache = km.prefix_cache(call.prefix)
    if call.prefix is not None:
        attention = torch.cat([call.prefix.mask.to(device), mask], dim=1)
        positions = call.prefix.lengths.to(device)[:, None] + (mask.long().cumsum(-1) - 1).clamp(min=0)
    else:
        attention, positions = mask, (mask.long().cumsum(-1) - 1).clamp(min=0)
    return _decode(km, tokenizer, call, ids, attention, positions, cache, max_new_tokens, temperature, seed, pad)


def _decode(km, tokenizer, call, step_ids, attention, positions, cache, max_new_tokens, temperature, seed,
            pad) -> list[str]:
    """Greedy or sampled decoding, the cache already holding each row's memory prefix."""
    batch, device = step_ids.shape[0], step_ids.device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    eos = tokenizer.eos_token_id
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(batch)]
    for _ in range(max_new_tokens):
        logits = km.decode_step(step_ids, call, cache, attention, positions).float()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1).cpu()
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(device)
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                out[i].append(t)
        if eos is not None:
            done |= nxt == eos
        if bool(done.all()):
            break
        step_ids = nxt[:, None]
        attention = torch.cat([attention, torch.ones_like(step_ids, dtype=torch.bool)], dim=1)
        positions = positions[:, -1:] + 1
    return [tokenizer.decode([t for t in o if t != eos], skip_special_tokens=True) for o in out]

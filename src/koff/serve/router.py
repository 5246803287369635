"""`model: "auto"`: pick the memory for an unlabeled prompt.

The router scores the prompt with every loaded memory in one mixed-memory forward pass (one row
per memory) and picks the memory under which the prompt is most likely: the lowest mean
next-token loss over the prompt's tokens. This needs nothing fitted when the run is made, so it
covers memories loaded later as well; its cost is one prefill of the prompt's first
`max_tokens` tokens per memory. A prompt of a single token gives no next-token loss to compare;
it goes to the first candidate (in name order).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..model import KoffModel, lm_loss


@torch.no_grad()
def token_losses(km: KoffModel, prompts: Sequence[Sequence[int]], names: Sequence[str],
                 max_tokens: int = 128, rows_per_call: int = 48) -> list[torch.Tensor]:
    """For each prompt, the loss of each of its tokens after the first under each memory:
    a [len(names), L - 1] tensor per prompt (L = its length, capped at `max_tokens`)."""
    device = next(km.model.parameters()).device
    jobs = [(i, j) for i in range(len(prompts)) for j in range(len(names))]
    cut = [list(p[:max_tokens]) for p in prompts]
    out = [torch.zeros(len(names), max(len(c) - 1, 0)) for c in cut]
    for start in range(0, len(jobs), rows_per_call):
        chunk = [(i, j) for i, j in jobs[start: start + rows_per_call] if len(cut[i]) > 1]
        if not chunk:
            continue
        width = max(len(cut[i]) for i, _ in chunk)
        ids = torch.tensor([[0] * (width - len(cut[i])) + cut[i] for i, _ in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(cut[i])) + [1] * len(cut[i]) for i, _ in chunk], dtype=torch.bool,
                            device=device)
        call = km.route([names[j] for _, j in chunk], len(chunk))
        nll = lm_loss(km.run(ids, call, mask), ids, mask, reduction="none").float().cpu()
        for row, (i, j) in enumerate(chunk):
            n = len(cut[i])
            out[i][j] = nll[row, width - n: width - 1]
    return out


def choose(losses: torch.Tensor, names: Sequence[str], length: int | None = None) -> str:
    """The memory with the lowest mean loss over the first `length` tokens of a prompt (all of them
    when None); `losses` is `token_losses`' [memories, L - 1] for that prompt."""
    scored = losses if length is None else losses[:, : max(length - 1, 0)]
    if scored.shape[1] == 0:
        return sorted(names)[0]
    return names[int(scored.mean(dim=1).argmin())]

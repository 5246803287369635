"""`model: "auto"`: pick the memory for an unlabeled prompt. Two ways:

  - `classifier` (the default): a multinomial naive Bayes over token ids, one class per memory,
    fitted on the training text each memory was trained on (the files its run recorded, read
    when the server loads the memory). It costs nothing per request next to a prefill. It chooses
    among the memories that have training text; one loaded without any is reached by its name.
  - `loss`: score the prompt with every loaded memory in one mixed-memory forward pass (one row per
    memory) and pick the memory under which the prompt is most likely (the lowest mean next-token
    loss). It needs no data, so it covers any memory, at the cost of one prefill of the prompt's
    first `max_tokens` tokens per memory. A prompt of a single token gives no next-token loss to
    compare; it goes to the first candidate (in name order).

Measured on the valid split (benchmarks/routing.py), the classifier picks the memory of the
prompt's language far more often: a memory can model text of another language better than that
language's own memory does (lowest loss and right label are not the same thing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from koff.data.text import tokenize_files
from koff.model.koff_model import KoffModel, lm_loss

ROUTERS = ("classifier", "loss")
MAX_FIT_LINES = 5000
"""Documents per training file the classifier reads."""


def token_counts(files: Sequence[str | Path], tokenizer, vocab: int, text_field: str = "text") -> torch.Tensor:
    """How often each token id occurs in the training files of one memory: [vocab] float."""

    ids = tokenize_files([Path(f) for f in files], tokenizer, text_field, max_lines=MAX_FIT_LINES)
    return torch.bincount(ids[ids < vocab], minlength=vocab).float()


@dataclass
class TokenClassifier:
    """Naive Bayes over token ids: log p(token | memory), add-one smoothed, uniform prior."""

    names: list[str]
    log_probs: torch.Tensor
    """[memories, vocab]."""

    @classmethod
    def fit(cls, counts: dict[str, torch.Tensor], alpha: float = 1.0) -> TokenClassifier:
        names = sorted(counts)
        c = torch.stack([counts[n] for n in names]) + alpha
        return cls(names, torch.log(c / c.sum(dim=1, keepdim=True)))

    def choose(self, ids: Sequence[int], length: int | None = None) -> str:
        """The memory whose training text makes the prompt's first `length` tokens most likely."""
        x = torch.tensor(list(ids[:length] if length else ids), dtype=torch.long)
        return self.names[int(self.log_probs[:, x].sum(dim=1).argmax())]


@torch.no_grad()
def token_losses(km: KoffModel, prompts: Sequence[Sequence[int]], names: Sequence[str],
                 max_tokens: int = 128, rows_per_call: int = 48) -> list[torch.Tensor]:
    """For each prompt, the loss of each of its tokens after the first under each memory:
    a [len(names), L - 1] tensor per prompt (L = its length, capped at `max_tokens`)."""
    device = next(km.model.parameters()).device
    cut = [list(p[:max_tokens]) for p in prompts]
    # similar lengths share a forward pass, so little of it is padding
    jobs = sorted(((i, j) for i in range(len(prompts)) for j in range(len(names))), key=lambda ij: len(cut[ij[0]]))
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

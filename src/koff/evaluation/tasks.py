"""General ability: zero-shot multiple choice by log-likelihood, and the likelihood of reference
GSM8K solutions, on the general-domain sets in the shared data folder.

Multiple choice (ARC-Challenge, OpenBookQA, PIQA, COPA: fields query/choices/gold; WinoGrande:
context_options/continuation/gold): every choice is scored by the summed log-probability of its
tokens after the context; `acc` picks the highest sum, `acc_norm` the highest sum per character
(as lm-evaluation-harness does). A query that starts with "Question:" gets "\\nAnswer:" appended.
GSM8K: per-token perplexity of the reference solution after "Question: ...\\nAnswer:".
The first `max_items` items of each file are used, the same for every method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from koff.core.errors import DataError
from koff.data.text import data_root, read_jsonl

TASK_FILES = {
    "arc_challenge": "arc_challenge.jsonl",
    "openbook_qa": "openbook_qa.jsonl",
    "piqa": "piqa.jsonl",
    "copa": "copa.jsonl",
    "winogrande": "winogrande.jsonl",
    "gsm8k": "gsm8k_test.jsonl",
}


@dataclass
class Item:
    contexts: list[str]
    continuations: list[str]
    gold: int


def load_task(name: str, max_items: int | None = None, root: Path | None = None) -> list[Item]:
    """Items of one task from `root/general/` (default: the shared data folder)."""
    if name not in TASK_FILES:
        raise DataError(f"unknown task {name!r}; known: {sorted(TASK_FILES)}")
    path = Path(root or data_root()) / "general" / TASK_FILES[name]
    if not path.is_file():
        raise DataError(f"task file {path} does not exist (set KOFF_DATA to the shared data folder)")
    items: list = []
    for i, r in read_jsonl(path):
        if max_items is not None and len(items) >= max_items:
            break
        try:
            if name == "gsm8k":
                items.append(Item([f"Question: {r['question']}\nAnswer:"], [" " + r["answer"]], 0))
            elif name == "winogrande":
                items.append(Item(list(r["context_options"]), [" " + r["continuation"]] * len(r["context_options"]),
                                  int(r["gold"])))
            else:
                q = r["query"] + ("\nAnswer:" if r["query"].startswith("Question:") else "")
                items.append(Item([q] * len(r["choices"]), [" " + c for c in r["choices"]], int(r["gold"])))
        except (KeyError, TypeError) as e:
            raise DataError(f"{path}:{i}: missing or malformed field ({e})") from None
    return items


@torch.no_grad()
def continuation_logprobs(km, tokenizer, pairs: list[tuple[str, str]], memory=None, batch_size: int = 16,
                          use_gates: bool = True) -> list[tuple[float, int]]:
    """Summed log-probability and token count of each continuation after its context."""
    return [(lp, n) for lp, n, _ in continuation_scores(km, tokenizer, pairs, memory, batch_size, use_gates)]


@torch.no_grad()
def continuation_scores(km, tokenizer, pairs: list[tuple[str, str]], memory=None, batch_size: int = 16,
                        use_gates: bool = True) -> list[tuple[float, int, bool]]:
    """Per (context, continuation): summed log-probability of the continuation, its token count, and
    whether greedy decoding would produce it (what lm-evaluation-harness's `loglikelihood` asks)."""
    seqs = []
    for ctx, cont in pairs:
        c = tokenizer(ctx, add_special_tokens=False)["input_ids"]
        k = tokenizer(cont, add_special_tokens=False)["input_ids"]
        seqs.append((c + k, len(k)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))  # similar lengths share a batch
    results: dict[int, tuple[float, int, bool]] = {}
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        width = max(len(seqs[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(seqs[i][0])] = torch.tensor(seqs[i][0])
            mask[r, : len(seqs[i][0])] = 1
        device = next(km.model.parameters()).device
        logp = F.log_softmax(km(ids.to(device), memory=memory, attention_mask=mask.to(device),
                                use_gates=use_gates).float(), dim=-1).cpu()
        for r, i in enumerate(idx):
            n, k = len(seqs[i][0]), seqs[i][1]
            targets = ids[r, n - k: n]
            rows = logp[r, n - k - 1: n - 1]
            results[i] = (float(rows.gather(-1, targets[:, None]).sum()), k, bool((rows.argmax(-1) == targets).all()))
    return [results[i] for i in range(len(seqs))]


def score_task(km, tokenizer, name: str, memory=None, max_items: int | None = 200, batch_size: int = 16,
               root: Path | None = None, use_gates: bool = True) -> dict:
    """Accuracy (multiple choice) or reference-solution perplexity (gsm8k) of one task;
    `use_gates=False` scores the dense base model."""
    items = load_task(name, max_items, root)
    pairs = [(c, k) for it in items for c, k in zip(it.contexts, it.continuations)]
    scores = continuation_logprobs(km, tokenizer, pairs, memory, batch_size, use_gates)
    if name == "gsm8k":
        total = sum(s for s, _ in scores)
        count = sum(n for _, n in scores)
        return {"task": name, "items": len(items), "solution_ppl": math.exp(-total / count), "tokens": count}
    correct = correct_norm = 0
    pos = 0
    for it in items:
        n = len(it.continuations)
        chunk = scores[pos: pos + n]
        pos += n
        correct += max(range(n), key=lambda j: chunk[j][0]) == it.gold
        # normalised by the characters of the choice itself, as lm-eval does (not its leading space)
        correct_norm += max(range(n), key=lambda j: chunk[j][0] / max(len(it.continuations[j].removeprefix(" ")), 1)
                            ) == it.gold
    return {"task": name, "items": len(items), "acc": correct / len(items), "acc_norm": correct_norm / len(items)}

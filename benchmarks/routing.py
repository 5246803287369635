"""Accuracy of `model: "auto"` (koff serve's router) on the valid split, by language and prompt length.

    python benchmarks/routing.py --run RUN [--sentences 200] [--lengths 2 4 8 16 32]

For each domain of the run whose name is a bundled language, the valid split's documents are cut
into sentences; each sentence (its first L tokens, for every L in --lengths; then the whole
sentence, up to the router's 128 tokens) is routed exactly as the server routes an unlabeled
prompt (`koff.serve.router`: the memory with the lowest mean next-token loss), and the pick is
right when it is the memory of the sentence's language. The columns for L use the same sentences
(those with at least max(L) tokens); "whole" uses every sentence with at least 2 tokens. The
sentences are the first --sentences of each language's valid split, in file order.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-ZÀ-ÖØ-Þ¿¡\"'«(])")


def sentences(path: Path, limit: int) -> list[str]:
    out = []
    for doc in path.read_text(encoding="utf-8").splitlines():
        for s in SENTENCE_END.split(doc.strip()):
            s = s.strip()
            if len(s.split()) >= 2:
                out.append(s)
            if len(out) >= limit:
                return out
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--sentences", type=int, default=200, help="sentences per language")
    p.add_argument("--lengths", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    p.add_argument("--router-tokens", type=int, default=128)
    args = p.parse_args()

    import torch

    from koff.artifact import build_model, load_run
    from koff.data import BUNDLED_LANGUAGES, data_root
    from koff.serve.router import choose, token_losses

    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    run = load_run(args.run)
    km, tok = build_model(run)
    names = sorted(km.memory_names)
    langs = [d for d in run.domains if d in BUNDLED_LANGUAGES and d in names]
    need = max(args.lengths)
    table: dict[str, dict] = {}
    t0 = time.perf_counter()
    for lang in langs:
        texts = sentences(data_root() / "text" / lang / "valid.txt", args.sentences)
        ids = [tok(s, add_special_tokens=False)["input_ids"] for s in texts]
        losses = token_losses(km, ids, names, max_tokens=args.router_tokens)
        long = [i for i, x in enumerate(ids) if len(x) >= need]
        row = {"n_long": len(long), "n_all": len(ids), "mean_tokens": sum(min(len(x), args.router_tokens)
                                                                          for x in ids) / len(ids)}
        for L in args.lengths:
            row[L] = sum(choose(losses[i], names, L) == lang for i in long) / max(1, len(long))
        row["whole"] = sum(choose(losses[i], names) == lang for i in range(len(ids))) / len(ids)
        picks = [choose(losses[i], names) for i in range(len(ids))]
        row["confused_with"] = {n: picks.count(n) for n in names if n != lang and picks.count(n)}
        table[lang] = row
    seconds = time.perf_counter() - t0

    print(f"auto-routing accuracy (memory with the lowest loss), run {args.run}, memories {', '.join(names)}; "
          f"valid split, first {args.sentences} sentences per language")
    head = " | ".join(f"{L} tok" for L in args.lengths)
    print(f"| language | sentences (>= {need} tok / all) | {head} | whole sentence (mean tokens) | wrong picks |")
    print("|---|---:|" + "---:|" * len(args.lengths) + "---:|---|")
    for lang, row in table.items():
        cells = " | ".join(f"{row[L]:.1%}" for L in args.lengths)
        wrong = ", ".join(f"{n} {c}" for n, c in row["confused_with"].items()) or "none"
        print(f"| {lang} | {row['n_long']} / {row['n_all']} | {cells} | {row['whole']:.1%} ({row['mean_tokens']:.0f}) | "
              f"{wrong} |")
    mean = {L: sum(r[L] for r in table.values()) / len(table) for L in [*args.lengths, "whole"]}
    print("| mean | | " + " | ".join(f"{mean[L]:.1%}" for L in args.lengths) + f" | {mean['whole']:.1%} | |")
    print(f"({seconds:.0f} s for {sum(r['n_all'] for r in table.values())} sentences x {len(names)} memories)")


if __name__ == "__main__":
    main()

"""Accuracy of `model: "auto"` (koff serve's routers) on the valid split, by language and prompt length.

    python benchmarks/routing.py --run RUN [--sentences 100] [--lengths 2 4 8 16 32]

For each domain of the run whose name is a bundled language, the valid split's documents are cut
into sentences; each sentence (its first L tokens, for every L in --lengths; then the whole
sentence, up to the router's 128 tokens) is routed exactly as the server routes an unlabeled
prompt (`koff.serve.routing`), by both routers: `classifier` (naive Bayes over token ids, fitted
on the training files the run recorded for each memory) and `loss` (the memory with the lowest
mean next-token loss). A pick is right when it is the memory of the sentence's language. The columns for L use the same sentences
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
    p.add_argument("--sentences", type=int, default=100, help="sentences per language")
    p.add_argument("--lengths", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    p.add_argument("--router-tokens", type=int, default=128)
    args = p.parse_args()

    import torch

    from koff.core.runtime import Runtime
    from koff.data.text import BUNDLED_LANGUAGES, data_root
    from koff.serve.loading import fit_router, load_served
    from koff.serve.routing import TokenClassifier, choose, token_losses

    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    served = load_served(args.run, Runtime(torch.device("cpu")))
    km, tok = served.km, served.tokenizer
    vocab = km.model.get_input_embeddings().num_embeddings
    for stored in served.memories:
        km.install_memory(stored.name, stored.states)
        fit_router(stored, tok, vocab)
    names = sorted(km.memory_names)
    missing = [s.name for s in served.memories if s.token_counts is None]
    if missing:
        raise SystemExit(f"no readable training text for {missing}: the classifier cannot be fitted")
    clf = TokenClassifier.fit({s.name: s.token_counts for s in served.memories})
    langs = [d for d in names if d in BUNDLED_LANGUAGES]
    need = max(args.lengths)
    tables: dict[str, dict] = {"classifier": {}, "loss": {}}
    seconds = {}
    data = {lang: [tok(s, add_special_tokens=False)["input_ids"]
                   for s in sentences(data_root() / "text" / lang / "valid.txt", args.sentences)] for lang in langs}
    for method in ("classifier", "loss"):
        t0 = time.perf_counter()
        for lang, ids in data.items():
            if method == "loss":
                losses = token_losses(km, ids, names, max_tokens=args.router_tokens)
                pick = lambda i, L=None, losses=losses: choose(losses[i], names, L)
            else:
                pick = lambda i, L=None, ids=ids: clf.choose(ids[i], L or args.router_tokens)
            long = [i for i, x in enumerate(ids) if len(x) >= need]
            row = {"n_long": len(long), "n_all": len(ids),
                   "mean_tokens": sum(min(len(x), args.router_tokens) for x in ids) / len(ids)}
            for L in args.lengths:
                row[L] = sum(pick(i, L) == lang for i in long) / max(1, len(long))
            picks = [pick(i) for i in range(len(ids))]
            row["whole"] = sum(p == lang for p in picks) / len(ids)
            row["confused_with"] = {n: picks.count(n) for n in names if n != lang and picks.count(n)}
            tables[method][lang] = row
        seconds[method] = time.perf_counter() - t0

    print(f"auto-routing accuracy, run {args.run}, memories {', '.join(names)}; valid split, first "
          f"{args.sentences} sentences per language; a pick is right when it is the sentence's language")
    for method, table in tables.items():
        what = ("classifier (naive Bayes over token ids, fitted on each memory's training files)"
                if method == "classifier" else "loss (the memory with the lowest mean next-token loss)")
        print(f"\nrouter: {what}; {seconds[method]:.1f} s")
        head = " | ".join(f"{L} tok" for L in args.lengths)
        print(f"| language | sentences (>= {need} tok / all) | {head} | whole sentence (mean tokens) | wrong picks |")
        print("|---|---:|" + "---:|" * len(args.lengths) + "---:|---|")
        for lang, row in table.items():
            cells = " | ".join(f"{row[L]:.1%}" for L in args.lengths)
            wrong = ", ".join(f"{n} {c}" for n, c in row["confused_with"].items()) or "none"
            print(f"| {lang} | {row['n_long']} / {row['n_all']} | {cells} | {row['whole']:.1%} "
                  f"({row['mean_tokens']:.0f}) | {wrong} |")
        mean = {L: sum(r[L] for r in table.values()) / len(table) for L in [*args.lengths, "whole"]}
        print("| mean | | " + " | ".join(f"{mean[L]:.1%}" for L in args.lengths) + f" | {mean['whole']:.1%} | |")


if __name__ == "__main__":
    main()

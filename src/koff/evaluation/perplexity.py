"""Perplexity of a run on each domain's test split: dense, dense + memories, backbone alone,
backbone + own memory, and the full swap matrix (backbone + memory i on domain j).

Every method is scored on the same tokens: the test text packed into non-overlapping blocks of
`block` tokens (the whole split, or its first `max_tokens`), positions 1..block-1 of every block,
token-weighted. Named subsets (for the bundled languages: "flores", the FLORES-200 devtest that
opens every test split, the same sentences in each language) are the blocks lying wholly inside
that leading part of the text.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from koff.core.atomic import atomic_write_text, check_folder, check_not_locked, lock, updated_folder
from koff.core.errors import ArtifactError, DataError
from koff.data.text import Domain, pack, read_documents, tokenize_documents, tokenize_files
from koff.evaluation.tasks import score_task
from koff.model.koff_model import KoffModel, lm_loss
from koff.storage.run_dir import Run, build_model, load_run


@dataclass
class EvalSettings:
    block: int = 256
    max_tokens: int | None = None
    """Per domain: score only the first max_tokens test tokens (None: the whole split)."""
    batch_size: int = 4
    swap: bool = True
    """Score every memory on every domain (False: each memory on its own domain only)."""
    dense: bool = True
    """Also score the dense base model (and dense + memories when the run has a reference)."""
    tests: dict[str, list[str]] = field(default_factory=dict)
    """Test files to score instead of the run's: name -> files. A run's domain name replaces that
    domain's test files (its memory is scored on them); a new name adds a domain no memory was
    trained for (scored with the backbone, the dense model and every memory)."""
    tasks: dict[str, int] = field(default_factory=dict)
    """General-ability tasks (koff.tasks) -> number of items, scored for the dense model, the
    backbone and the run's default memory (what a request naming no domain gets)."""
    tag: str = ""
    """Results go to eval/perplexity[-TAG].{json,md}."""


@dataclass
class TestSet:
    domain: str
    blocks: torch.Tensor
    subsets: dict[str, int]
    """subset name -> number of leading blocks it spans."""


def test_set(domain: Domain, tokenizer, settings: EvalSettings) -> TestSet:
    """Pack a domain's test text into blocks and locate its named subsets."""
    if not domain.test:
        raise DataError(f"domain {domain.name!r} has no test files to evaluate on")
    tokens = tokenize_files(domain.test, tokenizer, domain.text_field)
    try:
        blocks = pack(tokens, settings.block, settings.max_tokens)
    except DataError:
        raise DataError(f"domain {domain.name!r}: its test files ({', '.join(map(str, domain.test))}) give "
                        f"{tokens.numel()} tokens, fewer than one block of --block {settings.block}"
                        + (f" within --max-tokens {settings.max_tokens}" if settings.max_tokens else "")) from None
    subsets = {}
    for name, lines in domain.test_subsets.items():
        docs = read_documents(domain.test[0], domain.text_field)[:lines]
        n = tokenize_documents(docs, tokenizer).numel() // settings.block
        subsets[name] = min(n, blocks.shape[0])
    return TestSet(domain.name, blocks, subsets)


@torch.no_grad()
def block_nll(km: KoffModel, blocks: torch.Tensor, memory, batch_size: int = 8, desc: str | None = None,
              use_gates: bool = True) -> torch.Tensor:
    """Summed next-token NLL of each block (block-1 scored tokens per block); `use_gates=False`
    scores the dense base model (with the memory, if any)."""
    device = next(km.model.parameters()).device
    out = []
    for i in tqdm(range(0, blocks.shape[0], batch_size), desc=desc, disable=desc is None, leave=False):
        batch = blocks[i: i + batch_size].to(device)
        out.append(lm_loss(km(batch, memory=memory, use_gates=use_gates), batch, reduction="none").double().sum(1).cpu())
    return torch.cat(out)


def summarize(nll: torch.Tensor, ts: TestSet) -> dict[str, dict]:
    """PPL and token counts on the whole set and on each subset."""
    per_block = ts.blocks.shape[1] - 1
    out = {"test": {"ppl": math.exp(float(nll.sum()) / (nll.numel() * per_block)), "tokens": nll.numel() * per_block}}
    for name, n in ts.subsets.items():
        if n:
            out[name] = {"ppl": math.exp(float(nll[:n].sum()) / (n * per_block)), "tokens": n * per_block}
    return out


def _domains_of(run: Run, tests: dict[str, list[str]] | None = None) -> list[Domain]:
    out = [run.meta.data[name].domain() for name in run.domains if name in run.meta.data]
    for name, rec in run.memories.items():  # memories added later carry their own data record
        if name not in run.domains and isinstance(rec.info.get("data"), dict):
            out.append(Domain.from_dict(rec.info["data"]))
    for name, files in (tests or {}).items():
        paths = [Path(f).resolve() for f in files]
        for p in paths:
            if not p.is_file():
                raise DataError(f"--test {name}: file {p} does not exist")
        known = next((d for d in out if d.name == name), None)
        if known is not None:  # the domain's memory, scored on other text
            known.test, known.test_subsets = paths, {}
        else:
            out.append(Domain(name=name, train=[], test=paths))
    if tests:
        out = [d for d in out if d.name in tests]
    return out


# long: the evaluation protocol in order (dense, backbone, own memory, default memory, swap matrix); each step is a call
def evaluate_run(run_dir: Path, settings: EvalSettings | None = None, model: str | None = None,
                 progress: bool = True, write: bool = True, runtime=None) -> dict:
    """Evaluate a run (see module docstring); writes eval/perplexity.{json,md} into the run.
    `runtime` (koff.runtime.Runtime) sets device and dtype (default: float32 on the CPU)."""
    settings = settings or EvalSettings()
    run = load_run(run_dir)
    if write:  # refuse now, not after the evaluation
        check_not_locked(run_dir)
        check_folder(Path(run_dir) / "eval")
    km, tok = build_model(run, model, runtime=runtime)
    domains = _domains_of(run, settings.tests)
    sets = {d.name: test_set(d, tok, settings) for d in domains}
    names = [d.name for d in domains]
    memories = [n for n in names if n in run.memories] + [m for m in sorted(run.memories) if m not in names]

    def score(label: str, model_: KoffModel, memory, domain: str, use_gates: bool = True) -> dict:
        desc = f"{label} | {domain}" if progress else None
        return summarize(block_nll(model_, sets[domain].blocks, memory, settings.batch_size, desc, use_gates),
                         sets[domain])

    rows: dict[str, dict] = {}
    pruned = km.gates is not None
    if settings.dense:
        rows["dense"] = {d: score("dense", km, None, d, use_gates=False) for d in names}
    ref = run.reference if settings.dense else None
    if ref is not None:
        ref_km, _ = build_model(ref, model, runtime=runtime)
        rows["dense + memories"] = {d: score("dense + memories", ref_km, d, d) for d in names if d in ref.memories}
        del ref_km
    if pruned:
        rows["backbone"] = {d: score("backbone", km, None, d) for d in names}
    label = "backbone" if pruned else "dense"
    swap = {}
    for m in memories:
        for d in names:
            if settings.swap or m == d:
                swap[(m, d)] = score(f"{label} + memory {m}", km, m, d)
    if memories:
        own = {d: swap[(d, d)] for d in names if (d, d) in swap}
        if own:
            rows[f"{label} + own memory"] = own
    default = run.meta.default_memory
    if default in run.memories:  # what a request naming no domain gets
        rows[f"{label} + default memory ({default})"] = {d: swap[(default, d)] if (default, d) in swap
                                                          else score(label, km, default, d) for d in names}
    if not rows:
        raise ArtifactError(f"{run_dir}: nothing to evaluate (no gates, no memories, dense scoring off)")
    subsets = ["test"] + sorted({s for ts in sets.values() for s in ts.subsets})
    result = {
        "run": str(run.path),
        "base_model": run.meta.base_model.source,
        "target_sparsity": run.target_sparsity,
        "sparsity": {k: run.meta.sparsity[k] for k in ("ffn", "global", "global_without_embeddings")},
        "settings": asdict(settings),
        "subsets": subsets,
        "tokens": {d: {s: v["tokens"] for s, v in next(iter(rows.values()))[d].items()} for d in names},
        "rows": rows,
        "swap": {"memories": memories, "domains": names,
                 **{s: [[swap.get((m, d), {}).get(s, {}).get("ppl") for d in names] for m in memories]
                    for s in subsets}},
        "default_memory": default,
        "tasks": _score_tasks(km, tok, settings.tasks, default if default in run.memories else None, pruned),
    }
    if write:  # a table and its Markdown appear together, in one swap of eval/
        stem = "perplexity" + (f"-{settings.tag}" if settings.tag else "")
        with lock(run_dir, shared=True), updated_folder(Path(run_dir) / "eval") as out:
            atomic_write_text(out / f"{stem}.json", json.dumps(result, indent=2))
            atomic_write_text(out / f"{stem}.md", to_markdown(result))
    return result


def _score_tasks(km: KoffModel, tok, tasks: dict[str, int], default: str | None, pruned: bool) -> dict:
    """task -> {model row -> score} for the dense model, the backbone and the default memory."""

    out = {}
    for name, n in tasks.items():
        row = {"dense": score_task(km, tok, name, max_items=n, use_gates=False)}
        if pruned:
            row["backbone"] = score_task(km, tok, name, max_items=n)
        if default is not None:
            row[f"{'backbone' if pruned else 'dense'} + default memory ({default})"] = score_task(
                km, tok, name, memory=default, max_items=n)
        out[name] = row
    return out


def shown_subsets(result: dict) -> list[str]:
    """Subsets to display: a subset that covers exactly the scored tokens of every domain (e.g.
    FLORES under a small token budget) would repeat the "test" table."""
    out = []
    for s in result["subsets"]:
        if s != "test" and all(result["tokens"][d].get(s) == result["tokens"][d].get("test") for d in result["tokens"]):
            continue
        out.append(s)
    return out


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def to_markdown(result: dict) -> str:
    """The evaluation as Markdown tables (one per subset) plus the swap matrices."""
    names = result["swap"]["domains"] or list(result["tokens"])
    sp = result["sparsity"]
    lines = [f"# Perplexity: {result['run']}", "",
             f"Base model `{result['base_model']}`; target s* = {result['target_sparsity']} of FFN parameters "
             f"(achieved FFN {sp['ffn']:.3f}, global {sp['global']:.3f}, global without embeddings "
             f"{sp['global_without_embeddings']:.3f}). Blocks of {result['settings']['block']} tokens, "
             "token-weighted; lower is better.", ""]
    for s in shown_subsets(result):
        toks = ", ".join(f"{d} {result['tokens'][d].get(s, 0):,}" for d in names)
        also = [x for x in result["subsets"] if x != s and x not in shown_subsets(result)]
        title = f"{s} (= {', '.join(also)})" if s == "test" and also else s
        lines += [f"## {title} (scored tokens: {toks})", "", "| method | " + " | ".join(names) + " |",
                  "|---|" + "---:|" * len(names)]
        for method, row in result["rows"].items():
            lines.append(f"| {method} | " + " | ".join(_fmt(row.get(d, {}).get(s, {}).get("ppl")) for d in names) + " |")
        lines.append("")
        mems = result["swap"]["memories"]
        if mems:
            lines += [f"Swap matrix ({s}): row = memory, column = domain evaluated", "",
                      "| memory \\ domain | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
            for m, row in zip(mems, result["swap"][s]):
                lines.append(f"| {m} | " + " | ".join(_fmt(x) for x in row) + " |")
            lines.append("")
    lines += tasks_markdown(result)
    return "\n".join(lines)


def tasks_markdown(result: dict) -> list[str]:
    """A table of the general-ability tasks (accuracy, length-normalised; GSM8K: solution PPL)."""
    tasks = result.get("tasks") or {}
    if not tasks:
        return []
    rows = list(next(iter(tasks.values())))
    lines = ["## General ability (no domain named)", "", "| model | " + " | ".join(tasks) + " |",
             "|---|" + "---:|" * len(tasks)]
    for r in rows:
        cells = []
        for t in tasks.values():
            v = t.get(r, {})
            cells.append(f"{v['solution_ppl']:.2f} ppl" if "solution_ppl" in v else
                         f"{100 * v['acc_norm']:.1f}" if "acc_norm" in v else "–")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    items = ", ".join(f"{k} {v['dense']['items']}" for k, v in tasks.items())
    return lines + ["", f"Items: {items}; multiple choice: length-normalised accuracy (%).", ""]


def print_result(result: dict) -> None:
    """Print the evaluation tables to the terminal."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    sp = result["sparsity"]
    console.print(f"target s* = {result['target_sparsity']} of FFN parameters; achieved: FFN {sp['ffn']:.3f}, "
                  f"global {sp['global']:.3f}, global without embeddings {sp['global_without_embeddings']:.3f}")
    names = result["swap"]["domains"] or list(result["tokens"])
    for s in shown_subsets(result):
        also = [x for x in result["subsets"] if x != s and x not in shown_subsets(result)]
        label = f"{s} = {', '.join(also)}" if s == "test" and also else s
        t = Table(title=f"perplexity, {label} ({result['settings']['block']}-token blocks)")
        t.add_column("method")
        for d in names:
            t.add_column(f"{d} ({result['tokens'][d].get(s, 0):,} tok)", justify="right")
        for method, row in result["rows"].items():
            t.add_row(method, *[_fmt(row.get(d, {}).get(s, {}).get("ppl")) for d in names])
        console.print(t)
        if result["swap"]["memories"]:
            w = Table(title=f"swap matrix, {label}: memory (row) on domain (column)")
            w.add_column("memory")
            for d in names:
                w.add_column(d, justify="right")
            for m, row in zip(result["swap"]["memories"], result["swap"][s]):
                w.add_row(m, *[_fmt(x) for x in row])
            console.print(w)
    if result.get("tasks"):
        console.print("\n".join(tasks_markdown(result)))

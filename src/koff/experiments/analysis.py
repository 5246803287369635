"""Specialization analysis: are language-specific FFN neurons the ones offloading removes?

1. LAPE (Tang et al. 2024, "Language-Specific Neurons"), on the dense base model: for neuron j of
   layer l and language k, p = share of language-k tokens on which act(gate_proj(x))_j > 0
   (streamed counts, no activations stored). Normalise p over languages, take the entropy. A
   neuron is a candidate if some language's p exceeds the `activation_quantile` of all p; the
   `specific_rate` lowest-entropy candidates are language-specific, specific to every language
   whose p exceeds that same bar. Language-general neurons are the `general_rate` neurons with
   the highest minimum p over languages (active in every language).
2. Enrichment: 2x2 tables pruned/kept x specific/not (overall and per layer) with the sample odds
   ratio, its 95% (Woolf) interval and Fisher's exact test; the same for language-general
   neurons; per language, the share of its specific neurons that were removed.
3. The same statistics for one-shot masks (magnitude, Wanda-sp) at the same sparsity.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from koff.core.atomic import atomic_write_text, check_folder, check_not_locked, lock, updated_folder
from koff.core.errors import ArtifactError, DataError
from koff.data.text import pack, tokenize_files
from koff.experiments.extras import pyplot, scipy_stats
from koff.model.base_model import gated_mlps, plain_linear
from koff.model.gates import topk_keep_mask
from koff.model.importance import activation_stats, neuron_scores
from koff.storage.run_dir import build_model, load_run


@dataclass
class LapeSettings:
    tokens: int = 16384
    """Tokens of each language's text to count activations on."""
    seq_len: int = 256
    batch_size: int = 4
    specific_rate: float = 0.01
    activation_quantile: float = 0.95
    general_rate: float = 0.01


@torch.no_grad()
def activation_probability(model: nn.Module, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Per layer and neuron, the share of tokens with act(gate_proj(x)) > 0: [layers, width].

    Counts are accumulated in forward hooks; the hooks return None so activations pass through.
    """
    mlps = gated_mlps(model)
    widths = {plain_linear(m.gate_proj).out_features for m in mlps}
    if len(widths) != 1:
        raise ValueError("LAPE needs equal FFN widths in every layer (analyse the dense base model)")
    counts = torch.zeros(len(mlps), widths.pop(), dtype=torch.float64)
    seen = [0]

    def hook(i, mlp):
        def count(module, args, output):
            fired = (mlp.act_fn(output) > 0).reshape(-1, output.shape[-1])
            counts[i] += fired.sum(0).double().cpu()
            if i == 0:
                seen[0] += fired.shape[0]
            return None

        return count

    handles = [m.gate_proj.register_forward_hook(hook(i, m)) for i, m in enumerate(mlps)]
    try:
        for batch in batches:
            model(input_ids=batch.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    if seen[0] == 0:
        raise ValueError("no tokens to count activations on")
    return counts / seen[0]


@dataclass
class Lape:
    """LAPE result: probabilities [layers, width, languages] and the selected neuron sets."""

    languages: list[str]
    prob: torch.Tensor
    entropy: torch.Tensor
    specific: torch.Tensor
    """bool [layers, width, languages]: neuron is specific to that language."""
    general: torch.Tensor
    """bool [layers, width]."""
    activation_bar: float

    @property
    def any_specific(self) -> torch.Tensor:
        return self.specific.any(-1)


def lape(prob: torch.Tensor, languages: list[str], settings: LapeSettings | None = None) -> Lape:
    """Select language-specific and language-general neurons from activation probabilities
    [layers, width, languages] (see module docstring)."""
    s = settings or LapeSettings()
    layers, width, n_lang = prob.shape
    if n_lang < 2:
        raise ValueError("LAPE needs at least two languages")
    flat = prob.flatten()
    bar = float(torch.quantile(flat.double(), s.activation_quantile))
    norm = prob / prob.sum(-1, keepdim=True).clamp(min=1e-12)
    entropy = -(norm * torch.where(norm > 0, norm.log(), torch.zeros_like(norm))).sum(-1)
    candidate = (prob > bar).any(-1)
    ranked = torch.where(candidate, entropy, torch.full_like(entropy, float("inf"))).flatten()
    k = min(round(s.specific_rate * ranked.numel()), int(candidate.sum()))
    chosen = torch.zeros(ranked.numel(), dtype=torch.bool)
    if k:
        chosen[torch.argsort(ranked, stable=True)[:k]] = True
    chosen = chosen.view(layers, width)
    specific = chosen[..., None] & (prob > bar)
    g = round(s.general_rate * layers * width)
    general = torch.zeros(layers * width, dtype=torch.bool)
    if g:
        general[torch.argsort(prob.min(-1).values.flatten(), descending=True, stable=True)[:g]] = True
    return Lape(languages, prob, entropy, specific, general.view(layers, width), bar)


def enrichment(pruned: torch.Tensor, selected: torch.Tensor) -> dict:
    """2x2 table of pruned/kept x selected/not, with the sample odds ratio of being pruned when
    selected, its 95% Woolf interval (0.5 added to every cell when one is 0) and Fisher's exact
    two-sided p-value."""
    fisher_exact = scipy_stats().fisher_exact
    pruned, selected = pruned.bool().flatten(), selected.bool().flatten()
    a = int((pruned & selected).sum())    # selected, pruned
    b = int((~pruned & selected).sum())   # selected, kept
    c = int((pruned & ~selected).sum())   # other, pruned
    d = int((~pruned & ~selected).sum())  # other, kept
    table = [[a, b], [c, d]]
    counts = {"table": {"selected_pruned": a, "selected_kept": b, "other_pruned": c, "other_kept": d},
              "pruned_share_selected": a / (a + b) if a + b else None,
              "pruned_share_other": c / (c + d) if c + d else None}
    if not (a + b and c + d and a + c and b + d):
        # A layer with no selected neuron, or none pruned, says nothing about enrichment: the
        # Haldane-corrected ratio would be a number made of the 0.5s alone. With only a column
        # empty the table is fixed by its margins, so Fisher's p is 1.
        p = 1.0 if a + b and c + d else float("nan")
        return {**counts, "odds_ratio": None, "ci95": None, "haldane_corrected": False, "fisher_p": p}
    corrected = 0 in (a, b, c, d)
    aa, bb, cc, dd = (x + 0.5 for x in (a, b, c, d)) if corrected else (a, b, c, d)
    odds = (aa * dd) / (bb * cc)
    half = 1.959963984540054 * math.sqrt(1 / aa + 1 / bb + 1 / cc + 1 / dd)
    p = float(fisher_exact(table, alternative="two-sided").pvalue)
    return {**counts, "odds_ratio": odds, "ci95": [math.exp(math.log(odds) - half), math.exp(math.log(odds) + half)],
            "haldane_corrected": corrected, "fisher_p": p}


def mask_report(pruned: torch.Tensor, result: Lape) -> dict:
    """Enrichment of one pruning mask ([layers, width] bool, True = removed)."""
    per_layer = []
    for layer in range(pruned.shape[0]):
        e = enrichment(pruned[layer], result.any_specific[layer])
        e["layer"] = layer
        e["specific_pruned"] = e["table"]["selected_pruned"]
        e["specific_kept"] = e["table"]["selected_kept"]
        per_layer.append(e)
    per_language = {}
    for k, lang in enumerate(result.languages):
        sel = result.specific[..., k]
        n = int(sel.sum())
        per_language[lang] = {"specific": n, "pruned": int((sel & pruned).sum()),
                              "pruned_share": (int((sel & pruned).sum()) / n) if n else None,
                              "enrichment": enrichment(pruned, sel)}
    return {"pruned_fraction": float(pruned.float().mean()),
            "specific": enrichment(pruned, result.any_specific),
            "general": enrichment(pruned, result.general),
            "per_language": per_language,
            "per_layer": per_layer}


# long: the analysis in order (LAPE, the run's mask, each baseline's mask, the tables); each step is a call
def analyze_run(run_dir: Path, settings: LapeSettings | None = None, baselines: tuple[str, ...] = ("magnitude", "wanda-sp"),
                model: str | None = None, progress: bool = True, write: bool = True, runtime=None) -> dict:
    """LAPE on the run's dense base model over the run's domains, then the enrichment of the
    run's mask and of one-shot masks at the same sparsity; writes RUN/analysis/. `runtime`
    (koff.runtime.Runtime) sets device and dtype."""
    from tqdm.auto import tqdm


    s = settings or LapeSettings()
    run = load_run(run_dir)
    if run.keep is None:
        raise ArtifactError(f"{run_dir}: the run is a dense + memories run: it has no backbone mask to analyse")
    if write:  # refuse now, not after the analysis

        check_not_locked(run_dir)
        check_folder(Path(run_dir) / "analysis")
    km, tok = build_model(run, model, memories=[], runtime=runtime)
    km.gates.detach()  # the dense base model: LAPE and one-shot scores are measured on it
    base = km.model
    data = run.meta.data
    languages = [d for d in run.domains if d in data]
    if len(languages) < 2:
        raise ArtifactError(f"{run_dir}: LAPE compares languages: the run needs at least two domains with data "
                            f"records in koff.json, has {languages}")
    probs, calib = [], []
    for lang in languages:
        dom = data[lang].domain()
        tokens = tokenize_files(dom.train, tok, dom.text_field)
        try:
            blocks = pack(tokens, s.seq_len, s.tokens)
        except DataError:
            raise DataError(f"domain {lang!r}: its training files ({', '.join(map(str, dom.train))}) give "
                            f"{tokens.numel()} tokens, fewer than one block of {s.seq_len} within --tokens "
                            f"{s.tokens}") from None
        calib.append(blocks)
        batches = [blocks[i: i + s.batch_size] for i in range(0, blocks.shape[0], s.batch_size)]
        probs.append(activation_probability(base, tqdm(batches, desc=f"LAPE {lang}", disable=not progress, leave=False)))
    result = lape(torch.stack(probs, -1), languages, s)
    pruned = ~torch.stack([k.bool() for k in run.keep])
    training = run.meta.training.train
    scope = training.mask_scope
    masks = {"koff": pruned}
    stats = None
    for kind in baselines:
        if kind != "magnitude" and stats is None:
            cal = [b[: max(1, training.calibration_tokens // s.seq_len)] for b in calib]
            stats = activation_stats(base, [c[i: i + s.batch_size] for c in cal for i in range(0, c.shape[0], s.batch_size)])
        keep = topk_keep_mask(neuron_scores(kind, base, stats), run.target_sparsity, scope=scope)
        masks[kind] = ~torch.stack(keep)
    out = {
        "run": str(run.path), "base_model": run.meta.base_model.source, "languages": languages,
        "settings": asdict(s), "target_sparsity": run.target_sparsity, "mask_scope": scope,
        "activation_bar": result.activation_bar,
        "counts": {"specific": int(result.any_specific.sum()),
                   "specific_per_language": {l: int(result.specific[..., k].sum()) for k, l in enumerate(languages)},
                   "general": int(result.general.sum()),
                   "specific_per_layer": result.any_specific.sum(1).tolist(),
                   "general_per_layer": result.general.sum(1).tolist()},
        "masks": {name: mask_report(m, result) for name, m in masks.items()},
    }
    if write:  # the tables and plots appear together, in one swap of analysis/

        with lock(run_dir, shared=True), updated_folder(Path(run_dir) / "analysis") as folder:
            atomic_write_text(folder / "specialization.json", json.dumps(out, indent=2))
            atomic_write_text(folder / "specialization.md", to_markdown(out))
            plot(out, folder)
    return out


def odds_text(e: dict, interval: bool = True) -> str:
    """'OR [lo, hi]' (or 'OR' alone) of an enrichment record, or '–' where the ratio is undefined."""
    if e["odds_ratio"] is None:
        return "–"
    if not interval:
        return f"{e['odds_ratio']:.2f}"
    lo, hi = e["ci95"]
    return f"{e['odds_ratio']:.2f} [{lo:.2f}, {hi:.2f}]"


def _p(x: float) -> str:
    return "nan" if x != x else (f"{x:.1e}" if x < 1e-3 else f"{x:.3f}")


def to_markdown(out: dict) -> str:
    """The analysis as Markdown tables."""
    langs = out["languages"]
    s = out["settings"]
    lines = [f"# Specialization: {out['run']}", "",
             f"LAPE on the dense base model `{out['base_model']}`, {s['tokens']:,} train tokens per language "
             f"({', '.join(langs)}); language-specific = lowest-entropy {s['specific_rate']:.0%} of neurons with some "
             f"language's activation probability above the {s['activation_quantile']:.0%} quantile "
             f"({out['activation_bar']:.3f}); language-general = top {s['general_rate']:.0%} by minimum activation "
             f"probability. Masks at s* = {out['target_sparsity']} ({out['mask_scope']} ranking for one-shot baselines).",
             "", f"Specific neurons: {out['counts']['specific']} ("
             + ", ".join(f"{l} {n}" for l, n in out["counts"]["specific_per_language"].items())
             + f"); general neurons: {out['counts']['general']}.", "",
             "## Are specific neurons pruned more often? (odds ratio of being pruned, 95% CI, Fisher p)", "",
             "| mask | pruned overall | specific pruned | OR specific [95% CI] | p | general pruned | OR general [95% CI] | p |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in out["masks"].items():
        sp, ge = r["specific"], r["general"]
        lines.append(f"| {name} | {r['pruned_fraction']:.1%} | {sp['pruned_share_selected'] or 0:.1%} | {odds_text(sp)} | "
                     f"{_p(sp['fisher_p'])} | {ge['pruned_share_selected'] or 0:.1%} | {odds_text(ge)} | {_p(ge['fisher_p'])} |")
    lines += ["", "## Per language: share of its specific neurons removed (OR, Fisher p)", "",
              "| mask | " + " | ".join(langs) + " |", "|---|" + "---:|" * len(langs)]
    for name, r in out["masks"].items():
        cells = []
        for l in langs:
            pl = r["per_language"][l]
            cells.append("–" if pl["pruned_share"] is None else
                         f"{pl['pruned']}/{pl['specific']} = {pl['pruned_share']:.0%} (OR {odds_text(pl['enrichment'], interval=False)}, "
                         f"p {_p(pl['enrichment']['fisher_p'])})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Per layer (koff mask): specific neurons pruned / kept, odds ratio [95% CI]", "",
              "| layer | specific pruned | specific kept | OR [95% CI] | p |", "|---:|---:|---:|---:|---:|"]
    for e in out["masks"]["koff"]["per_layer"]:
        lines.append(f"| {e['layer']} | {e['specific_pruned']} | {e['specific_kept']} | {odds_text(e)} | {_p(e['fisher_p'])} |")
    return "\n".join(lines) + "\n"


def plot(out: dict, folder: Path) -> list[Path]:
    """Per-layer counts of specific neurons pruned vs kept, and odds ratio per layer with CIs."""
    plt = pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    rows = out["masks"]["koff"]["per_layer"]
    layers = [e["layer"] for e in rows]
    caption = (f"{out['base_model']} | languages {', '.join(out['languages'])} | LAPE {out['settings']['tokens']:,} "
               f"tokens/lang | s*={out['target_sparsity']} | run {Path(out['run']).name}")
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(layers, [e["specific_kept"] for e in rows], label="kept", color="#4c72b0")
    ax.bar(layers, [e["specific_pruned"] for e in rows], bottom=[e["specific_kept"] for e in rows], label="pruned",
           color="#dd8452")
    ax.set_xlabel("layer")
    ax.set_ylabel("language-specific neurons")
    ax.set_title("Language-specific neurons per layer: kept vs pruned by koff")
    ax.legend()
    fig.text(0.01, 0.01, caption, fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    paths = [folder / "specific_per_layer.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4))
    for name, r in out["masks"].items():
        pts = [(e["layer"], e["odds_ratio"], *e["ci95"]) for e in r["per_layer"]
               if e["odds_ratio"] is not None]
        if not pts:
            continue
        x, y, lo, hi = zip(*pts)
        off = {"koff": 0.0, "magnitude": -0.2, "wanda-sp": 0.2}.get(name, 0.0)
        ax.errorbar([v + off for v in x], y, yerr=[[a - b for a, b in zip(y, lo)], [b - a for a, b in zip(y, hi)]],
                    fmt="o", capsize=2, label=name, ms=4)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("odds ratio: pruned | specific (95% CI)")
    ax.set_title("Enrichment of language-specific neurons among pruned neurons, per layer")
    ax.legend()
    fig.text(0.01, 0.01, caption, fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    paths.append(folder / "odds_ratio_per_layer.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths

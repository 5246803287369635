"""`koff report DIR`: aggregate the cell JSONs written by `koff compare` into a Markdown report
and PNG plots. Every table and figure states the command, model, data, steps and seeds behind it.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from koff.config.recipe import TrainConfig
from koff.core.atomic import atomic_write_text, lock
from koff.core.errors import ArtifactError
from koff.core.files import read_json
from koff.experiments import gap
from koff.experiments.extras import pyplot
from koff.experiments.figures import save_figure
from koff.storage.manifests import CellRecord


def load_cells(results: Path) -> list[dict]:
    """All cell records under RESULTS/cells/."""
    folder = Path(results) / "cells"
    if not folder.is_dir():
        raise ArtifactError(f"{results}: no cells/ folder (run `koff compare CONFIG` first)")

    cells = [CellRecord.from_dict(read_json(p), str(p)).to_dict() for p in sorted(folder.glob("*.json"))]
    if not cells:
        raise ArtifactError(f"{folder}: no cell results")
    return cells


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    n = len(values)
    return (statistics.fmean(values), statistics.stdev(values) if n > 1 else 0.0, n)


def _fmt(ms: tuple[float, float, int] | None, digits: int = 1, pct: bool = False) -> str:
    if ms is None:
        return "–"
    m, s, n = ms
    scale = 100 if pct else 1
    if n > 1:
        # A real but tiny spread printed as "± 0.0" reads like a bug; show it with one more digit.
        while 0 < s * scale < 0.5 * 10 ** -digits and digits < 3:
            digits += 1
        return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"
    return f"{m * scale:.{digits}f}"


def cell_ppl(cell: dict, domain: str, which: str = "best") -> float:
    """A cell's perplexity on a domain: with its own memory when it has one ("best"), the backbone
    alone ("backbone"), or what a request naming no domain gets ("no-domain": the run's default
    memory when it has one, `train.reg_memory: general`, else the backbone alone)."""
    row = cell["ppl"].get(domain)
    if row is None:
        raise ArtifactError(f"cell {cell.get('id')!r}: no perplexity on domain {domain!r} "
                            f"(it has {sorted(cell['ppl'])}); cells of one table must share their domains")
    if which == "best" and "own" in row:
        return row["own"]["test"]["ppl"]
    if which == "no-domain" and "default" in row:
        return row["default"]["test"]["ppl"]
    return row["backbone"]["test"]["ppl"]


def cell_mean_ppl(cell: dict, domains: list[str], which: str = "best") -> float:
    """The mean of `cell_ppl` over domains: one number per cell for plots and the mean column."""
    return statistics.fmean(cell_ppl(cell, d, which) for d in domains)


def _nan(values: list) -> list[float]:
    """None (a step that logged no value) as NaN, which matplotlib leaves as a gap."""
    return [v if v is not None else math.nan for v in values]


def _domains(cells: list[dict]) -> list[str]:
    for c in cells:
        if c.get("ppl"):
            return list(c["ppl"])
    return []


def _tasks(cells: list[dict]) -> list[str]:
    names: list[str] = []
    for c in cells:
        for t in c.get("tasks", {}):
            if t not in names:
                names.append(t)
    return names


def _task_value(cell: dict, task: str) -> float | None:
    r = cell.get("tasks", {}).get(task)
    if r is None:
        return None
    return r.get("acc_norm", r.get("acc", r.get("solution_ppl")))


def _task_stat(cells: list[dict], task: str) -> tuple[float, float, int] | None:
    """Mean ± std of one task's score over the cells that ran it (None where none did)."""
    vals = [v for v in (_task_value(c, task) for c in cells) if v is not None]
    return _mean_std(vals) if vals else None


def _fmt_task(task: str, stat: tuple[float, float, int] | None) -> str:
    # GSM8K is scored as solution perplexity; every other task as an accuracy.
    return _fmt(stat, 2) if task == "gsm8k" else _fmt(stat, 1, pct=True)


def main_table(cells: list[dict]) -> list[dict]:
    """One row per method of the main grid: mean ± std over seeds of every number."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for c in cells:
        if c["group"] == "main":
            by_method[c["method"]].append(c)
    domains, tasks = _domains(cells), _tasks(cells)
    rows = []
    for method, cs in by_method.items():
        row = {"method": method, "seeds": sorted(c["seed"] for c in cs), "deterministic": cs[0].get("deterministic"),
               "memory": any("own" in r for c in cs for r in c["ppl"].values()),
               "global_sparsity": cs[0]["sparsity"].get("global", 0.0),
               "ffn_sparsity": cs[0]["sparsity"].get("ffn", 0.0), "tokens": cs[0]["train"]["tokens"],
               "steps": cs[0]["train"]["steps"]}
        for d in domains:
            row[d] = _mean_std([cell_ppl(c, d) for c in cs])
            row[f"{d}/backbone"] = _mean_std([cell_ppl(c, d, "backbone") for c in cs])
        per_seed_mean = [cell_mean_ppl(c, domains) for c in cs]
        row["mean"] = _mean_std(per_seed_mean)
        for t in tasks:
            row[f"task/{t}"] = _task_stat(cs, t)
        rows.append(row)
    return rows


ONE_SHOT_LORA = ("magnitude+lora", "wanda-sp+lora", "flap+lora")
# Reading order of the main table: references, koff and its ablations, then the baselines.
METHOD_ORDER = ("dense", "dense+memories", "koff", "koff-lora", "koff-kv", "mask-only", "wanda-sp+memories",
                "wanda-sp+lora", "flap+lora", "magnitude+lora", "wanda-sp", "flap", "magnitude")


def _order(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _gap(a: tuple[float, float, int], b: tuple[float, float, int]) -> str:
    """How far apart two mean ± std entries are, in units of their combined seed spread (of one side
    only when the other has a single seed or is deterministic)."""
    stds = [x[1] for x in (a, b) if x[2] > 1]
    if not stds:
        return "one seed: no std"
    spread = math.hypot(*stds)
    if spread == 0:
        return "no spread"
    return f"{abs(a[0] - b[0]) / spread:.1f} std apart" + ("" if len(stds) == 2 else ", one side's std only")


def claims(cells: list[dict]) -> list[dict]:
    """The issue's three comparisons at the main sparsity, computed from whatever cells exist.

    Each entry: {"claim", "verdict" ("met", "missed" or "not measured"), "lines": [per-domain text]}.
    """
    rows = {r["method"]: r for r in main_table(cells)}
    domains = _domains(cells)
    one_shot = [m for m in ONE_SHOT_LORA if m in rows]
    by_seed = {(c["method"], c["seed"]): c for c in cells if c["group"] == "main"}

    def paired(lower: str, higher: str, d: str) -> str:
        """Seed by seed (a seed fixes the data order for both methods): on how many shared seeds
        `lower` has the lower perplexity. Empty when they share fewer than two seeds."""
        seeds = sorted(s for m, s in by_seed if m == lower and (higher, s) in by_seed)
        if len(seeds) < 2:
            return ""
        wins = sum(cell_ppl(by_seed[lower, s], d) < cell_ppl(by_seed[higher, s], d) for s in seeds)
        return f"; {lower} lower on {wins} of {len(seeds)} paired seeds"

    def check(claim: str, needs: list[str], judge) -> dict:
        absent = [n for n in needs if n not in rows]
        if absent:
            return {"claim": claim, "verdict": "not measured", "lines": ["missing: " + ", ".join(absent)]}
        judged = [judge(d) for d in domains]  # (met on this domain, text)
        return {"claim": claim, "verdict": "met" if all(ok for ok, _ in judged) else "missed",
                "lines": [text for _, text in judged]}

    def below_best_one_shot(d: str) -> tuple[bool, str]:
        best = min(one_shot, key=lambda m: rows[m][d][0])
        k, b = rows["koff"][d], rows[best][d]
        red = 1 - k[0] / b[0]
        return red >= 0.10, (f"{d}: koff {_fmt(k)} vs {best} {_fmt(b)}: {100 * red:+.1f}% "
                             f"({_gap(k, b)}{paired('koff', best, d)})")

    def mask_only_worse(d: str) -> tuple[bool, str]:
        k, m = rows["koff"][d], rows["mask-only"][d]
        rel = m[0] / k[0] - 1
        return rel >= 0.10, (f"{d}: mask-only {_fmt(m)} vs koff {_fmt(k)}: {100 * rel:+.1f}% "
                             f"({_gap(m, k)}{paired('koff', 'mask-only', d)})")

    def both_beat_each(d: str) -> tuple[bool, str]:
        k = rows["koff"][d]
        alone = {m: rows[m][d] for m in ("koff-lora", "koff-kv")}
        parts = [f"{m} {_fmt(a)} ({100 * (1 - k[0] / a[0]):+.1f}%, {_gap(k, a)}{paired('koff', m, d)})"
                 for m, a in alone.items()]
        return all(k[0] < a[0] for a in alone.values()), f"{d}: koff {_fmt(k)} vs " + ", ".join(parts)

    return [
        check("koff (LoRA + KV) perplexity at least 10% lower than the best one-shot + equal-budget LoRA, "
              "per language", ["koff"] + (one_shot or ["a one-shot + LoRA cell"]), below_best_one_shot),
        check("mask-only (same gates and objective, no memory) clearly worse than koff: at least 10% higher "
              "perplexity, per language", ["koff", "mask-only"], mask_only_worse),
        check("LoRA + KV memories better than LoRA-only and KV-only memories, per language",
              ["koff", "koff-lora", "koff-kv"], both_beat_each),
    ]


def _caption(cells: list[dict], group: str = "main") -> str:
    cs = [c for c in cells if c["group"] == group] or cells
    c0 = cs[0]
    cfg = c0["config"]
    seeds = sorted({c["seed"] for c in cs})
    t = cfg.get("train", {})
    model = Path(str(c0.get("base_model", cfg.get("model")))).name
    ev = c0.get("eval_settings", {})
    domains = cfg.get("domains")
    dom = ", ".join(domains) if isinstance(domains, list) else ", ".join(domains or {})
    return (f"`{c0['command']}` · model {model} · domains {dom} · {t.get('steps')} steps × {t.get('batch_size')}×"
            f"{t.get('seq_len')} tokens · seeds {seeds} · PPL on the first {ev.get('max_tokens') or 'all'} test tokens "
            f"per language ({ev.get('block')}-token blocks)")


def _leaves(setting: dict, path: tuple = ()) -> dict[tuple, object]:
    """A setting's overrides as {key path: value}, e.g. {("train", "controller"): "lagrangian"}."""
    out: dict[tuple, object] = {}
    for k in sorted(setting):
        v = setting[k]
        out.update(_leaves(v, path + (k,)) if isinstance(v, dict) else {path + (k,): v})
    return out


def _setting_key(setting: str) -> list[tuple]:
    """Sort key for a setting's JSON that orders numbers by value (kv_tokens 4 before 16 before 64)."""
    return [(path, (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)))
            for path, v in _leaves(json.loads(setting)).items()]


def sweep_rows(cells: list[dict], group: str) -> list[tuple[str, str, list[dict]]]:
    """Rows of one sweep table as (method, setting label, cells): for each method, its default setting
    from the main grid on the seeds the sweep used (so the two are paired); then, where the swept
    settings share overrides beside the swept field (`controller: lagrangian`), the cells of another
    sweep that have the largest part of them and nothing else, on the same seeds (the reference that
    differs only in the swept field); then each swept setting."""
    keyed: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for c in cells:
        if c["group"] == group:
            keyed[(c["method"], json.dumps(c["setting"], sort_keys=True))].append(c)
    swept = sorted(keyed.items(), key=lambda kv: _setting_key(kv[0][1]))
    rows: list[tuple[str, str, list[dict]]] = []
    for method in sorted({m for m, _ in keyed}, key=_order):
        seeds = {c["seed"] for (m, _), cs in keyed.items() if m == method for c in cs}
        default = sorted((c for c in cells if c["group"] == "main" and c["method"] == method
                          and (c["seed"] in seeds or c.get("deterministic"))), key=lambda c: c["seed"])
        if default:
            rows.append((method, "default", default))
        mine = [json.loads(s) for m, s in keyed if m == method]
        first, *rest = [_leaves(x) for x in mine]
        shared = {p: v for p, v in first.items() if all(p in r and r[p] == v for r in rest)}
        refs: dict[str, list[dict]] = defaultdict(list)
        for c in cells:
            if (c["group"] not in (group, "main") and c["method"] == method and c["seed"] in seeds
                    and c["setting"] and c["setting"] not in mine
                    and all(p in shared and shared[p] == v for p, v in _leaves(c["setting"]).items())):
                refs[json.dumps(c["setting"], sort_keys=True)].append(c)
        if refs:
            label, ref = max(refs.items(), key=lambda kv: (len(_leaves(json.loads(kv[0]))), kv[0]))
            rows.append((method, f"`{label}` ({ref[0]['group']} sweep)", sorted(ref, key=lambda c: c["seed"])))
        for (m, setting), cs in swept:
            if m == method:
                rows.append((method, f"`{setting}`", sorted(cs, key=lambda c: c["seed"])))
    return rows


IDEAS_GROUP = "ideas"
ADOPT_MARGIN = 0.02
"""An idea is adopted as the default when it beats the default on every language, on every one of
at least 3 paired seeds, by at least this fraction of perplexity."""


def ideas_rows(cells: list[dict]) -> list[dict]:
    """One row per setting of the ideas sweep, paired seed by seed with the default (main-grid)
    koff cell of the same seed: mean ± std per language, the mean's change, and per language on how
    many paired seeds the idea is at least ADOPT_MARGIN lower."""
    default = {c["seed"]: c for c in cells if c["group"] == "main" and c["method"] == "koff"}
    by_setting: dict[str, list[dict]] = defaultdict(list)
    for c in cells:
        if c["group"] == IDEAS_GROUP:
            by_setting[json.dumps(c["setting"], sort_keys=True)].append(c)
    domains = _domains(cells)
    rows = []
    for setting, cs in sorted(by_setting.items()):
        cs = sorted(cs, key=lambda c: c["seed"])
        paired = [c for c in cs if c["seed"] in default]
        wins = {d: sum(cell_ppl(c, d) <= (1 - ADOPT_MARGIN) * cell_ppl(default[c["seed"]], d) for c in paired)
                for d in domains}
        change = [cell_mean_ppl(c, domains) / cell_mean_ppl(default[c["seed"]], domains) - 1 for c in paired]
        rows.append({"setting": setting, "seeds": [c["seed"] for c in cs], "paired": len(paired),
                     **{d: _mean_std([cell_ppl(c, d) for c in cs]) for d in domains},
                     "mean": _mean_std([cell_mean_ppl(c, domains) for c in cs]),
                     "no_domain": _mean_std([cell_mean_ppl(c, domains, "no-domain") for c in cs]),
                     "change": _mean_std(change) if change else None, "wins": wins,
                     "adopt": len(paired) >= 3 and all(w == len(paired) for w in wins.values())})
    return rows


def ideas_section(cells: list[dict]) -> list[str]:
    rows = ideas_rows(cells)
    if not rows:
        return []
    domains = _domains(cells)
    seeds = sorted({s for r in rows for s in r["seeds"]})
    default = [c for c in cells if c["group"] == "main" and c["method"] == "koff" and c["seed"] in seeds]
    lines = ["", "## Ideas that might close the gap", "", _caption(cells, IDEAS_GROUP) + ". Each idea is the default "
             "recipe with one switch, against the default on the same seeds (the same data order). 'Paired wins' "
             f"counts, per language, the seeds on which the idea's perplexity is at least {100 * ADOPT_MARGIN:.0f}% "
             "below the default's; an idea is adopted only with every seed on every language (at least 3 seeds).", "",
             "| idea | seeds | " + " | ".join(domains) + " | mean | change of the mean (paired) | paired wins "
             + " / ".join(domains) + " | no domain named: mean | adopt |",
             "|---|---|" + "---:|" * (len(domains) + 2) + "---|---:|---|"]
    if default:
        dd = sorted(default, key=lambda c: c["seed"])
        lines.append("| default | " + ",".join(str(c["seed"]) for c in dd) + " | "
                     + " | ".join(_fmt(_mean_std([cell_ppl(c, d) for c in dd])) for d in domains)
                     + f" | {_fmt(_mean_std([cell_mean_ppl(c, domains) for c in dd]))} | | | "
                     + f"{_fmt(_mean_std([cell_mean_ppl(c, domains, 'no-domain') for c in dd]))} | |")
    for r in rows:
        wins = " / ".join(f"{r['wins'][d]}/{r['paired']}" for d in domains)
        lines.append(f"| `{r['setting']}` | {','.join(map(str, r['seeds']))} | " + " | ".join(_fmt(r[d]) for d in domains)
                     + f" | {_fmt(r['mean'])} | {_fmt(r['change'], 1, pct=True) if r['change'] else '–'} | {wins} | "
                     + f"{_fmt(r['no_domain'])} | {'**yes**' if r['adopt'] else 'no'} |")
    return lines


def to_markdown(cells: list[dict], figures: list[str], extra: list[str] | None = None,
                head: list[str] | None = None) -> str:
    """The report: `head` (sections that open it), the main table, the issue's comparisons, the
    sweeps, `extra` (sections after them), the figures."""
    domains, tasks = _domains(cells), _tasks(cells)
    rows = main_table(cells)
    lines = ["# koff results", "", *([*head, ""] if head else []), _caption(cells), "",
             "## Main table (s* = " + str(cells[0]["config"].get("target_sparsity")) + ")", "",
             "Perplexity with the method's own memory where it has one, else of the backbone alone; "
             "mean ± std over seeds (one number: a single seed or a deterministic method). Lower is better; "
             "task columns are length-normalised accuracy (%, acc_norm) of what a request naming no domain gets: "
             "the backbone alone, or a run's default memory (`train.reg_memory: general`); GSM8K is "
             "the perplexity of the reference solutions (lower is better).",
             "",
             "| method | seeds | " + " | ".join(domains) + " | mean | backbone alone " + "/".join(domains) + " | "
             + " | ".join(tasks) + " | global sparsity |",
             "|---|---|" + "---:|" * (len(domains) + 2 + len(tasks) + 1)]
    for r in sorted(rows, key=lambda r: _order(r["method"])):
        seeds = "det." if r["deterministic"] else ",".join(map(str, r["seeds"]))
        backbone = " / ".join(_fmt(r[f"{d}/backbone"]) for d in domains)
        task_cells = [_fmt_task(t, r[f"task/{t}"]) for t in tasks]
        lines.append(f"| {r['method']} | {seeds} | " + " | ".join(_fmt(r[d]) for d in domains) + f" | {_fmt(r['mean'])} | "
                     f"{backbone} | " + " | ".join(task_cells) + f" | {r['global_sparsity']:.3f} |")
    lines += ["", "## The issue's comparisons (s* = " + str(cells[0]["config"].get("target_sparsity")) + ")", "",
              "Computed from the table above; a percentage is the relative perplexity difference of the means, "
              "'std apart' the difference over the combined seed spread, 'paired seeds' a seed-by-seed count "
              "(one seed fixes the data order of both methods).", ""]
    for c in claims(cells):
        lines.append(f"- **{c['verdict']}**: {c['claim']}")
        lines += [f"  - {t}" for t in c["lines"]]
    lines += languages_section(cells)
    lines += ideas_section(cells)
    groups = sorted({c["group"] for c in cells} - {"main", "languages"})
    for g in groups:
        lines += ["", f"## Sweep: {g}", "", _caption(cells, g) + " (one seed per cell unless listed). Each method's "
                  "first row is its default setting from the main grid, on the same seeds, for reference; a row marked "
                  "'(… sweep)' is another sweep's cell that differs from the swept ones only in the swept field. "
                  "'No domain named' is the backbone alone, or the run's default memory where it has one.", "",
                  "| method | setting | seeds | " + " | ".join(domains) + " | mean | no domain named: mean | "
                  + " | ".join(tasks) + " | global sparsity |",
                  "|---|---|---|" + "---:|" * (len(domains) + 3 + len(tasks))]
        for method, setting, group in sweep_rows(cells, g):
            vals = {d: _mean_std([cell_ppl(c, d) for c in group]) for d in domains}
            mean = _mean_std([cell_mean_ppl(c, domains) for c in group])
            bb = _mean_std([cell_mean_ppl(c, domains, "no-domain") for c in group])
            task_cells = [_fmt_task(t, _task_stat(group, t)) for t in tasks]
            lines.append(f"| {method} | {setting} | {','.join(str(c['seed']) for c in group)} | "
                         + " | ".join(_fmt(vals[d]) for d in domains)
                         + f" | {_fmt(mean)} | {_fmt(bb)} | " + " | ".join(task_cells)
                         + f" | {group[0]['sparsity'].get('global', 0):.3f} |")
    lines += extra or []
    if figures:
        lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({Path(f).name})" for f in figures]
    return "\n".join(lines) + "\n"


ALL_LANGUAGES = ("en", "fr", "es", "de", "it", "pt")


def _controller(cell: dict) -> str:
    return cell["config"].get("train", {}).get("controller", TrainConfig.controller)


def languages_cells(cells: list[dict]) -> list[dict]:
    """The cells of the number-of-languages sweep, plus the cell with the same settings on the
    grid's own domains (its method, controller and seed, no other change), sorted by languages."""
    sweep = [c for c in cells if c["group"] == "languages"]
    if not sweep:
        return []
    ref = sweep[0]
    same = [c for c in cells if c["group"] != "languages" and c["method"] == ref["method"] and c["seed"] == ref["seed"]
            and _controller(c) == _controller(ref) and c["kind"] == "decompose"
            and set(c["setting"]) <= {"train"} and set(c["setting"].get("train", {})) <= {"controller"}
            and c["config"].get("target_sparsity") == ref["config"].get("target_sparsity")]
    return sorted(sweep + same[:1], key=lambda c: (len(c["ppl"]), list(c["ppl"])))


def languages_section(cells: list[dict]) -> list[str]:
    """The paper's table shape: 1 / 2 / 3 / 6 languages at the same steps per language, and the
    six-language swap matrix."""
    rows = languages_cells(cells)
    if not rows:
        return []
    langs = [x for x in ALL_LANGUAGES if any(x in c["ppl"] for c in rows)]
    c0 = rows[0]
    t, ev = c0["config"].get("train", {}), c0.get("eval_settings", {})
    caption = (f"`{c0['command']}` · model {Path(str(c0.get('base_model', c0['config'].get('model')))).name} · "
               f"{t.get('batch_size')}×{t.get('seq_len')} tokens per step, the same steps per language · "
               f"controller {_controller(c0)} · seed {c0['seed']} · PPL on the first {ev.get('max_tokens') or 'all'} "
               f"test tokens per language ({ev.get('block')}-token blocks), each language with its own memory; the "
               "backbone-alone mean is over the run's own languages")
    lines = ["", "## Number of languages", "", caption, "",
             "| languages | steps | s* | global sparsity | " + " | ".join(langs) + " | mean | backbone alone mean |",
             "|---|---:|---:|---:|" + "---:|" * (len(langs) + 2)]
    for c in rows:
        own = list(c["ppl"])
        steps = c["config"].get("train", {}).get("steps", c.get("train", {}).get("steps"))
        cols = [_fmt((cell_ppl(c, d), 0.0, 1)) if d in c["ppl"] else "" for d in langs]
        lines.append(f"| {'+'.join(own)} | {steps} | {c['config'].get('target_sparsity')} | "
                     f"{c['sparsity'].get('global', 0):.3f} | " + " | ".join(cols)
                     + f" | {cell_mean_ppl(c, own):.1f} | {cell_mean_ppl(c, own, 'backbone'):.1f} |")
    widest = max(rows, key=lambda c: len(c["ppl"]))
    swap = widest.get("swap")
    if swap:
        names = swap["domains"]
        lines += ["", f"Swap matrix of the {len(names)}-language run (memory in the row, language in the column; "
                  "test perplexity):", "", "| memory \\ language | " + " | ".join(names) + " |",
                  "|---|" + "---:|" * len(names)]
        for m, row in zip(swap["memories"], swap["test"]):
            lines.append(f"| {m} | " + " | ".join(
                (f"**{x:.1f}**" if m == d else f"{x:.1f}") if x is not None else "–" for d, x in zip(names, row)) + " |")
    return lines


def controller_runs(cells: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Cells per (method, sparsity controller), for methods trained with more than one controller.

    Only main-grid cells and sweep cells whose setting changes nothing but `train.controller` (and
    its own knobs) count, so each group differs from the others in the controller alone.
    """
    runs: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for c in cells:
        setting = c.get("setting") or {}
        only_controller = set(setting) == {"train"} and "controller" in setting["train"]
        if c["kind"] == "dense" or not c.get("kept_fraction_per_layer") or not (c["group"] == "main" or only_controller):
            continue
        ctrl = c["config"].get("train", {}).get("controller", TrainConfig.controller)
        runs[(c["method"], ctrl)].append(c)
    methods = [m for m, _ in runs]
    return {k: sorted(v, key=lambda c: c["seed"]) for k, v in sorted(runs.items()) if methods.count(k[0]) > 1}


def _finish(fig, plt, caption: str, path: Path, bottom: float) -> Path:
    """Put the cells' caption under a figure (in the `bottom` fraction left free), write it, close it."""
    fig.text(0.01, 0.005, caption.replace("`", ""), fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    save_figure(fig, path)
    plt.close(fig)
    return path


def _ppl_vs_sparsity(cells: list[dict], out: Path, domains: list[str], plt) -> Path | None:
    """PPL vs sparsity: every cell that differs from the main table only in target_sparsity."""
    series: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for c in cells:
        if c["group"] == "main" or set(c["setting"]) == {"target_sparsity"}:
            if c["kind"] == "dense":
                continue
            x = c["sparsity"].get("global", 0.0)
            series[c["method"]][round(x, 4)].append(cell_mean_ppl(c, domains))
    multi = {m: s for m, s in series.items() if len(s) > 1}
    if multi:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m, pts in sorted(multi.items()):
            xs = sorted(pts)
            ys = [statistics.fmean(pts[x]) for x in xs]
            err = [statistics.stdev(pts[x]) if len(pts[x]) > 1 else 0 for x in xs]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=m)
        dense = [c for c in cells if c["kind"] == "dense"]
        if dense:
            ax.axhline(cell_mean_ppl(dense[0], domains), color="gray", ls="--", label="dense")
        ax.set_xlabel("global sparsity (fraction of all parameters removed)")
        # The FFN fraction is what s* targets; on one model it is the global fraction times a constant.
        ratios = [c["sparsity"]["global"] / c["sparsity"]["ffn"] for c in cells if c["sparsity"].get("ffn")]
        if ratios:
            r = statistics.median(ratios)
            top = ax.secondary_xaxis("top", functions=(lambda g: g / r, lambda f: f * r))
            top.set_xlabel("FFN sparsity (fraction of FFN neurons removed, the target s*)")
        ax.set_ylabel(f"mean PPL over {', '.join(domains)}")
        ax.set_yscale("log")
        ax.set_title("Perplexity vs sparsity (own memory where the method has one)")
        ax.legend(fontsize=7)
        return _finish(fig, plt, _caption(cells), out / "ppl_vs_sparsity.png", bottom=0.05)
    return None


def _swap_heatmap(cells: list[dict], out: Path, domains: list[str], plt) -> Path | None:
    """Swap matrix heatmap."""
    swap_cells = [c for c in cells if c.get("swap")]
    if swap_cells:
        c = sorted(swap_cells, key=lambda c: c["seed"])[0]
        sw = c["swap"]
        fig, ax = plt.subplots(figsize=(5, 4.2))
        data = [_nan(row) for row in sw["test"]]
        im = ax.imshow(data, cmap="viridis_r")
        ax.set_xticks(range(len(sw["domains"])), sw["domains"])
        ax.set_yticks(range(len(sw["memories"])), sw["memories"])
        ax.set_xlabel("domain evaluated")
        ax.set_ylabel("memory active")
        for i, row in enumerate(data):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="white", fontsize=9)
        fig.colorbar(im, ax=ax, label="PPL")
        ax.set_title(f"Swap matrix: {c['method']} seed {c['seed']}")
        return _finish(fig, plt, _caption(cells), out / "swap_matrix.png", bottom=0.08)
    return None


def _kept_per_layer(cells: list[dict], out: Path, domains: list[str], plt) -> Path | None:
    """Kept-neuron fraction per layer."""
    kept: dict[str, list[list[float]]] = defaultdict(list)
    for c in cells:
        if c["group"] == "main" and c.get("kept_fraction_per_layer"):
            kept[c["method"]].append(c["kept_fraction_per_layer"])
    if kept:
        fig, ax = plt.subplots(figsize=(8, 4))
        seen_masks = set()
        for m, runs in sorted(kept.items()):
            mean = [statistics.fmean(v) for v in zip(*runs)]
            key = tuple(round(x, 4) for x in mean)
            if key in seen_masks:  # methods sharing one mask (e.g. a one-shot mask with/without LoRA)
                continue
            seen_masks.add(key)
            ax.plot(range(len(mean)), mean, marker=".", label=m)
        ax.set_xlabel("layer")
        ax.set_ylabel("fraction of FFN neurons kept")
        ax.set_title("Kept FFN neurons per layer (mean over seeds)")
        ax.legend(fontsize=7, ncol=2)
        return _finish(fig, plt, _caption(cells), out / "kept_per_layer.png", bottom=0.06)
    return None


def _training_curves(cells: list[dict], out: Path, domains: list[str], plt) -> Path | None:
    """Training curves of the main koff cells."""
    curve_cells = [c for c in cells if c["group"] == "main" and c.get("curves", {}).get("expected_sparsity")]
    if curve_cells:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for c in sorted(curve_cells, key=lambda c: (c["method"], c["seed"])):
            cv = c["curves"]
            label = f"{c['method']} s{c['seed']}"
            steps = cv["step"]
            loss = cv["loss"]
            k = max(1, len(loss) // 40)
            smooth = [statistics.fmean(loss[max(0, i - k): i + 1]) for i in range(len(loss))]
            axes[0].plot(steps, smooth, label=label, lw=1)
            axes[1].plot(steps, _nan(cv["expected_sparsity"]), label=label, lw=1)
            ctrl = cv.get("lambda1") or cv.get("total_shift")
            if ctrl:
                axes[2].plot(steps, _nan(ctrl), label=label, lw=1)
        c0 = curve_cells[0]["curves"]
        if c0.get("target"):
            axes[1].plot(c0["step"], c0["target"], "k--", lw=1, label="target")
        axes[0].set_title("training loss (moving average)")
        axes[1].set_title("expected sparsity vs target")
        axes[2].set_title("controller: λ1 or total log α shift")
        for a in axes:
            a.set_xlabel("step")
        axes[1].legend(fontsize=6)
        return _finish(fig, plt, _caption(cells), out / "training_curves.png", bottom=0.07)
    return None


def _controllers_figure(cells: list[dict], out: Path, domains: list[str], plt) -> Path | None:
    """Sparsity controllers side by side: the path of expected sparsity, and where each mask prunes."""
    by_ctrl = controller_runs(cells)
    main_koff = [c for c in cells if c["group"] == "main" and c["method"] == "koff"]
    default_ctrl = _controller(main_koff[0]) if main_koff else TrainConfig.controller
    if by_ctrl:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        target = None
        for i, ((method, ctrl), runs) in enumerate(by_ctrl.items()):
            color = f"C{i}"
            label = f"{method}, {ctrl}" + (" (default)" if ctrl == default_ctrl else "")
            for j, c in enumerate(runs):
                cv = c.get("curves", {})
                if cv.get("expected_sparsity"):
                    axes[0].plot(cv["step"], _nan(cv["expected_sparsity"]), color=color, lw=1, alpha=0.8,
                                 label=label if j == 0 else None)
                if target is None and cv.get("target"):
                    target = (cv["step"], cv["target"])
            mean = [statistics.fmean(v) for v in zip(*(c["kept_fraction_per_layer"] for c in runs))]
            ppl = statistics.fmean(cell_mean_ppl(c, domains) for c in runs)
            axes[1].plot(range(len(mean)), mean, marker=".", color=color,
                         label=f"{label}: mean PPL {ppl:.1f}, seeds {','.join(str(c['seed']) for c in runs)}")
        if target:
            axes[0].plot(*target, "k--", lw=1, label="target")
        axes[0].set_title("expected sparsity (one line per seed)")
        axes[0].set_xlabel("step")
        axes[1].set_title("kept FFN neurons per layer (mean over seeds)")
        axes[1].set_xlabel("layer")
        for a in axes:
            a.legend(fontsize=7)
        return _finish(fig, plt, _caption(cells, "controller"), out / "controllers.png", bottom=0.07)
    return None


def plots(cells: list[dict], out: Path) -> list[Path]:
    """PPL vs sparsity per method, swap-matrix heatmap, kept fraction per layer, training curves,
    and the sparsity controllers compared (each only where the cells hold what it shows)."""
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    domains = _domains(cells)
    figures = (_ppl_vs_sparsity, _swap_heatmap, _kept_per_layer, _training_curves, _controllers_figure)
    return [p for p in (figure(cells, out, domains, plt) for figure in figures) if p is not None]


PREVIOUS = "projection"
"""RESULTS/projection/: the grid of the previous default recipe (configs/grid-projection.yaml)."""
GAP = "gap"
"""RESULTS/gap/: the training-length grid (configs/gap.yaml)."""


def previous_section(results: Path) -> list[str]:
    """The previous default's main table (its own report is RESULTS/projection/report.md)."""
    folder = results / PREVIOUS
    if not (folder / "cells").is_dir():
        return []
    old = load_cells(folder)
    domains, tasks = _domains(old), _tasks(old)
    koff = next((c for c in old if c["group"] == "main" and c["method"] == "koff"), None)
    t = koff["config"].get("train", {}) if koff else {}
    lines = ["", f"## The previous default recipe (controller {t.get('controller')}, reg_memory {t.get('reg_memory')})",
             "", _caption(old) + f". The full report of that grid, with its sweeps: [{PREVIOUS}/report.md]"
             f"({PREVIOUS}/report.md).", "",
             "| method (previous default) | seeds | " + " | ".join(domains) + " | mean | backbone alone "
             + "/".join(domains) + " | " + " | ".join(tasks) + " |",
             "|---|---|" + "---:|" * (len(domains) + 2 + len(tasks))]
    for r in sorted(main_table(old), key=lambda r: _order(r["method"])):
        seeds = "det." if r["deterministic"] else ",".join(map(str, r["seeds"]))
        lines.append(f"| {r['method']} | {seeds} | " + " | ".join(_fmt(r[d]) for d in domains) + f" | {_fmt(r['mean'])} | "
                     + " / ".join(_fmt(r[f"{d}/backbone"]) for d in domains) + " | "
                     + " | ".join(_fmt_task(x, r[f"task/{x}"]) for x in tasks) + " |")
    return lines


def report(results: Path) -> Path:
    """Write RESULTS/report.md and its figures from RESULTS/cells/*.json, opening with the
    training-length table of RESULTS/gap/ and closing with the previous default's main table of
    RESULTS/projection/ where those grids have cells."""

    results = Path(results)
    cells = load_cells(results)
    path = results / "report.md"
    head: list[str] = []
    figs: list[Path] = []
    with lock(path):  # figures first, the report that shows them last
        gap_dir = results / GAP
        if (gap_dir / "cells").is_dir() and any((gap_dir / "cells").glob("*.json")):

            gap_cells = load_cells(gap_dir)
            command = gap_cells[0]["command"]
            head, numbers = gap.section(gap_cells, command)
            fig = gap.plot(gap_cells, gap_dir, _caption(gap_cells))
            if fig is not None:
                figs.append(fig)
                head += ["", f"![gap_vs_tokens]({GAP}/{fig.name})"]
            atomic_write_text(gap_dir / "gap.json", json.dumps(numbers, indent=1, sort_keys=True))
        figs += plots(cells, results)
        atomic_write_text(path, to_markdown(cells, [str(f) for f in figs if f.parent == results],
                                            extra=previous_section(results), head=head))
    return path

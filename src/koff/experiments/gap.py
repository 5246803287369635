"""How the offloading gap moves with training: the cells of a training-length grid
(configs/gap.yaml) as a table of own-memory PPL / dense + memories PPL per language at each
training length, a fitted trend with its uncertainty, and the plot `gap_vs_tokens.png`.

The gap of a pruned method at one training length is the ratio of its own-memory perplexity to
that of dense + memories trained the same way (same steps, batch, data order: the same seed),
per language. The trend fitted per language is a power law in training tokens T towards ratio 1,

    ratio(T) - 1 = a * T^(-b),

a straight line in log(ratio - 1) against log T, fitted by least squares to every seed's point.
It assumes the gap closes completely in the limit; where the points flatten, the fitted b is
small or its interval reaches 0, and the report says so instead of extrapolating.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from koff.experiments.extras import pyplot, scipy_stats
from koff.experiments.figures import save_figure

REFERENCE = "dense+memories"
PRUNED = ("koff", "wanda-sp+memories")
"""The methods whose gap to the reference is tabulated, in this order."""


def _steps(cell: dict) -> int:
    return int(cell["config"].get("train", {}).get("steps") or cell["train"]["steps"])


def _tokens(cell: dict) -> int:
    t = cell["config"].get("train", {})
    return _steps(cell) * int(t.get("batch_size", 4)) * int(t.get("seq_len", 128))


def _own(cell: dict, domain: str) -> float:
    row = cell["ppl"][domain]
    return (row.get("own") or row["backbone"])["test"]["ppl"]


def _references(cells: list[dict]) -> dict[tuple[int, int], dict]:
    """(steps, seed) -> the dense + memories cell a pruned cell trained the same way is divided by."""
    return {(_steps(c), c["seed"]): c for c in cells if c["method"] == REFERENCE and c["kind"] == "decompose"}


def ratios(cells: list[dict]) -> dict[tuple[str, int], dict[str, dict[int, float]]]:
    """(method, steps) -> domain -> seed -> own-memory PPL / dense + memories PPL, paired by seed."""
    ref = _references(cells)
    out: dict[tuple[str, int], dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for c in cells:
        if c["method"] not in PRUNED:
            continue
        r = ref.get((_steps(c), c["seed"]))
        if r is None:
            continue
        for d in c["ppl"]:
            if d in r["ppl"]:
                out[(c["method"], _steps(c))][d][c["seed"]] = _own(c, d) / _own(r, d)
    return out


def awaiting_reference(cells: list[dict]) -> list[dict]:
    """The pruned cells measured before their dense + memories reference (same steps and seed):
    they have no ratio yet, and the report lists them rather than leave a measured cell unseen."""
    ref = _references(cells)
    return sorted((c for c in cells if c["method"] in PRUNED and (_steps(c), c["seed"]) not in ref),
                  key=lambda c: (PRUNED.index(c["method"]), _steps(c), c["seed"]))


@dataclass
class Trend:
    """ratio - 1 = a * T^-b fitted to one language's points (T: training tokens)."""

    domain: str
    b: float
    b_low: float
    b_high: float
    """The 90% interval of b (Student t over the fit's residuals)."""
    points: int
    centre_tokens: float
    """The geometric mean of the points' tokens, where the fitted line is pinned (see tokens_at)."""
    centre_gap: float
    """The fitted ratio - 1 at centre_tokens (the geometric mean of the points' ratio - 1)."""

    @property
    def a(self) -> float:
        """The power law's scale, a = gap at the centre * centre^b: derived, so the line is stored once."""
        return self.centre_gap * self.centre_tokens ** self.b

    def ratio_at(self, tokens: float) -> float:
        """The fitted ratio after `tokens` training tokens."""
        return 1 + self.centre_gap * (self.centre_tokens / tokens) ** self.b

    def tokens_at(self, ratio: float, b: float | None = None) -> float | None:
        """Training tokens where the fitted ratio reaches `ratio` (None where it never does). With
        another slope `b` (an end of its interval) the line turns about the points' centre, which the
        least-squares line passes through; keeping `a` instead would move the whole line away from
        the data and put a steep slope's crossing before the first measured step."""
        b = self.b if b is None else b
        if b <= 0:
            return None
        return self.centre_tokens * (self.centre_gap / (ratio - 1)) ** (1 / b)


def fit_trend(domain: str, points: list[tuple[int, float]]) -> Trend | None:
    """Least squares of log(ratio - 1) on log tokens; None with fewer than 3 points, 2 distinct
    lengths, or a ratio at or below 1 (the power law has nothing to fit there)."""
    pts = [(t, r) for t, r in points if r > 1]
    if len(pts) < 3 or len({t for t, _ in pts}) < 2 or len(pts) < len(points):
        return None
    stats = scipy_stats()
    x = [math.log(t) for t, _ in pts]
    y = [math.log(r - 1) for _, r in pts]
    fit = stats.linregress(x, y)
    dof = len(pts) - 2
    half = stats.t.ppf(0.95, dof) * fit.stderr if dof > 0 else math.inf
    b = -fit.slope
    return Trend(domain=domain, b=b, b_low=b - half, b_high=b + half, points=len(pts),
                 centre_tokens=math.exp(statistics.fmean(x)), centre_gap=math.exp(statistics.fmean(y)))


def _fmt_tokens(t: float | None) -> str:
    if t is None or not math.isfinite(t):
        return "never (flat)"
    if t >= 1e12:  # beyond any training run: the order of magnitude is all that is meaningful
        return f"{t:.1e}"
    if t >= 1e9:
        return f"{t / 1e9:.3g} B"
    return f"{t / 1e6:.3g} M"


def section(cells: list[dict], command: str) -> tuple[list[str], dict]:
    """The report's training-length section: the headline table and the fitted trends. Returns
    (Markdown lines, the numbers behind them)."""
    rs = ratios(cells)
    if not rs:
        return [], {}
    domains = sorted({d for v in rs.values() for d in v}, key=lambda d: ["en", "fr", "es", "de", "it", "pt"].index(d)
                     if d in ("en", "fr", "es", "de", "it", "pt") else 99)
    tokens = {_steps(c): _tokens(c) for c in cells}
    ev = cells[0].get("eval_settings", {})
    lines = ["## The gap to dense + memories against training length", "",
             f"`{command}` · own-memory perplexity / dense + memories perplexity (trained the same steps, batch and "
             f"data order: paired by seed), first {ev.get('max_tokens') or 'all'} test tokens (FLORES-200 devtest) "
             "per language; mean ± std over the seeds listed. 1.00 would mean the backbone and its memory lose "
             "nothing against the dense model with the same memories.", "",
             "| method | steps | training tokens | seeds | " + " | ".join(domains) + " | mean |",
             "|---|---:|---:|---|" + "---:|" * (len(domains) + 1)]
    order = sorted(rs, key=lambda k: (PRUNED.index(k[0]), k[1]))
    for method, steps in order:
        per = rs[(method, steps)]
        seeds = sorted({s for d in per.values() for s in d})
        cols = []
        for d in domains:
            vals = list(per.get(d, {}).values())
            cols.append(_ms(vals))
        means = [statistics.fmean(per[d][s] for d in domains if s in per.get(d, {})) for s in seeds]
        lines.append(f"| {method} | {steps:,} | {tokens.get(steps, 0) / 1e6:.2f} M | {','.join(map(str, seeds))} | "
                     + " | ".join(cols) + f" | {_ms(means)} |")
    for c in awaiting_reference(cells):
        own = ", ".join(f"{d} {_own(c, d):.2f}" for d in domains if d in c["ppl"])
        ref_id = REFERENCE + c["id"][len(c["method"]):]
        lines += ["", f"Measured, without its reference yet: {c['method']} at {_steps(c):,} steps, seed {c['seed']}, "
                  f"own-memory PPL {own}. Its ratio and trend point wait for `{command} --only {ref_id}`."]
    points = {d: _koff_points(rs, tokens, d) for d in domains}
    lines += ["", "Fitted trend of koff's gap per language, ratio − 1 = a · T^(−b) (T: training tokens; least "
              "squares over every seed's point; 90% interval of b from the residuals). Where b's interval reaches "
              "0 the data cannot tell a closing gap from a flat one.", "",
              "| language | points | b (90% interval) | ratio 1.10 reached at | ratio 1.05 reached at |",
              "|---|---:|---|---|---|"]
    numbers: dict = {"ratios": {f"{m}@{s}": {d: dict(v) for d, v in per.items()} for (m, s), per in rs.items()},
                     "trends": {}}
    for d, pts in points.items():
        row, fitted = _trend_row(d, fit_trend(d, pts), len(pts))
        lines.append(row)
        if fitted is not None:
            numbers["trends"][d] = fitted
    return lines, numbers


def _koff_points(rs: dict, tokens: dict[int, int], domain: str) -> list[tuple[int, float]]:
    """Every seed's (training tokens, ratio) of koff on one language: what its trend is fitted to."""
    return [(tokens[steps], r) for (m, steps), per in rs.items() if m == "koff" for r in per.get(domain, {}).values()]


def _trend_row(domain: str, tr: Trend | None, points: int) -> tuple[str, dict | None]:
    """One language's row of the trend table, and its numbers (None where nothing was fitted)."""
    if tr is None:
        return f"| {domain} | {points} | no fit: it needs at least 3 points, all above 1, at 2 or more lengths | – | – |", None
    flat = tr.b_low <= 0
    at = {}
    for target in (1.10, 1.05):
        mid = tr.tokens_at(target)
        slow = None if flat else tr.tokens_at(target, tr.b_low)
        fast = tr.tokens_at(target, tr.b_high)
        at[target] = (mid, fast, slow)

    def cell(target: float) -> str:
        mid, fast, slow = at[target]
        if mid is None:
            return "never: the fitted gap does not shrink"
        return f"{_fmt_tokens(mid)} tokens ({_fmt_tokens(fast)} – {_fmt_tokens(slow) if slow else 'never'})"
    row = (f"| {domain} | {tr.points} | {tr.b:.2f} ({tr.b_low:.2f} – {tr.b_high:.2f}){' · may be flat' if flat else ''}"
           f" | {cell(1.10)} | {cell(1.05)} |")
    return row, {"a": tr.a, "b": tr.b, "b_interval": [tr.b_low, tr.b_high], "points": tr.points,
                 "tokens_at_1.10": at[1.10][0], "tokens_at_1.05": at[1.05][0]}


def _ms(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def plot(cells: list[dict], out: Path, caption: str) -> Path | None:
    """gap_vs_tokens.png: the ratio against training tokens (log x), one panel per language, koff
    and the one-shot baseline, each seed's point and the mean, with koff's fitted trend."""
    rs = ratios(cells)
    if not rs:
        return None
    plt = pyplot()
    tokens = {_steps(c): _tokens(c) for c in cells}
    domains = [d for d in ("en", "fr", "es", "de", "it", "pt") if any(d in v for v in rs.values())]
    fig, axes = plt.subplots(1, len(domains), figsize=(4.2 * len(domains), 3.8), squeeze=False)
    for ax, d in zip(axes[0], domains):
        for i, method in enumerate(PRUNED):
            pts = sorted((tokens[s], list(per[d].values())) for (m, s), per in rs.items() if m == method and d in per)
            if not pts:
                continue
            xs = [t for t, _ in pts]
            ax.plot(xs, [statistics.fmean(v) for _, v in pts], marker="o", color=f"C{i}", label=method)
            for t, v in pts:
                ax.scatter([t] * len(v), v, color=f"C{i}", s=10, alpha=0.5)
        koff = _koff_points(rs, tokens, d)
        tr = fit_trend(d, koff)
        if tr is not None:
            # over the span of koff's points, the ones it was fitted to, and 8x past the last
            lo, hi = min(t for t, _ in koff), max(t for t, _ in koff) * 8
            grid = [lo * (hi / lo) ** (k / 50) for k in range(51)]
            ax.plot(grid, [tr.ratio_at(g) for g in grid], "k:", lw=1, label=f"koff trend, b = {tr.b:.2f}")
        for level in (1.10, 1.05):
            ax.axhline(level, color="gray", lw=0.6, ls="--")
        ax.axhline(1.0, color="gray", lw=1)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # labelled minor ticks overlap on a 1-2 decade axis
        ax.set_xlabel("training tokens")
        ax.set_title(d)
        ax.set_ylabel("own-memory PPL / dense + memories PPL")
        ax.legend(fontsize=7)
    fig.text(0.01, 0.005, caption.replace("`", ""), fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path = out / "gap_vs_tokens.png"
    save_figure(fig, path)
    plt.close(fig)
    return path

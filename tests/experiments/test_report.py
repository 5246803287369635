import json

import pytest

from koff.core.errors import ArtifactError
from koff.experiments.report import _fmt, claims, controller_runs, main_table, report, sweep_rows, to_markdown


def _cell(method, seed, ppl_own, ppl_bb, group="main", setting=None, sparsity=0.118, tasks=None, det=False,
          kind="decompose"):
    domains = ["en", "fr"]
    ppl = {}
    for d, o, b in zip(domains, ppl_own or [None, None], ppl_bb):
        row = {"backbone": {"test": {"ppl": b, "tokens": 8160}}}
        if o is not None:
            row["own"] = {"test": {"ppl": o, "tokens": 8160}}
        ppl[d] = row
    return {"id": f"{method}__seed{seed}", "method": method, "group": group, "seed": seed, "setting": setting or {},
            "deterministic": det, "kind": kind, "ppl": ppl, "tasks": tasks or {},
            "sparsity": {"global": sparsity, "ffn": 0.2}, "train": {"steps": 300, "tokens": 153600, "seconds": 1},
            "config": {"domains": ["en", "fr"], "target_sparsity": 0.2, "train": {"steps": 300, "batch_size": 4,
                                                                                  "seq_len": 128}},
            "command": "koff compare configs/grid.yaml", "base_model": "/x/SmolLM2-135M-Instruct",
            "eval_settings": {"block": 256, "max_tokens": 8192}, "kept_fraction_per_layer": [0.8, 0.8],
            "curves": {}, "swap": None}


@pytest.fixture
def cells():
    return [
        _cell("dense", 0, None, [40.0, 50.0], sparsity=0.0, det=True, kind="dense",
              tasks={"arc_challenge": {"acc_norm": 0.30}, "gsm8k": {"solution_ppl": 3.0}}),
        _cell("koff", 0, [30.0, 20.0], [60.0, 70.0], tasks={"arc_challenge": {"acc_norm": 0.25}, "gsm8k": {"solution_ppl": 4.0}}),
        _cell("koff", 1, [32.0, 22.0], [62.0, 72.0], tasks={"arc_challenge": {"acc_norm": 0.27}, "gsm8k": {"solution_ppl": 4.2}}),
        _cell("koff", 2, [34.0, 24.0], [64.0, 74.0], tasks={"arc_challenge": {"acc_norm": 0.29}, "gsm8k": {"solution_ppl": 4.4}}),
        _cell("koff", 0, [50.0, 40.0], [90.0, 99.0], group="sparsity", setting={"target_sparsity": 0.4}, sparsity=0.236),
    ]


def test_main_table_aggregates_over_seeds(cells):
    rows = {r["method"]: r for r in main_table(cells)}
    assert set(rows) == {"dense", "koff"}
    m, s, n = rows["koff"]["en"]
    assert (m, n) == (32.0, 3) and s == pytest.approx(2.0)
    assert rows["koff"]["mean"][0] == pytest.approx(27.0)
    assert rows["koff"]["en/backbone"][0] == 62.0
    assert rows["koff"]["task/arc_challenge"][0] == pytest.approx(0.27)
    assert rows["dense"]["en"] == (40.0, 0.0, 1)


def test_markdown_has_expected_rows(cells):
    md = to_markdown(cells, [])
    assert "| koff | 0,1,2 | 32.0 ± 2.0 | 22.0 ± 2.0 | 27.0 ± 2.0 | 62.0 ± 2.0 / 72.0 ± 2.0 | 27.0 ± 2.0 | 4.20 ± 0.20 | 0.118 |" in md
    assert "| dense | det. | 40.0 | 50.0 | 45.0 | 40.0 / 50.0 | 30.0 | 3.00 | 0.000 |" in md
    assert "## Sweep: sparsity" in md
    # The sweep cell has no task results (–); the default row is koff's main cell on the same seed only.
    assert '| koff | `{"target_sparsity": 0.4}` | 0 | 50.0 | 40.0 | 45.0 | 94.5 | – | – | 0.236 |' in md
    assert "| koff | default | 0 | 30.0 | 20.0 | 25.0 | 65.0 | 25.0 | 4.00 | 0.118 |" in md
    assert "koff compare configs/grid.yaml" in md and "seeds [0, 1, 2]" in md


def test_sweep_rows_put_the_paired_default_first(cells):
    cells.append(_cell("koff", 0, [20.0, 15.0], [50.0, 55.0], group="sparsity", setting={"target_sparsity": 0.1}))
    cells.append(_cell("dense", 0, None, [1.0, 1.0], group="sparsity", setting={"x": 1}, det=True, kind="dense"))
    rows = [(m, label, [c["seed"] for c in cs]) for m, label, cs in sweep_rows(cells, "sparsity")]
    assert rows == [("dense", "default", [0]), ("dense", '`{"x": 1}`', [0]), ("koff", "default", [0]),
                    ("koff", '`{"target_sparsity": 0.1}`', [0]), ("koff", '`{"target_sparsity": 0.4}`', [0])]
    assert sweep_rows(cells, "no-such-group") == []


def test_sweep_rows_add_the_reference_with_the_settings_shared_overrides(cells):
    lag = {"train": {"controller": "lagrangian"}}
    for seed in (0, 1):
        cells.append(_cell("koff", seed, [20.0, 15.0], [50.0, 55.0], group="controller", setting=lag))
    for r in ("none", "general"):
        cells.append(_cell("koff", 0, [20.0, 15.0], [50.0, 55.0], group="reg",
                           setting={"train": {"controller": "lagrangian", "reg_memory": r}}))
    rows = [(label, [c["seed"] for c in cs]) for _, label, cs in sweep_rows(cells, "reg")]
    assert rows[:2] == [("default", [0]), ('`{"train": {"controller": "lagrangian"}}` (controller sweep)', [0])]
    assert len(rows) == 4
    # a one-setting sweep is referred to the largest part of its setting that another sweep ran ...
    cells.append(_cell("koff", 0, [20.0, 15.0], [50.0, 55.0], group="init",
                       setting={"train": {"controller": "lagrangian", "gate_init": "constant"}}))
    assert [label for _, label, _ in sweep_rows(cells, "init")][1] == rows[1][0]
    # ... but not to itself
    assert [label for _, label, _ in sweep_rows(cells, "controller")] == ["default", f"`{json.dumps(lag)}`"]
    assert [label for _, label, _ in sweep_rows(cells, "sparsity")] == ["default", '`{"target_sparsity": 0.4}`']


def test_sweep_rows_order_numbers_by_value(cells):
    for m in (64, 4, 16):
        cells.append(_cell("koff", 0, [20.0, 15.0], [50.0, 55.0], group="memory", setting={"memory": {"kv_tokens": m}}))
    labels = [label for _, label, _ in sweep_rows(cells, "memory")]
    assert labels == ["default"] + [f'`{{"memory": {{"kv_tokens": {m}}}}}`' for m in (4, 16, 64)]


def test_report_writes_markdown_and_plots(cells, tmp_path):
    (tmp_path / "cells").mkdir()
    for c in cells:
        (tmp_path / "cells" / f"{c['id']}_{c['group']}.json").write_text(json.dumps(c))
    path = report(tmp_path)
    assert path.read_text().startswith("# koff results")
    assert (tmp_path / "ppl_vs_sparsity.png").stat().st_size > 0
    assert (tmp_path / "kept_per_layer.png").stat().st_size > 0


def test_controller_runs_group_methods_trained_with_several_controllers(cells, tmp_path):
    assert controller_runs(cells) == {}  # one controller only: nothing to compare, no figure
    for seed in (1, 0):
        c = _cell("koff", seed, [28.0, 18.0], [58.0, 68.0], group="controller",
                  setting={"train": {"controller": "projection"}})
        c["config"]["train"]["controller"] = "projection"
        c["curves"] = {"step": [0, 1], "expected_sparsity": [0.0, 0.2], "target": [0.1, 0.2]}
        cells.append(c)
    runs = controller_runs(cells)
    assert list(runs) == [("koff", "lagrangian"), ("koff", "projection")]  # a cell naming none has the default
    assert [c["seed"] for c in runs[("koff", "projection")]] == [0, 1]
    assert len(runs[("koff", "lagrangian")]) == 3  # the main cells, not the s* = 0.4 sweep cell
    (tmp_path / "cells").mkdir()
    for c in cells:
        (tmp_path / "cells" / f"{c['id']}_{c['group']}.json").write_text(json.dumps(c))
    report(tmp_path)
    assert (tmp_path / "controllers.png").stat().st_size > 0


def test_tiny_spread_gets_an_extra_digit_not_a_zero():
    assert _fmt((41.4866, 0.048, 3)) == "41.49 ± 0.05"
    assert _fmt((41.5, 0.0, 3)) == "41.5 ± 0.0"
    assert _fmt((0.2533, 0.0, 3), pct=True) == "25.3 ± 0.0"


def test_report_errors(tmp_path):
    with pytest.raises(ArtifactError, match="no cells/ folder"):
        report(tmp_path)
    (tmp_path / "cells").mkdir()
    (tmp_path / "cells" / "x.json").write_text("{oops")
    with pytest.raises(ArtifactError, match="x.json: not valid JSON"):
        report(tmp_path)


def _verdicts(cells):
    return {c["claim"].split(" ")[0]: c for c in claims(cells)}


def test_claims_not_measured_without_their_cells(cells):
    v = _verdicts(cells)
    assert [c["verdict"] for c in claims(cells)] == ["not measured"] * 3
    assert v["mask-only"]["lines"] == ["missing: mask-only"]


def test_claims_compare_the_right_cells(cells):
    # koff en/fr = 32/22 (3 seeds); best one-shot+LoRA per language: wanda-sp on en (40), flap on fr (23)
    cells = cells + [
        _cell("wanda-sp+lora", 0, [40.0, 30.0], [90.0, 90.0]),
        _cell("flap+lora", 0, [45.0, 23.0], [90.0, 90.0]),
        _cell("mask-only", 0, None, [50.0, 30.0]),
        _cell("koff-lora", 0, [33.0, 23.0], [60.0, 70.0]),
        _cell("koff-kv", 0, [40.0, 21.0], [60.0, 70.0]),
    ]
    v = _verdicts(cells)
    first = v["koff"]
    assert first["verdict"] == "missed"  # fr: 1 - 22/23 = 4.3% < 10%
    assert first["lines"][0].startswith("en: koff 32.0 ± 2.0 vs wanda-sp+lora 40.0: +20.0%")
    assert "vs flap+lora 23.0: +4.3% (0.5 std apart, one side's std only)" in first["lines"][1]
    mask = v["mask-only"]
    assert mask["verdict"] == "met" and "+56.2%" in mask["lines"][0]  # 50/32 - 1
    both = v["LoRA"]
    assert both["verdict"] == "missed"  # fr: koff-kv 21 beats koff 22
    md = to_markdown(cells, [])
    assert "- **missed**: koff (LoRA + KV) perplexity at least 10% lower" in md
    # the main table reads references first, then koff and its ablations, then baselines
    assert md.index("| dense |") < md.index("| koff |") < md.index("| koff-lora |") < md.index("| wanda-sp+lora |")


def test_claims_count_paired_seeds(cells):
    # koff seeds 0/1/2 give en = 30/32/34; koff-lora loses to koff on seeds 0 and 1, wins on seed 2
    cells = cells + [_cell("koff-lora", s, [en, 30.0], [60.0, 70.0]) for s, en in [(0, 31.0), (1, 33.0), (2, 33.5)]]
    cells += [_cell("koff-kv", 0, [40.0, 30.0], [60.0, 70.0])]
    both = _verdicts(cells)["LoRA"]
    # 0.5 / hypot(2.0, 1.32) = 0.2 std apart
    assert "koff-lora 32.5 ± 1.3 (+1.5%, 0.2 std apart; koff lower on 2 of 3 paired seeds)" in both["lines"][0]
    # a single koff-kv seed shares only seed 0 with koff: no paired count
    assert both["lines"][0].endswith("koff-kv 40.0 (+20.0%, 4.0 std apart, one side's std only)")


def test_languages_section_tables_every_language_and_the_swap_matrix():
    from koff.experiments.report import languages_section

    def cell(cid, group, langs, steps, setting, swap=None):
        return {"id": cid, "method": "koff", "group": group, "seed": 0, "kind": "decompose", "setting": setting,
                "config": {"target_sparsity": 0.2, "train": {"controller": "lagrangian", "steps": steps}},
                "train": {"steps": steps}, "sparsity": {"global": 0.118}, "command": "koff compare grid.yaml",
                "ppl": {d: {"own": {"test": {"ppl": 10.0 + i}}, "backbone": {"test": {"ppl": 20.0 + i}}}
                        for i, d in enumerate(langs)}, "swap": swap, "tasks": {}, "eval_settings": {}}

    six = ["en", "fr", "es", "de", "it", "pt"]
    swap = {"memories": six, "domains": six, "test": [[10.0 + j + (0 if i == j else 5) for j in range(6)] for i in range(6)]}
    cells = [cell("a", "languages", ["en"], 100, {"domains": ["en"]}),
             cell("b", "languages", six, 600, {"domains": six}, swap),
             cell("c", "controller", ["en", "fr", "es"], 300, {"train": {"controller": "lagrangian"}}),
             cell("d", "controller", ["en", "fr", "es"], 300, {"train": {"controller": "augmented"}})]
    cells[3]["config"]["train"]["controller"] = "augmented"
    text = "\n".join(languages_section(cells))
    rows = [line for line in text.splitlines() if line.startswith("| en") and "| 0.2 |" in line]
    assert [r.split(" | ")[0] for r in rows] == ["| en", "| en+fr+es", "| en+fr+es+de+it+pt"]  # augmented left out
    assert "| 600 |" in rows[-1] and "15.0" in rows[-1]
    assert "**10.0**" in text and "Swap matrix of the 6-language run" in text


def test_a_sweep_row_reports_the_default_memory_as_what_a_request_naming_no_domain_gets(cells):
    """A run trained with reg_memory: general answers no-domain requests with its default memory,
    so the sweep's no-domain column reads that row, not the bare backbone's."""
    general = _cell("koff", 0, [31.0, 21.0], [300.0, 500.0], group="reg_memory",
                    setting={"train": {"reg_memory": "general"}})
    for d, p in (("en", 45.0), ("fr", 55.0)):
        general["ppl"][d]["default"] = {"test": {"ppl": p, "tokens": 8160}}
    md = to_markdown(cells + [general], [])
    assert '| koff | `{"train": {"reg_memory": "general"}}` | 0 | 31.0 | 21.0 | 26.0 | 50.0 |' in md


def test_ideas_table_pairs_seeds_and_applies_the_adoption_rule(cells):
    from koff.experiments.report import ideas_rows

    good = {"train": {"backbone_lora_rank": 8}}
    mixed = {"train": {"distill": 0.5, "distill_from": "dense"}}
    # defaults: en 30/32/34, fr 20/22/24. `good` is >= 2% lower on both languages on every seed;
    # `mixed` is lower on average but only 1% lower on seed 2's en.
    cells += [_cell("koff", s, [o * 0.95, f * 0.95], [60.0, 70.0], group="ideas", setting=good)
              for s, o, f in ((0, 30.0, 20.0), (1, 32.0, 22.0), (2, 34.0, 24.0))]
    cells += [_cell("koff", s, [o, f * 0.9], [60.0, 70.0], group="ideas", setting=mixed)
              for s, o, f in ((0, 27.0, 20.0), (1, 28.0, 22.0), (2, 34.0 * 0.99, 24.0))]
    rows = {json.loads(r["setting"])["train"].get("backbone_lora_rank", "mixed"): r for r in ideas_rows(cells)}
    assert rows[8]["adopt"] and rows[8]["wins"] == {"en": 3, "fr": 3}
    assert rows[8]["change"][0] == pytest.approx(-0.05)
    assert not rows["mixed"]["adopt"] and rows["mixed"]["wins"] == {"en": 2, "fr": 3}
    md = to_markdown(cells, [])
    assert "## Ideas that might close the gap" in md and "| **yes** |" in md
    assert "| default | 0,1,2 | 32.0 ± 2.0 | 22.0 ± 2.0 |" in md


def _gap_cell(method, seed, steps, own):
    c = _cell(method, seed, own, [99.0, 99.0])
    c["config"]["train"]["steps"] = steps
    c["train"]["steps"] = steps
    if method == "dense+memories":
        c["ppl"] = {d: {"backbone": {"test": {"ppl": o, "tokens": 8160}}} for d, o in zip(["en", "fr"], own)}
    return c


def test_gap_table_and_trend_from_paired_cells(tmp_path):
    from koff.experiments import gap

    # koff's gap halves every 4x tokens (b = 0.5): 1.4 at 300 steps, 1.2 at 1,200, 1.141 at 2,400
    cells = [_gap_cell("dense+memories", s, n, [30.0, 20.0]) for s in (0, 1, 2) for n in (300,)]
    cells += [_gap_cell("dense+memories", 0, n, [30.0, 20.0]) for n in (1200, 2400)]
    cells += [_gap_cell("koff", s, 300, [30.0 * 1.4, 20.0 * 1.4]) for s in (0, 1, 2)]
    cells += [_gap_cell("koff", 0, 1200, [30.0 * 1.2, 20.0 * 1.2]),
              _gap_cell("koff", 0, 2400, [30.0 * (1 + 0.2 / 2 ** 0.5), 20.0 * (1 + 0.2 / 2 ** 0.5)])]
    lines, numbers = gap.section(cells, "koff compare configs/gap.yaml")
    md = "\n".join(lines)
    assert "| koff | 300 | 0.15 M | 0,1,2 | 1.400 ± 0.000 | 1.400 ± 0.000 | 1.400 ± 0.000 |" in md
    assert "| koff | 1,200 | 0.61 M | 0 | 1.200 | 1.200 | 1.200 |" in md
    tr = numbers["trends"]["en"]
    assert tr["b"] == pytest.approx(0.5, abs=1e-6)
    # ratio - 1 = 0.4 at 153,600 tokens, halving every 4x: 0.1 at 16x (2.46 M), 0.05 at 64x
    assert tr["tokens_at_1.10"] == pytest.approx(153600 * 16, rel=1e-6)
    assert tr["tokens_at_1.05"] == pytest.approx(153600 * 64, rel=1e-6)
    # the plot draws the trend over koff's points even when the one-shot baseline has none yet
    assert gap.plot(cells, tmp_path, "caption").stat().st_size > 0


def test_gap_lists_a_cell_measured_before_its_reference():
    from koff.experiments import gap

    cells = [_gap_cell("dense+memories", 0, 300, [30.0, 20.0]), _gap_cell("koff", 0, 300, [36.0, 22.0]),
             _gap_cell("koff", 0, 2400, [33.0, 21.0])]
    cells[-1]["id"] = "koff__steps=2400__seed0"
    assert [c["id"] for c in gap.awaiting_reference(cells)] == ["koff__steps=2400__seed0"]
    md = "\n".join(gap.section(cells, "koff compare configs/gap.yaml")[0])
    assert "| koff | 2,400 |" not in md  # no ratio without dense + memories at 2,400 steps
    assert ("koff at 2,400 steps, seed 0, own-memory PPL en 33.00, fr 21.00. Its ratio and trend point wait "
            "for `koff compare configs/gap.yaml --only dense+memories__steps=2400__seed0`") in md


def test_gap_trend_says_when_it_may_be_flat():
    from koff.experiments.gap import fit_trend

    tr = fit_trend("en", [(1e5, 1.30), (1e5, 1.25), (4e5, 1.31), (8e5, 1.24)])
    assert tr.b_low <= 0  # no decrease the data can tell apart from noise
    assert fit_trend("en", [(1e5, 1.3), (4e5, 1.2)]) is None  # two points: nothing to fit an interval to


def test_gap_trend_interval_turns_about_the_points_not_the_intercept():
    from koff.experiments.gap import fit_trend

    pts = [(153600, 1.48), (153600, 1.45), (614400, 1.44)]
    tr = fit_trend("en", pts)
    fast, mid = tr.tokens_at(1.10, tr.b_high), tr.tokens_at(1.10)
    assert tr.b_high > tr.b > 0
    # every slope in the interval still meets 1.10 past the measured points, the steepest first
    assert 614400 < fast < mid
    assert tr.tokens_at(1.10) == pytest.approx((tr.a / 0.10) ** (1 / tr.b), rel=1e-9)


def test_report_opens_with_the_gap_section_and_keeps_the_previous_default(tmp_path, cells):
    for sub, cs in (("", cells), ("gap", [_gap_cell("dense+memories", 0, 300, [30.0, 20.0]),
                                          _gap_cell("koff", 0, 300, [36.0, 22.0])]),
                    ("projection", [_cell("koff", 0, [40.0, 30.0], [80.0, 90.0])])):
        folder = tmp_path / sub / "cells" if sub else tmp_path / "cells"
        folder.mkdir(parents=True)
        for c in cs:
            if sub == "projection":
                c["config"]["train"].update(controller="projection", reg_memory="domain")
            (folder / f"{c['id']}.json").write_text(json.dumps(c))
    md = report(tmp_path).read_text()
    assert md.index("## The gap to dense + memories against training length") < md.index("## Main table")
    assert "| koff | 300 | 0.15 M | 0 | 1.200 | 1.100 | 1.150 |" in md
    assert "| en | 1 | no fit: it needs at least 3 points, all above 1, at 2 or more lengths |" in md
    assert "## The previous default recipe (controller projection, reg_memory domain)" in md
    assert "| koff | 0 | 40.0 | 30.0 | 35.0 |" in md
    assert (tmp_path / "gap" / "gap.json").is_file()

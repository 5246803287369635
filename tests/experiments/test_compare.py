import json

import pytest
import yaml
from conftest import tiny_config_dict, uninterrupted_cell

from koff.cli import main
from koff.core.errors import ConfigError
from koff.experiments.compare import expand, load_grid


def test_grid_expansion(grid):
    path, _ = grid
    cells = expand(load_grid(path))
    ids = [c.id for c in cells]
    assert ids == ["dense__seed0", "wanda-sp__seed0", "wanda-sp+lora__seed0", "koff__seed0", "wanda-sp+lora__seed1",
                   "koff__seed1", "koff__target_sparsity=0.5__seed0", "wanda-sp__target_sparsity=0.5__seed0"]
    koff1 = next(c for c in cells if c.id == "koff__seed1")
    assert koff1.config["train"]["seed"] == 1 and koff1.config["reference"] is False


def test_compare_runs_resumes_and_reports(grid):
    path, tmp = grid
    assert main(["compare", str(path), "--limit", "3"]) == 0
    done = sorted(p.stem for p in (tmp / "results" / "cells").glob("*.json"))
    assert done == ["dense__seed0", "wanda-sp+lora__seed0", "wanda-sp__seed0"]
    before = {p.name: p.read_bytes() for p in (tmp / "results" / "cells").glob("*.json")}
    assert main(["compare", str(path)]) == 0  # fills the rest, leaves finished cells alone
    after = {p.name: p.read_bytes() for p in (tmp / "results" / "cells").glob("*.json")}
    assert len(after) == 8 and all(after[k] == v for k, v in before.items())
    koff = json.loads((tmp / "results" / "cells" / "koff__seed0.json").read_text())
    assert koff["train"]["tokens"] == 3 * 2 * 16 and koff["swap"]["memories"] == ["en", "fr", "general"]
    assert set(koff["ppl"]["en"]) == {"own", "backbone", "default"} and koff["tasks"]["arc_challenge"]["items"] == 4
    assert len(koff["curves"]["expected_sparsity"]) == 3
    wanda = json.loads((tmp / "results" / "cells" / "wanda-sp__seed0.json").read_text())
    assert wanda["train"]["tokens"] == 0 and set(wanda["ppl"]["en"]) == {"backbone"}
    trained = (tmp / "work" / "koff__seed0" / "backbone" / "mask.safetensors").stat().st_mtime_ns
    (tmp / "results" / "cells" / "koff__seed0.json").unlink()  # re-evaluating a cell reuses its trained run
    assert main(["compare", str(path), "--only", "koff__seed0"]) == 0
    assert (tmp / "work" / "koff__seed0" / "backbone" / "mask.safetensors").stat().st_mtime_ns == trained
    again = json.loads((tmp / "results" / "cells" / "koff__seed0.json").read_text())
    assert again["ppl"] == koff["ppl"]
    assert main(["report", str(tmp / "results")]) == 0
    md = (tmp / "results" / "report.md").read_text()
    assert "| koff | 0,1 |" in md and "## Sweep: sparsity" in md
    assert (tmp / "results" / "swap_matrix.png").is_file() and (tmp / "results" / "training_curves.png").is_file()


def test_grid_errors(tmp_path):
    (tmp_path / "g.yaml").write_text("methods: {}\n")
    with pytest.raises(ConfigError, match="'base' must be a mapping"):
        load_grid(tmp_path / "g.yaml")
    (tmp_path / "g.yaml").write_text("base: {}\nmethods: {a: {}}\nsweeps: {s: {methods: [b], settings: [{}]}}\n")
    with pytest.raises(ConfigError, match="unknown method 'b'"):
        expand(load_grid(tmp_path / "g.yaml"))


def test_a_finished_run_counts_when_its_config_predates_a_new_default_field(tmp_path, llama_folder, data_files):
    """compare reuses a trained cell run if its config.yaml parses to the same config, even when
    written before fields with defaults were added; a changed value is not reused."""
    import yaml

    from koff.config.recipe import config_from_dict, dump_config
    from koff.experiments.compare import finished_run

    run = tmp_path / "cell"
    run.mkdir()
    cfg = config_from_dict(tiny_config_dict(llama_folder, data_files, run, steps=3))
    (run / "koff.json").write_text("{}")
    old = yaml.safe_load(dump_config(cfg))
    for key in ("grad_accum", "gradient_checkpointing", "dtype", "backbone_lora_rank"):  # what an older koff wrote
        del old["train"][key]
    old["train"]["checkpoint_every"] = 5  # how often it was checkpointed changes nothing
    (run / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    assert finished_run(run, cfg)
    del old["train"]["reg_memory"]  # before the field existed, koff trained the way 'domain' does: not today's default
    (run / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    assert not finished_run(run, cfg)
    old["train"]["reg_memory"] = "general"
    old["train"]["steps"] = 4
    (run / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    assert not finished_run(run, cfg)


def test_a_grid_extends_another_and_keeps_its_cell_ids(grid, tmp_path):
    path, _ = grid
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"extends": path.name, "name": "long", "results": str(tmp_path / "r2"),
                                     "methods": ["koff"], "seeds": [0],
                                     "sweeps": {"length": {"methods": ["koff"], "settings": [{"train": {"steps": 9}}]}}}))
    parent = {c.id: c for c in expand(load_grid(path))}
    cells = expand(load_grid(child))
    assert [c.id for c in cells] == ["koff__seed0", "koff__steps=9__seed0"]
    assert cells[0].config == parent["koff__seed0"].config  # the same cell: compare reuses its trained run
    assert cells[1].config["train"]["steps"] == 9
    child.write_text(yaml.safe_dump({"extends": path.name, "methods": ["nope"]}))
    with pytest.raises(ConfigError, match=r"methods \['nope'\] are not methods of"):
        load_grid(child)


def test_a_mapping_valued_setting_gets_a_readable_cell_id(grid):
    path, _ = grid
    spec = load_grid(path)
    spec["sweeps"] = {"dbl": {"methods": ["koff"], "settings": [
        {"train": {"domain_sampling": "dynamic", "dbl_reference": {"en": 3.5, "fr": 3.1}}}]}}
    ids = [c.id for c in expand(spec)]
    assert "koff__dbl_reference=en-3.5+fr-3.1,domain_sampling=dynamic__seed0" in ids


def test_a_cell_with_a_default_memory_scores_it_and_gives_it_the_tasks(grid):
    """With train.reg_memory: general the cell scores the default memory on every language, and the
    task columns hold what a request naming no domain gets: the default memory, not the bare backbone."""
    from koff.evaluation.tasks import score_task
    from koff.storage.run_dir import build_model, load_run

    path, tmp = grid
    spec = yaml.safe_load(path.read_text())
    spec["sweeps"] = {"reg_memory": {"methods": ["koff"], "settings": [{"train": {"reg_memory": "general"}}]}}
    spec["seeds"] = [0]
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["compare", str(path), "--only", "reg_memory=general"]) == 0
    cell = json.loads((tmp / "results" / "cells" / "koff__reg_memory=general__seed0.json").read_text())
    assert cell["default_memory"] == "general"
    assert set(cell["ppl"]["en"]) == {"own", "backbone", "default"}
    assert cell["ppl"]["en"]["default"]["test"]["ppl"] != cell["ppl"]["en"]["backbone"]["test"]["ppl"]
    km, tok = build_model(load_run(tmp / "work" / "koff__reg_memory=general__seed0"))
    assert cell["tasks"]["arc_challenge"] == score_task(km, tok, "arc_challenge", memory="general", max_items=4)


def test_a_worker_stopped_by_sigterm_saves_its_cell_and_the_next_run_resumes_it_exactly(grid, monkeypatch):
    path, tmp = grid
    want = uninterrupted_cell(path, "koff__seed0")
    monkeypatch.setenv("KOFF_FAULT", "train.step.0:term")  # a scheduler's SIGTERM during the first step
    assert main(["compare", str(path), "--cell", "koff__seed0", "koff__seed1"]) == 75
    assert not (tmp / "results" / "cells" / "koff__seed0.json").exists()
    assert (tmp / "work" / "koff__seed0.partial" / "checkpoint").is_dir()
    monkeypatch.delenv("KOFF_FAULT")
    assert main(["compare", str(path), "--cell", "koff__seed0"]) == 0
    got = json.loads((tmp / "results" / "cells" / "koff__seed0.json").read_text())
    assert got["ppl"] == want["ppl"] and got["curves"] == want["curves"]

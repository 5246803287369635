"""koff evaluate: the run's own test splits, test files it was not trained with (`--test`), the
default memory a request naming no domain gets, and general-ability tasks."""

import json

import pytest
from conftest import corpus, tiny_config_dict

from koff.cli import main
from koff.config.recipe import config_from_dict
from koff.evaluation.perplexity import EvalSettings, evaluate_run
from koff.training.pipeline import decompose

SMALL = dict(block=32, max_tokens=256)


@pytest.fixture(scope="module")
def general_run(llama_folder, data_files, tmp_path_factory):
    """A tiny run whose regularization steps train a memory of their own (reg_memory: general)."""
    out = tmp_path_factory.mktemp("general") / "run"
    d = tiny_config_dict(llama_folder, data_files, out, steps=8, reg_every=2, reg_memory="general")
    d["reference"] = False
    decompose(config_from_dict(d), progress=False)
    return out


def test_reg_memory_general_trains_a_default_memory(general_run):
    manifest = json.loads((general_run / "koff.json").read_text())
    assert manifest["default_memory"] == "general"
    assert sorted(p.name for p in (general_run / "memories").iterdir()) == ["en", "fr", "general"]
    rows = [json.loads(x) for x in (general_run / "metrics.jsonl").read_text().splitlines()]
    assert {r["memory"] for r in rows if r["kind"] == "general"} == {"general"}
    assert "general" not in {r["memory"] for r in rows if r["kind"] == "domain"}


def test_reg_memory_none_trains_the_bare_backbone(llama_folder, data_files, tmp_path):
    d = tiny_config_dict(llama_folder, data_files, tmp_path / "r", steps=8, reg_every=2, reg_memory="none")
    d["reference"] = False
    decompose(config_from_dict(d), progress=False)
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert {r["memory"] for r in rows if r["kind"] == "general"} == {None}
    assert json.loads((tmp_path / "r" / "koff.json").read_text())["default_memory"] is None


def test_default_memory_row_and_tasks(general_run):
    result = evaluate_run(general_run, EvalSettings(**SMALL, tasks={"arc_challenge": 4}), progress=False, write=False)
    row = result["rows"]["backbone + default memory (general)"]
    assert set(row) == {"en", "fr"}
    swap = dict(zip(result["swap"]["memories"], result["swap"]["test"]))
    assert [row[d]["test"]["ppl"] for d in ("en", "fr")] == swap["general"]
    arc = result["tasks"]["arc_challenge"]
    assert set(arc) == {"dense", "backbone", "backbone + default memory (general)"}
    assert all(v["items"] == 4 and 0 <= v["acc_norm"] <= 1 for v in arc.values())


def test_test_files_it_was_not_trained_with(general_run, tmp_path):
    de = tmp_path / "de.txt"
    de.write_text("\n".join(corpus("de", 20, 7)) + "\n")
    result = evaluate_run(general_run, EvalSettings(**SMALL, tests={"de": [str(de)]}), progress=False, write=False)
    assert result["swap"]["domains"] == ["de"]
    assert set(result["swap"]["memories"]) == {"en", "fr", "general"}
    assert "backbone + own memory" not in result["rows"]  # no memory was trained for it
    assert set(result["rows"]) >= {"dense", "backbone"}
    # a domain's own name scores its memory on the new files
    own = evaluate_run(general_run, EvalSettings(**SMALL, tests={"fr": [str(de)]}), progress=False, write=False)
    fr_on_de = dict(zip(result["swap"]["memories"], result["swap"]["test"]))["fr"][0]
    assert own["rows"]["backbone + own memory"]["fr"]["test"]["ppl"] == pytest.approx(fr_on_de)


def test_cli_test_and_tasks_flags(general_run, tmp_path, capsys):
    other = tmp_path / "en2.txt"
    other.write_text("\n".join(corpus("en", 20, 9)) + "\n")
    rc = main(["evaluate", str(general_run), "--block", "32", "--max-tokens", "256", "--test", f"news={other}",
               "--tasks", "piqa=3", "--tag", "news"])
    assert rc == 0
    saved = json.loads((general_run / "eval" / "perplexity-news.json").read_text())
    assert saved["swap"]["domains"] == ["news"] and saved["tasks"]["piqa"]["dense"]["items"] == 3
    assert "General ability" in (general_run / "eval" / "perplexity-news.md").read_text()
    assert main(["evaluate", str(general_run), "--test", f"x={tmp_path / 'missing.txt'}"]) == 2
    assert "does not exist" in capsys.readouterr().err

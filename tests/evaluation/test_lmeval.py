"""lm-evaluation-harness runs a koff run through its own task pipeline (local task YAMLs over the
bundled ARC-Challenge / PIQA files) and gets koff's own scores on the same questions."""

import pytest

lm_eval = pytest.importorskip("lm_eval")

from conftest import tiny_config_dict  # noqa: E402

from koff.config.recipe import config_from_dict  # noqa: E402
from koff.evaluation.lmeval import evaluate  # noqa: E402
from koff.evaluation.tasks import score_task  # noqa: E402
from koff.storage.run_dir import build_model, load_run  # noqa: E402
from koff.training.pipeline import decompose  # noqa: E402


@pytest.fixture(scope="module")
def run(llama_folder, data_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("lmeval") / "run"
    d = tiny_config_dict(llama_folder, data_files, out, steps=4)
    d["reference"] = False
    decompose(config_from_dict(d), progress=False)
    return out


@pytest.mark.parametrize("memory", ["fr", None])
def test_lm_eval_accuracy_equals_koffs_scorer(run, memory, tmp_path):
    n = 12
    result = evaluate(run, ["arc_challenge_koff", "piqa_koff"], memory=memory, limit=n, include=tmp_path / "tasks")
    km, tok = build_model(load_run(run))
    for task, ours in (("arc_challenge_koff", "arc_challenge"), ("piqa_koff", "piqa")):
        theirs = result["results"][task]
        mine = score_task(km, tok, ours, memory=memory, max_items=n)
        assert theirs["acc,none"] == pytest.approx(mine["acc"], abs=1e-9), task
        assert theirs["acc_norm,none"] == pytest.approx(mine["acc_norm"], abs=1e-9), task
    assert result["config"]["model"] == "koff"


def test_cli(run, capsys):
    from koff.cli import main

    assert main(["lm-eval", str(run), "--memory", "en", "--tasks", "piqa_koff", "--limit", "4"]) == 0
    out = capsys.readouterr().out
    assert "piqa_koff" in out and "acc_norm" in out
    assert main(["lm-eval", str(run), "--memory", "de", "--tasks", "piqa_koff", "--limit", "4"]) == 2

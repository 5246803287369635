import hashlib

import pytest
from conftest import tiny_config_dict, write_domain_files

from koff.cli import main
from koff.config.recipe import config_from_dict
from koff.core.errors import ConfigError
from koff.data.text import Domain
from koff.evaluation.perplexity import EvalSettings, evaluate_run
from koff.storage.run_dir import load_run
from koff.training.pipeline import add_domain, decompose


def _hashes(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_add_domain_keeps_every_existing_byte(llama_folder, data_files, tmp_path):
    run = tmp_path / "run"
    decompose(config_from_dict(tiny_config_dict(llama_folder, data_files, run, steps=4)), progress=False)
    before = _hashes(run)
    de = write_domain_files(tmp_path / "de-data", langs=("de",))["de"]
    assert main(["add-domain", str(run), "--name", "de", "--train", str(de["train"]), "--test", str(de["test"]),
                 "--steps", "3"]) == 0
    after = _hashes(run)
    assert {k: v for k, v in after.items() if k in before} == before
    added = sorted(set(after) - set(before))
    assert "memories/de/memory.json" in added and "reference/memories/de/memory.json" in added
    assert all(k.startswith(("memories/de/", "reference/memories/de/")) for k in added)
    loaded = load_run(run)
    assert sorted(loaded.memories) == ["de", "en", "fr", "general"] and loaded.domains == ["en", "fr"]
    assert loaded.memories["de"].info["added_after"] is True

    result = evaluate_run(run, EvalSettings(block=16, max_tokens=64), progress=False)
    assert result["swap"]["domains"] == ["en", "fr", "de"]
    assert result["swap"]["memories"] == ["en", "fr", "de", "general"]
    assert all(x is not None for row in result["swap"]["test"] for x in row)  # new row and column filled
    assert "de" in result["rows"]["dense + memories"] and "de" in result["rows"]["backbone + own memory"]

    with pytest.raises(ConfigError, match="exists already"):
        add_domain(run, Domain("de", train=[de["train"]]), steps=1, progress=False)
    assert _hashes(run) == {**after, **{k: v for k, v in _hashes(run).items() if k.startswith("eval/")}}


def test_add_domain_with_a_moved_base_model_writes_only_inside_the_run(llama_folder, data_files, tmp_path,
                                                                         monkeypatch):
    """The base model moved: `--model` names its new folder. The memory's metrics are staged in the
    run itself: nothing is written to the system's temporary folder."""
    import json
    import shutil
    import tempfile

    run = tmp_path / "run"
    cfg = config_from_dict(tiny_config_dict(llama_folder, data_files, run, steps=2))
    cfg.reference = False
    decompose(cfg, progress=False)
    moved = tmp_path / "moved-model"
    shutil.copytree(llama_folder, moved)
    m = json.loads((run / "koff.json").read_text())
    m["base_model"]["source"] = str(tmp_path / "gone")
    (run / "koff.json").write_text(json.dumps(m))
    sys_tmp = tmp_path / "system-tmp"
    sys_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(sys_tmp))
    before = _hashes(run)
    de = write_domain_files(tmp_path / "de-data", langs=("de",))["de"]
    args = ["add-domain", str(run), "--name", "de", "--train", str(de["train"]), "--steps", "1"]
    assert main(args) == 2  # the recorded base model is gone ...
    assert main(args + ["--model", str(moved)]) == 0  # ... and --model points to where it went
    assert {k: v for k, v in _hashes(run).items() if k in before} == before
    assert load_run(run).memories["de"].meta.added_after
    assert list(sys_tmp.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["de-data", "moved-model", "run", "system-tmp"]

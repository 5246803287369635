import hashlib

import pytest

from koff.artifact import load_run
from koff.cli import main
from koff.config import ConfigError, config_from_dict
from koff.data import Domain
from koff.evaluate import EvalSettings, evaluate_run
from koff.train import add_domain, decompose

from conftest import tiny_config_dict, write_domain_files


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
    assert sorted(loaded.memories) == ["de", "en", "fr"] and loaded.domains == ["en", "fr"]
    assert loaded.memories["de"].info["added_after"] is True

    result = evaluate_run(run, EvalSettings(block=16, max_tokens=64), progress=False)
    assert result["swap"]["domains"] == ["en", "fr", "de"]
    assert result["swap"]["memories"] == ["en", "fr", "de"]
    assert all(x is not None for row in result["swap"]["test"] for x in row)  # new row and column filled
    assert "de" in result["rows"]["dense + memories"] and "de" in result["rows"]["backbone + own memory"]

    with pytest.raises(ConfigError, match="exists already"):
        add_domain(run, Domain("de", train=[de["train"]]), steps=1, progress=False)
    assert _hashes(run) == {**after, **{k: v for k, v in _hashes(run).items() if k.startswith("eval/")}}

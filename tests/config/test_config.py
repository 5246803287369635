import pytest
import yaml
from conftest import tiny_config_dict

from koff.config.recipe import config_from_dict, dump_config, load_config
from koff.core.errors import ConfigError


def test_round_trip_through_yaml(llama_folder, data_files, tmp_path):
    cfg = config_from_dict(tiny_config_dict(llama_folder, data_files, tmp_path / "r"))
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    again = load_config(tmp_path / "c.yaml")
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(colour="red"), r"unknown field\(s\) \['colour'\]"),
    (lambda d: d.pop("domains"), "missing 'domains'"),
    (lambda d: d["train"].update(steps="ten"), r"train.steps: expected a number, got 'ten'"),
    (lambda d: d["train"].update(steps=2.5), r"train.steps: expected an integer"),
    (lambda d: d["train"].update(controller="pid"), "train.controller must be one of"),
    (lambda d: d["train"].update(reg_every=1), "reg_every must be 0"),
    (lambda d: d["train"].update(lr_gate=0.1), r"train: unknown field\(s\) \['lr_gate'\]"),
    (lambda d: d["memory"].update(kv_tokens=-1), "must be >= 0"),
    (lambda d: d.update(target_sparsity=1.0), r"target_sparsity must be in \[0, 1\)"),
    (lambda d: d.update(general="none"), "regularization steps need general data"),
    (lambda d: d["domains"]["en"].update(train=["/no/such/file.txt"]), "domains.en.train: file /no/such/file.txt does not exist"),
    (lambda d: d["domains"]["en"].pop("train"), "domains.en: expected a mapping with a 'train' list"),
])
def test_config_errors_name_the_field(llama_folder, data_files, tmp_path, change, message):
    d = tiny_config_dict(llama_folder, data_files, tmp_path / "r")
    change(d)
    with pytest.raises(ConfigError, match=message):
        config_from_dict(d)


def test_bad_yaml_file(tmp_path):
    (tmp_path / "c.yaml").write_text("domains: [en\n")
    with pytest.raises(ConfigError, match="c.yaml: invalid YAML"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_data_paths_are_stored_absolute(llama_folder, data_files, tmp_path, monkeypatch):
    """Relative data paths (a relative KOFF_DATA, relative files in a config) are recorded
    absolute, so the run keeps working from any working directory."""
    from koff.data.text import bundled_domain, data_root
    from koff.evaluation.perplexity import EvalSettings, evaluate_run
    from koff.training.pipeline import decompose

    shared = tmp_path / "shared"
    (shared / "text" / "en").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KOFF_DATA", "shared")
    assert data_root() == shared and bundled_domain("en").train == [shared / "text" / "en" / "train.txt"]

    monkeypatch.chdir(data_files["en"]["train"].parents[1])
    d = tiny_config_dict(llama_folder, data_files, tmp_path / "run", steps=2)
    d["domains"] = {"en": {"train": ["en/train.txt"], "test": ["en/test.txt"]},
                    "fr": {"train": ["fr/train.txt"], "test": ["fr/test.txt"]}}
    d["general"] = ["general.jsonl"]
    d["reference"] = False
    cfg = config_from_dict(d)
    assert cfg.domains[0].train == [data_files["en"]["train"]] and cfg.general[0].is_absolute()
    decompose(cfg, progress=False)
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["domains"]["en"]["train"] == [str(data_files["en"]["train"])]
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = evaluate_run(tmp_path / "run", EvalSettings(block=16, max_tokens=32), progress=False)
    assert result["tokens"]["en"]["test"] == 30

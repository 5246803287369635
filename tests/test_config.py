import pytest

from koff.config import ConfigError, config_from_dict, dump_config, load_config

from conftest import tiny_config_dict


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

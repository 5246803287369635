import json

import yaml

from koff.cli import main


def test_decompose_and_evaluate_from_the_command_line(llama_folder, data_files, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["decompose", "--model", str(llama_folder),
            "--train", f"en={data_files['en']['train']}", "--test", f"en={data_files['en']['test']}",
            "--train", f"fr={data_files['fr']['train']}", "--test", f"fr={data_files['fr']['test']}",
            "--general", str(data_files["general"]["train"]), "--sparsity", "0.25", "--steps", "6",
            "--batch-size", "2", "--seq-len", "16", "--lora-rank", "2", "--kv-tokens", "3", "-o", str(out)]
    assert main(args) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["memory"]["lora_rank"] == 2 and cfg["train"]["steps"] == 6 and cfg["target_sparsity"] == 0.25
    assert main(["evaluate", str(out), "--block", "16", "--max-tokens", "64"]) == 0
    result = json.loads((out / "eval" / "perplexity.json").read_text())
    assert set(result["rows"]) == {"dense", "dense + memories", "backbone", "backbone + own memory",
                                   "backbone + default memory (general)"}
    assert result["swap"]["memories"] == ["en", "fr", "general"] and len(result["swap"]["test"]) == 3
    assert result["tokens"]["en"]["test"] == 4 * 15
    for row in result["rows"].values():
        for d in ("en", "fr"):
            assert row[d]["test"]["ppl"] > 1
    assert result["rows"]["backbone + own memory"]["fr"] == {"test": {"ppl": result["swap"]["test"][1][1], "tokens": 60}}
    md = (out / "eval" / "perplexity.md").read_text()
    assert "| backbone + own memory |" in md and "Swap matrix" in md
    printed = capsys.readouterr().out
    assert "swap matrix" in printed


def test_config_file_and_flag_override(llama_folder, data_files, tmp_path):
    from conftest import tiny_config_dict

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_config_dict(llama_folder, data_files, tmp_path / "r")))
    assert main(["decompose", "--config", str(tmp_path / "c.yaml"), "--steps", "3", "--no-reference"]) == 0
    cfg = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert cfg["train"]["steps"] == 3 and cfg["reference"] is False
    assert not (tmp_path / "r" / "reference").exists()


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("domains: [en]\ntrain: {steps: -1}\n")
    assert main(["decompose", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "train.steps" in capsys.readouterr().err

"""`koff export RUN OUT --format ... --outtype ...` on the command line."""

from koff.cli import main

from export_helpers import make_run, write_byte_level_model


def test_export_formats_from_the_command_line(tmp_path, data_files, capsys):
    folder = write_byte_level_model(tmp_path / "model")
    run = make_run(tmp_path, folder, data_files, steps=2)
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    assert "(hf)" in capsys.readouterr().out and (tmp_path / "hf" / "modeling_koff.py").is_file()
    assert main(["export", str(run), str(tmp_path / "g"), "--format", "gguf", "--outtype", "q8_0"]) == 0
    printed = capsys.readouterr().out
    assert "(gguf q8_0)" in printed and "fr (lora)" in printed
    assert (tmp_path / "g" / "model.gguf").is_file() and (tmp_path / "g" / "memories" / "fr" / "lora.gguf").is_file()
    assert main(["export", str(run), str(tmp_path / "v"), "--format", "vllm"]) == 0
    assert "vllm serve" in capsys.readouterr().out


def test_export_errors_are_one_line(tmp_path, llama_folder, data_files, capsys):
    run = make_run(tmp_path, llama_folder, data_files, steps=2)
    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "o"), "--outtype", "f16"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("koff:")]
    assert len(err) == 1 and "--outtype applies to --format gguf only" in err[0]
    assert main(["export", str(run), str(tmp_path / "o"), "--format", "gguf"]) == 2  # whitespace tokenizer
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("koff:")]
    assert len(err) == 1 and "llama.cpp" in err[0] and "tokenizer.json" in err[0]
    assert not (tmp_path / "o").exists()

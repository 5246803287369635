"""`koff export RUN OUT --format ... --outtype ...` on the command line."""

from export_helpers import make_run, write_byte_level_model

from koff.cli import main


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


def test_export_in_bfloat16(tmp_path, llama_folder, data_files, capsys):
    """--dtype bfloat16 stores the backbone in bfloat16 (half the bytes); it loads with remote code
    and its logits stay close to the float32 export's; --dtype with a GGUF is refused."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run = make_run(tmp_path, llama_folder, data_files, steps=2)
    assert main(["export", str(run), str(tmp_path / "f32")]) == 0
    assert main(["export", str(run), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    weights = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    x = torch.randint(3, 60, (1, 12))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(tmp_path / "f32", trust_remote_code=True)(input_ids=x).logits
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", trust_remote_code=True,
                                                 dtype=torch.float32)(input_ids=x).logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "g"), "--format", "gguf", "--dtype", "bfloat16"]) == 2
    assert "--outtype" in capsys.readouterr().err

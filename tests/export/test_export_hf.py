"""`koff export --format hf`: plain transformers (trust_remote_code) + peft load the folder and
reproduce koff's masked backbone, its LoRA half, and its full memory (LoRA merged + CARTRIDGE)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, write_model_folder
from export_helpers import koff_logits, koff_lora_only, make_run, max_abs

from koff.export import export_run, load_backbone
from koff.storage.run_dir import build_model, load_run

TOL = 1e-4  # float32 throughout: the folder holds the same numbers koff multiplies, minus zeros


def _load(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()


def _x():
    return torch.randint(3, 60, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=ARCHS)
def exported(request, tmp_path_factory, data_files):
    root = tmp_path_factory.mktemp(f"hf-{request.param}")
    folder = write_model_folder(root / "model", request.param, seed=2)
    run = make_run(root, folder, data_files)
    export_run(run, root / "out")
    return run, root / "out"


def test_loads_with_trust_remote_code_and_matches_backbone(exported):
    run_dir, out = exported
    model = _load(out)
    assert type(model).__name__ == "KoffForCausalLM"
    run = load_run(run_dir)
    assert [layer.mlp.gate_proj.out_features for layer in model.model.layers] == [int(k.sum()) for k in run.keep]
    assert [layer.mlp.down_proj.in_features for layer in model.model.layers] == [int(k.sum()) for k in run.keep]
    km, _ = build_model(run)
    x = _x()
    with torch.no_grad():
        got = model(input_ids=x).logits
    want = koff_logits(km, x)
    assert max_abs(got, want) <= TOL
    # the test can fail: the dense base model differs from the masked one by much more
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(run.manifest["base_model"]["source"], dtype=torch.float32)
    with torch.no_grad():
        assert max_abs(dense(input_ids=x).logits, want) > 100 * TOL


def test_lora_memory_loads_with_peft(exported):
    from peft import PeftModel

    run_dir, out = exported
    peft_model = PeftModel.from_pretrained(_load(out), out / "memories" / "fr").eval()
    km, _ = koff_lora_only(run_dir, "fr")
    x = _x()
    with torch.no_grad():
        got = peft_model(input_ids=x).logits
    want = koff_logits(km, x, "fr")
    assert max_abs(got, want) <= TOL
    assert max_abs(got, koff_logits(build_model(load_run(run_dir), memories=[])[0], x)) > 100 * TOL


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")  # peft 0.21's CARTRIDGE passes the old name
def test_full_memory_as_lora_merged_then_cartridge(exported):
    """The whole memory with peft alone: merge the LoRA into the backbone, then put the KV half on
    top as a CARTRIDGE adapter (peft cannot hold both in one PeftModel, docs/design.md §2)."""
    from peft import PeftModel

    run_dir, out = exported
    merged = PeftModel.from_pretrained(_load(out), out / "memories" / "fr").merge_and_unload()
    full = PeftModel.from_pretrained(merged, out / "memories" / "fr" / "kv").eval()
    km, _ = build_model(load_run(run_dir))
    x = _x()
    with torch.no_grad():
        got = full(input_ids=x).logits
    want = koff_logits(km, x, "fr")
    assert max_abs(got, want) <= TOL
    lora_only, _ = koff_lora_only(run_dir, "fr")
    assert max_abs(got, koff_logits(lora_only, x, "fr")) > 100 * TOL  # the KV half changes the logits


def test_plain_from_pretrained_without_remote_code_refuses(exported):
    """Without trust_remote_code transformers builds the base family at full width and fails on
    the FFN shapes rather than loading a wrong model."""
    from transformers import AutoModelForCausalLM

    _, out = exported
    with pytest.raises(Exception, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(out)


def test_folder_layout_and_manifest(exported):
    run_dir, out = exported
    cfg = json.loads((out / "config.json").read_text())
    m = json.loads((out / "koff_backbone.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_koff.KoffForCausalLM"
    assert cfg["koff_intermediate_sizes"] == m["intermediate_sizes"]
    assert "per_layer_config" not in cfg  # transformers' modeling refuses it (docs/design.md §1)
    assert m["export_format"] == "hf" and m["format_version"] == 2
    assert {"configuration_koff.py", "modeling_koff.py"} <= set(m["files"])
    assert m["memories"]["fr"]["carries"] == ["lora", "kv"]
    base_cfg = json.loads((Path(load_run(run_dir).manifest["base_model"]["source"]) / "config.json").read_text())
    assert cfg["model_type"] == base_cfg["model_type"]
    assert f'BASE_MODEL_TYPE = "{base_cfg["model_type"]}"' in (out / "configuration_koff.py").read_text()


def test_load_backbone_reads_the_new_folder_without_remote_code(exported):
    run_dir, out = exported
    small, _ = load_backbone(out)
    assert "Koff" not in type(small).__name__
    x = _x()
    with torch.no_grad():
        assert max_abs(small(input_ids=x).logits, koff_logits(build_model(load_run(run_dir))[0], x)) <= TOL


def test_flap_bias_is_carried(tmp_path, llama_folder, data_files):
    run = make_run(tmp_path, llama_folder, data_files, steps=2, top={"mask": "flap"}, mask_scope="layer")
    assert load_run(run).bias is not None
    export_run(run, tmp_path / "out")
    model = _load(tmp_path / "out")
    assert all(layer.mlp.down_proj.bias is not None for layer in model.model.layers)
    km, _ = build_model(load_run(run))
    x = _x()
    with torch.no_grad():
        assert max_abs(model(input_ids=x).logits, koff_logits(km, x)) <= TOL

"""`train.backbone_lora_rank`: a LoRA on the backbone, shared by every memory, trained on every
step, stored in RUN/backbone as a peft adapter and folded into the exported backbone."""

import json

import pytest
import torch
from export_helpers import koff_logits, make_run, max_abs

from koff.core.errors import ArtifactError
from koff.export import export_run
from koff.storage.run_dir import build_model, load_run


def _x():
    return torch.randint(3, 60, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, llama_folder, data_files):
    root = tmp_path_factory.mktemp("bblora")
    with_adapter = make_run(root / "a", llama_folder, data_files, steps=6, backbone_lora_rank=4)
    without = make_run(root / "b", llama_folder, data_files, steps=6)
    return with_adapter, without


def test_trained_stored_and_loaded(runs):
    run_dir, _ = runs
    run = load_run(run_dir)
    assert {"backbone/adapter_config.json", "backbone/adapter_model.safetensors"} <= set(run.meta.files)
    cfg = json.loads((run_dir / "backbone" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    b = [t for k, t in run.backbone_lora.tensors.items() if k.endswith("lora_B.weight")]
    assert any(float(t.abs().max()) > 0 for t in b), "B starts at 0: trained, it must have moved"
    km, _ = build_model(run)
    assert km.backbone_lora is not None and "backbone" not in km.memory_names
    assert not any(p.requires_grad for p in km.backbone_lora.parameters())


def test_active_on_the_backbone_not_on_the_dense_model(runs):
    run_dir, _ = runs
    km, _ = build_model(load_run(run_dir))
    x = _x()
    with torch.no_grad():
        with_bb = km(x, memory="en")
        dense = km(x, memory=None, use_gates=False)
        adapter, km.backbone_lora = km.backbone_lora, None
        without_bb = km(x, memory="en")
        dense_plain = km(x, memory=None, use_gates=False)
        km.backbone_lora = adapter
    assert max_abs(with_bb, without_bb) > 1e-3  # it changes every backbone call ...
    assert max_abs(dense, dense_plain) == 0  # ... and never the dense base model


def test_export_folds_it_into_the_backbone(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir, _ = runs
    export_run(run_dir, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True,
                                                 dtype=torch.float32).eval()
    km, _ = build_model(load_run(run_dir))
    x = _x()
    with torch.no_grad():
        got = model(input_ids=x).logits
    assert max_abs(got, koff_logits(km, x)) <= 1e-4
    km.backbone_lora = None  # the test can fail: without the fold the export would be far off
    assert max_abs(got, koff_logits(km, x)) > 1e-2


def test_missing_adapter_file_is_refused(runs, tmp_path):
    import shutil

    run_dir, _ = runs
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "backbone" / "adapter_model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="adapter_model.safetensors"):
        load_run(copy)


def test_a_run_without_it_has_no_adapter_files(runs):
    _, run_dir = runs
    run = load_run(run_dir)
    assert run.backbone_lora is None and not (run_dir / "backbone" / "adapter_config.json").exists()

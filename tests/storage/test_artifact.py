import json
import shutil

import pytest
import torch
from conftest import tiny_config_dict
from safetensors.torch import load_file, save_file

from koff.config.recipe import config_from_dict
from koff.core.atomic import atomic_output
from koff.core.errors import ArtifactError
from koff.core.files import sha256_file
from koff.storage.run_dir import build_model, load_run
from koff.training.pipeline import decompose, train_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, llama_folder, data_files):
    """A tiny run on disk plus the in-memory model that wrote it."""
    out = tmp_path_factory.mktemp("run") / "r"
    out.mkdir()
    cfg = config_from_dict(tiny_config_dict(llama_folder, data_files, out, steps=6))
    km = train_run(cfg, out, progress=False)
    return out, km


def _copy(run, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst


def _rewrite_manifest(run, change):
    m = json.loads((run / "koff.json").read_text())
    change(m)
    (run / "koff.json").write_text(json.dumps(m))


def test_round_trip_gives_identical_outputs(trained):
    run_dir, km = trained
    loaded, _ = build_model(load_run(run_dir))
    x = torch.randint(3, 60, (2, 12))
    with torch.no_grad():
        for memory in (None, "en", "fr"):
            torch.testing.assert_close(loaded(x, memory=memory), km(x, memory=memory), atol=0, rtol=0)
        loaded.gates.mode = km.gates.mode = "off"
        torch.testing.assert_close(loaded(x), km(x), atol=0, rtol=0)


def test_artifact_layout(trained):
    run_dir, _ = trained
    m = json.loads((run_dir / "koff.json").read_text())
    assert m["format"] == "koff.run" and m["format_version"] == 1
    assert m["base_model"]["fingerprint"].startswith("sha256:")
    assert set(m["files"]) == {"config.yaml", "metrics.jsonl", "backbone/mask.safetensors", "backbone/gates.safetensors"}
    for name in ("en", "fr"):
        mem = json.loads((run_dir / "memories" / name / "memory.json").read_text())
        assert set(mem["files"]) == {"adapter_config.json", "adapter_model.safetensors", "kv.safetensors"}
        assert mem["kv"]["shape"] == [2, 2, 4, 8]
    for p in run_dir.rglob("*"):
        assert p.suffix not in (".bin", ".pt", ".pkl", ".pth")


def test_missing_run(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_run(tmp_path / "nope")
    for bad in (None, "", 5):
        with pytest.raises(ArtifactError, match="must be a path"):
            load_run(bad)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(format="other"), "field 'format' must be 'koff.run'"),
    (lambda m: m.update(format_version=99), "newer koff"),
    (lambda m: m.pop("target_sparsity"), "missing field 'target_sparsity'"),
    (lambda m: m.update(target_sparsity="0.2"), "field 'target_sparsity' must be int or float"),
    (lambda m: m.update(target_sparsity=1.5), r"target_sparsity must be in \[0, 1\)"),
    (lambda m: m.update(pruned="yes"), "field 'pruned' must be bool"),
    (lambda m: m["base_model"].update(fingerprint="abc"), "must start with 'sha256:'"),
    (lambda m: m["base_model"].update(intermediate_sizes=[48]), "intermediate_sizes"),
    (lambda m: m.update(domains=["en", "fr", "xx"]), r"\['xx'\] are listed in koff.json but have no memories"),
])
def test_bad_manifest_fields(trained, tmp_path, change, message):
    run = _copy(trained[0], tmp_path)
    _rewrite_manifest(run, change)
    with pytest.raises(ArtifactError, match=message):
        load_run(run)


def test_invalid_json(trained, tmp_path):
    run = _copy(trained[0], tmp_path)
    (run / "koff.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="koff.json: not valid JSON"):
        load_run(run)


def test_changed_file_is_detected(trained, tmp_path):
    run = _copy(trained[0], tmp_path)
    (run / "config.yaml").write_text("tampered: true\n")
    with pytest.raises(ArtifactError, match="config.yaml: contents changed"):
        load_run(run)


def test_mask_of_wrong_shape(trained, tmp_path):
    run = _copy(trained[0], tmp_path)
    path = run / "backbone" / "mask.safetensors"
    t = load_file(str(path))
    t["layers.1.keep"] = torch.ones(40, dtype=torch.uint8)
    save_file(t, str(path))
    _rewrite_manifest(run, lambda m: m["files"].update({"backbone/mask.safetensors": sha256_file(path)}))
    with pytest.raises(ArtifactError, match=r"mask.safetensors: tensor 'layers.1.keep' has shape \[40\], expected \[48\]"):
        load_run(run)


def test_mask_with_non_binary_values(trained, tmp_path):
    run = _copy(trained[0], tmp_path)
    path = run / "backbone" / "mask.safetensors"
    t = load_file(str(path))
    t["layers.0.keep"][0] = 7
    save_file(t, str(path))
    _rewrite_manifest(run, lambda m: m["files"].update({"backbone/mask.safetensors": sha256_file(path)}))
    with pytest.raises(ArtifactError, match="values other than 0/1"):
        load_run(run)


def _rewrite_memory_file(run, name, fname, tensors):
    path = run / "memories" / name / fname
    save_file(tensors, str(path))
    mj = run / "memories" / name / "memory.json"
    mem = json.loads(mj.read_text())
    mem["files"][fname] = sha256_file(path)
    mj.write_text(json.dumps(mem))


def test_kv_of_wrong_shape(trained, tmp_path):
    run = _copy(trained[0], tmp_path)
    bad = torch.zeros(2, 2, 4, 5)
    _rewrite_memory_file(run, "fr", "kv.safetensors", {"keys": bad, "values": bad.clone()})
    with pytest.raises(ArtifactError, match=r"fr/kv.safetensors: KV tensors have shape \[2, 2, 4, 5\], "
                                            r"but koff.json's base model .* needs \[2, 2, 4, 8\]"):
        load_run(run)


def test_lora_of_wrong_shape(trained, tmp_path):
    run = _copy(trained[0], tmp_path)
    path = run / "memories" / "en" / "adapter_model.safetensors"
    t = load_file(str(path))
    key = next(k for k in t if "q_proj.lora_A" in k)
    t[key] = torch.zeros(4, 31)
    _rewrite_memory_file(run, "en", "adapter_model.safetensors", t)
    with pytest.raises(ArtifactError, match=r"LoRA on '.*q_proj' has A \[4, 31\] and B \[32, 4\], expected \[4, 32\]"):
        build_model(load_run(run))


def test_truncated_safetensors(trained, tmp_path):
    run = _copy(trained[0], tmp_path)
    path = run / "memories" / "en" / "kv.safetensors"
    path.write_bytes(path.read_bytes()[:20])
    mj = run / "memories" / "en" / "memory.json"
    mem = json.loads(mj.read_text())
    mem["files"]["kv.safetensors"] = sha256_file(path)
    mj.write_text(json.dumps(mem))
    with pytest.raises(ArtifactError, match="kv.safetensors: not a readable safetensors file"):
        load_run(run)


def test_memory_name_mismatch(trained, tmp_path):
    run = _copy(trained[0], tmp_path)
    mj = run / "memories" / "en" / "memory.json"
    mem = json.loads(mj.read_text())
    mem["name"] = "fr"
    mj.write_text(json.dumps(mem))
    with pytest.raises(ArtifactError, match="field 'name' is 'fr' but the folder is 'en'"):
        load_run(run)


def test_other_base_model_is_refused(trained, qwen_folder):
    with pytest.raises(ArtifactError, match="only fit the exact base model"):
        build_model(load_run(trained[0]), model=str(qwen_folder))


def test_failed_write_keeps_existing_artifact(tmp_path):
    final = tmp_path / "run"
    final.mkdir()
    old, new = '{"format": "koff.run", "v": "old"}', '{"format": "koff.run", "v": "new"}'
    (final / "koff.json").write_text(old)
    with pytest.raises(RuntimeError), atomic_output(final, overwrite=True) as tmp:
        (tmp / "koff.json").write_text(new)
        raise RuntimeError("crash mid-write")
    assert (final / "koff.json").read_text() == old
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    with atomic_output(final, overwrite=True) as tmp:
        (tmp / "koff.json").write_text(new)
    assert (final / "koff.json").read_text() == new
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_failed_decompose_leaves_nothing(llama_folder, data_files, tmp_path):
    d = tiny_config_dict(llama_folder, data_files, tmp_path / "r")
    d["domains"]["en"]["train"] = [str(data_files["en"]["test"])]  # test text as training: refused
    with pytest.raises(ValueError, match="same content as test file"):
        decompose(config_from_dict(d), progress=False)
    assert not (tmp_path / "r").exists()

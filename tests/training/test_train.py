import json

import pytest
import torch
from conftest import tiny_config_dict

from koff.config.recipe import config_from_dict
from koff.training.pipeline import decompose, train_run


def _base_state(km):
    return {n: p.detach().clone() for n, p in km.model.named_parameters()}


def test_training_changes_only_gates_and_memories(llama_folder, data_files, tmp_path):
    from koff.model.base_model import load_base

    cfg = config_from_dict(tiny_config_dict(llama_folder, data_files, tmp_path / "r"))
    before, _, _ = load_base(str(llama_folder))
    before = {n: p.detach().clone() for n, p in before.named_parameters()}
    out = tmp_path / "r"
    out.mkdir()
    km = train_run(cfg, out, progress=False)
    after = _base_state(km)
    assert set(after) == set(before)
    for n, p in after.items():
        assert torch.equal(p, before[n]), f"base weight {n} changed"
    # the gates and every memory moved away from their initial values
    la = torch.cat([p.detach().flatten() for p in km.gates.log_alpha])
    assert la.std() > 0
    for name in ("en", "fr"):
        assert any(p.abs().sum() > 0 for p in km.parts["lora"].adapters[name].lora_B)


def test_projection_lands_on_target_every_step(qwen_folder, data_files, tmp_path):
    cfg = config_from_dict(tiny_config_dict(qwen_folder, data_files, tmp_path / "r", steps=12, warmup_frac=0.5,
                                            consolidate_frac=0.25, controller="projection"))
    decompose(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    for r in rows:
        assert {"step", "loss", "target", "expected_sparsity", "domain", "memory", "kind", "phase"} <= set(r)
        assert abs(r["expected_sparsity"] - r["target"]) < 1e-3, r
    assert rows[5]["target"] == pytest.approx(0.25) and rows[4]["target"] < 0.25
    assert [r["kind"] for r in rows[:4]] == ["domain", "domain", "domain", "general"]
    assert [r["domain"] for r in rows[:3]] == ["en", "fr", "en"]
    assert all(r["phase"] == "consolidate" for r in rows[9:])
    manifest = json.loads((tmp_path / "r" / "koff.json").read_text())
    assert manifest["sparsity"]["ffn"] == pytest.approx(0.25, abs=1 / 96)
    assert manifest["sparsity"]["removed_neurons"] == 24


def test_lagrangian_multiplier_pushes_sparsity_up(llama_folder, data_files, tmp_path):
    cfg = config_from_dict(tiny_config_dict(llama_folder, data_files, tmp_path / "r", steps=12, controller="lagrangian",
                                            lr_lambda=5.0, warmup_frac=0.0, consolidate_frac=0.0, gate_init="constant",
                                            lr_gates=0.5))
    cfg.reference = False
    decompose(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["lambda1"] < 0  # ascent: below target, the multiplier turns negative ...
    assert rows[-1]["expected_sparsity"] > rows[0]["expected_sparsity"] + 0.02  # ... and pushes s_hat up


def test_same_seed_same_run(llama_folder, data_files, tmp_path):
    outs = []
    for i in range(2):
        cfg = config_from_dict(tiny_config_dict(llama_folder, data_files, tmp_path / f"r{i}", steps=5))
        cfg.reference = False
        decompose(cfg, progress=False)
        outs.append(tmp_path / f"r{i}")
    for rel in ("backbone/gates.safetensors", "backbone/mask.safetensors", "memories/en/adapter_model.safetensors",
                "memories/fr/kv.safetensors"):
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel
    cfg = config_from_dict(tiny_config_dict(llama_folder, data_files, tmp_path / "r2", steps=5, seed=1))
    cfg.reference = False
    decompose(cfg, progress=False)
    assert (outs[0] / "backbone/gates.safetensors").read_bytes() != (tmp_path / "r2/backbone/gates.safetensors").read_bytes()


def test_decompose_writes_reference_and_refuses_existing_output(llama_folder, data_files, tmp_path):
    cfg = config_from_dict(tiny_config_dict(llama_folder, data_files, tmp_path / "r", steps=4))
    decompose(cfg, progress=False)
    ref = json.loads((tmp_path / "r" / "reference" / "koff.json").read_text())
    assert ref["pruned"] is False and ref["target_sparsity"] == 0.0
    before = (tmp_path / "r" / "koff.json").read_bytes()
    from koff.core.errors import ArtifactError

    with pytest.raises(ArtifactError, match="already exists"):
        decompose(cfg, progress=False)
    assert (tmp_path / "r" / "koff.json").read_bytes() == before


@pytest.mark.parametrize("kind", ["lora", "kv", "none"])
def test_memory_variants(llama_folder, data_files, tmp_path, kind):
    d = tiny_config_dict(llama_folder, data_files, tmp_path / "r", steps=4)
    d["memory"] = {"lora": {"lora_rank": 4, "kv_tokens": 0}, "kv": {"lora_rank": 0, "kv_tokens": 4},
                   "none": {"lora_rank": 0, "kv_tokens": 0}}[kind]
    cfg = config_from_dict(d)
    decompose(cfg, progress=False)
    files = {p.name for p in (tmp_path / "r").rglob("*") if p.is_file()}
    assert ("adapter_model.safetensors" in files) == (kind == "lora")
    assert ("kv.safetensors" in files) == (kind == "kv")
    assert (tmp_path / "r" / "reference").exists() == (kind != "none")


def test_distillation_from_the_reference(llama_folder, data_files, tmp_path):
    cfg = config_from_dict(tiny_config_dict(llama_folder, data_files, tmp_path / "r", steps=3, distill=0.5))
    decompose(cfg, progress=False)
    assert (tmp_path / "r" / "reference" / "koff.json").is_file()
    plain = config_from_dict(tiny_config_dict(llama_folder, data_files, tmp_path / "p", steps=3))
    decompose(plain, progress=False)
    # the reference is the same; the distilled student is not
    assert ((tmp_path / "r/reference/memories/en/kv.safetensors").read_bytes()
            == (tmp_path / "p/reference/memories/en/kv.safetensors").read_bytes())
    assert ((tmp_path / "r/memories/en/kv.safetensors").read_bytes()
            != (tmp_path / "p/memories/en/kv.safetensors").read_bytes())
    cfg = config_from_dict(tiny_config_dict(llama_folder, data_files, tmp_path / "r2", steps=3, distill=0.5))
    cfg.reference = False
    with pytest.raises(ValueError, match="distill from the reference needs the dense"):
        decompose(cfg, progress=False)


def test_a_diverged_run_is_refused_not_written(llama_folder, data_files, tmp_path):
    """Huge learning rates blow the memories up: koff stops with an error naming the learning
    rates, and no run (nor a temporary folder) is left."""
    from koff.core.errors import ConfigError

    cfg = config_from_dict(tiny_config_dict(llama_folder, data_files, tmp_path / "r", steps=6, lr_lora=1e30,
                                            lr_kv=1e30, lr_gates=1e30))
    cfg.reference = False
    with pytest.raises(ConfigError, match="diverged.*lr_"):
        decompose(cfg, progress=False)
    assert list(tmp_path.iterdir()) == []

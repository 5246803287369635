"""An interrupted run resumes exactly: the result is byte-identical to an uninterrupted one."""

import pytest
import yaml
from conftest import tiny_config_dict

import koff.training.loop as trainer
from koff.config.recipe import config_from_dict
from koff.core.errors import ArtifactError
from koff.training.pipeline import decompose

FILES = ("backbone/gates.safetensors", "backbone/mask.safetensors", "memories/en/adapter_model.safetensors",
         "memories/fr/kv.safetensors", "reference/memories/en/kv.safetensors", "metrics.jsonl")


@pytest.mark.parametrize("controller", ["projection", "lagrangian"])
def test_interrupted_run_resumes_exactly(controller, llama_folder, data_files, tmp_path, monkeypatch):
    def cfg(out):
        return config_from_dict(tiny_config_dict(llama_folder, data_files, out, langs=("en", "fr", "es"), steps=10,
                                                 checkpoint_every=3, controller=controller, reg_every=2,
                                                 consolidate_frac=0.2))

    decompose(cfg(tmp_path / "straight"), progress=False)

    # crash the main run at its step 5, while gates still sample (checkpoint after step 2; a random
    # memory was drawn for the general step 1); the reference's 10 steps come first
    real_loss = trainer.lm_loss
    calls = {"n": 0}

    def crashing_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10 + 6:
            raise KeyboardInterrupt("simulated crash")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(trainer, "lm_loss", crashing_loss)
    with pytest.raises(KeyboardInterrupt):
        decompose(cfg(tmp_path / "resumed"), progress=False)
    partial = tmp_path / "resumed.partial"
    assert (partial / "checkpoint" / "state.json").is_file() and not (tmp_path / "resumed").exists()
    with pytest.raises(ArtifactError, match="pass --resume"):
        decompose(cfg(tmp_path / "resumed"), progress=False)
    monkeypatch.setattr(trainer, "lm_loss", real_loss)
    marker = partial / ".koff-partial.yaml"  # as a koff without the newer, defaulted fields wrote it
    old = yaml.safe_load(marker.read_text())
    for key in ("grad_accum", "gradient_checkpointing", "dtype", "distill_from", "domain_sampling", "dbl_reference",
                "target_schedule", "backbone_lora_rank"):
        del old["train"][key]
    without_reg_memory = {**old, "train": {k: v for k, v in old["train"].items() if k != "reg_memory"}}
    marker.write_text(yaml.safe_dump(without_reg_memory, sort_keys=False))
    # written before train.reg_memory existed, the run trained the way 'domain' does now, not today's default
    with pytest.raises(ArtifactError, match="another configuration"):
        decompose(cfg(tmp_path / "resumed"), progress=False, resume=True)
    marker.write_text(yaml.safe_dump(old, sort_keys=False))
    decompose(cfg(tmp_path / "resumed"), progress=False, resume=True)
    assert not partial.exists()
    for f in FILES:
        a = (tmp_path / "straight" / f).read_bytes()
        b = (tmp_path / "resumed" / f).read_bytes()
        if f == "metrics.jsonl":  # wall-clock seconds differ
            import json

            strip = lambda data: [{k: v for k, v in json.loads(x).items() if k != "seconds"}
                                  for x in data.decode().splitlines()]
            assert strip(a) == strip(b)
        else:
            assert a == b, f


def test_resume_refuses_another_config(llama_folder, data_files, tmp_path):
    d = tiny_config_dict(llama_folder, data_files, tmp_path / "r", steps=4, checkpoint_every=2)
    (tmp_path / "r.partial").mkdir()
    (tmp_path / "r.partial" / ".koff-partial.yaml").write_text("something else")
    with pytest.raises(ArtifactError, match="another configuration"):
        decompose(config_from_dict(d), progress=False, resume=True)
    changed = dict(d, train={**d["train"], "steps": 5})  # a changed value is another configuration
    (tmp_path / "r.partial" / ".koff-partial.yaml").write_text(yaml.safe_dump(changed))
    with pytest.raises(ArtifactError, match="another configuration"):
        decompose(config_from_dict(d), progress=False, resume=True)

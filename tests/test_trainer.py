"""The trainer restructuring kept behaviour: fixed-seed tiny runs reproduce the loss sequence,
memory choice, expected sparsity and final mask recorded with the trainer before it
(tests/data/pinned_runs.json, written by the pre-restructuring `train.offload`)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from koff.config import config_from_dict
from koff.train import decompose

from conftest import tiny_config_dict, write_domain_files, write_model_folder

PINNED = json.loads((Path(__file__).parent / "data" / "pinned_runs.json").read_text())


@pytest.fixture(scope="module")
def pin_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pin")
    return write_model_folder(root / "model", "llama"), write_domain_files(root / "data"), root


@pytest.mark.parametrize("controller", ["projection", "lagrangian"])
def test_fixed_seed_run_matches_the_pinned_run(controller, pin_inputs, tmp_path):
    model, data, _ = pin_inputs
    torch.manual_seed(0)
    d = tiny_config_dict(model, data, tmp_path / "run", langs=("en", "fr"), steps=12, controller=controller,
                         reg_every=3, warmup_frac=0.25, consolidate_frac=0.25)
    cfg = config_from_dict(d)
    cfg.reference = False
    decompose(cfg, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    want = PINNED[controller]
    assert [r["memory"] for r in rows] == want["memory"]
    assert [r["loss"] for r in rows] == pytest.approx(want["loss"], rel=1e-6, abs=1e-6)
    assert [r["expected_sparsity"] for r in rows] == pytest.approx(want["expected_sparsity"], abs=1e-6)
    mask = load_file(str(tmp_path / "run" / "backbone" / "mask.safetensors"))
    assert {k: v.tolist() for k, v in sorted(mask.items())} == want["mask"]

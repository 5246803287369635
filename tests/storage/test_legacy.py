"""A run and an export written by an earlier koff (tests/fixtures/legacy-0.1, made by
tests/fixtures/make_legacy_fixture.py on 2026-12-06, before the package was split into layers) still
load, validate and give the same logits."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from koff import build_model, load_backbone, load_run

LEGACY = Path(__file__).parents[1] / "fixtures" / "legacy-0.1"


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    root = tmp_path_factory.mktemp("legacy")
    shutil.copytree(LEGACY, root / "legacy")  # the fixture itself is never written to
    return root / "legacy", load_file(str(LEGACY / "logits.safetensors"))


def test_the_run_loads_and_gives_the_recorded_logits(legacy):
    folder, want = legacy
    run = load_run(folder / "run")
    assert sorted(run.memories) == ["en", "fr", "general"] and run.meta.default_memory == "general"
    km, _ = build_model(run, model=str(folder / "model"))  # the recorded source was a temporary folder
    x = want["input_ids"]
    with torch.no_grad():
        for memory, key in (("en", "run_en"), ("general", "run_general"), (None, "run_backbone")):
            assert torch.allclose(km(x, memory=memory), want[key], atol=1e-5), key


def test_the_export_loads_and_gives_the_recorded_logits(legacy):
    folder, want = legacy
    small, _ = load_backbone(folder / "export")
    with torch.no_grad():
        got = small(input_ids=want["input_ids"]).logits
    assert torch.allclose(got, want["export_backbone"], atol=1e-5)

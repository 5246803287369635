"""Data-parallel training (torchrun / accelerate launch, gloo on CPU) computes the same run as one
process with the same global batch, and resumes under it; gradient accumulation likewise."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config_dict
from safetensors.torch import load_file

from koff.config.recipe import config_from_dict
from koff.training.pipeline import decompose

TENSORS = ("backbone/gates.safetensors", "memories/en/adapter_model.safetensors", "memories/fr/kv.safetensors",
           "memories/fr/adapter_model.safetensors")


def _cfg(llama_folder, data_files, out: Path, **train) -> dict:
    d = tiny_config_dict(llama_folder, data_files, out, steps=10, batch_size=4, reg_every=3, warmup_frac=0.3,
                         consolidate_frac=0.2, **train)
    d["reference"] = False
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cfg: dict, tmp: Path, procs: int = 2, extra: list[str] = (), env: dict | None = None) -> subprocess.CompletedProcess:
    path = tmp / f"cfg-{cfg['output'].rsplit('/', 1)[-1]}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", f"--master_port={_free_port()}",
           "-m", "koff", "decompose", "--config", str(path), "--device", "cpu", *extra]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2] / "src"),
                **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=600)


def _same_run(a: Path, b: Path) -> None:
    ka, kb = load_file(str(a / "backbone/mask.safetensors")), load_file(str(b / "backbone/mask.safetensors"))
    assert all(torch.equal(ka[k], kb[k]) for k in ka), "final masks differ"
    for rel in TENSORS:
        ta, tb = load_file(str(a / rel)), load_file(str(b / rel))
        assert set(ta) == set(tb)
        for k in ta:
            torch.testing.assert_close(tb[k], ta[k], atol=1e-5, rtol=0, msg=f"{rel} {k}")


@pytest.fixture(scope="module")
def single(llama_folder, data_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    decompose(config_from_dict(_cfg(llama_folder, data_files, out)), progress=False)
    return out


def test_two_processes_equal_one(single, llama_folder, data_files, tmp_path):
    out = tmp_path / "ddp"
    done = _launch(_cfg(llama_folder, data_files, out), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # only the main process reports (and writes)
    _same_run(single, out)
    import json

    manifest = json.loads((out / "koff.json").read_text())
    assert manifest["runtime"]["world_size"] == 2
    assert manifest["metrics"]["global_batch"] == 4 and manifest["metrics"]["micro_batch"] == 2
    a = [json.loads(x)["loss"] for x in (single / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert b == pytest.approx(a, abs=1e-5)  # the logged loss is the global batch's


def test_two_processes_with_the_base_sharded(single, llama_folder, data_files, tmp_path):
    """FSDP: each frozen decoder layer sharded over both processes, gates and memories whole."""
    out = tmp_path / "fsdp"
    done = _launch(_cfg(llama_folder, data_files, out), tmp_path, extra=["--fsdp"])
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    assert json.loads((out / "koff.json").read_text())["runtime"]["fsdp"] is True
    _same_run(single, out)


def test_two_processes_resume_after_a_stop(single, llama_folder, data_files, tmp_path):
    cfg = _cfg(llama_folder, data_files, tmp_path / "ddp", checkpoint_every=3)
    stopped = _launch(cfg, tmp_path, env={"KOFF_FAULT": "train.step.6"})  # dies after the checkpoint of step 5
    assert stopped.returncode != 0 and not (tmp_path / "ddp").exists()
    assert (tmp_path / "ddp.partial" / "checkpoint" / "state.json").is_file()
    resumed = _launch(cfg, tmp_path, extra=["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_run(single, tmp_path / "ddp")


def test_two_processes_with_the_lagrangian_and_accumulation(llama_folder, data_files, tmp_path):
    """The multipliers (outside the data-parallel wrapper) stay identical on every rank, and two
    processes x two micro-batches of 1 row compute the one-process update of 4 rows."""
    one = tmp_path / "one"
    decompose(config_from_dict(_cfg(llama_folder, data_files, one, controller="lagrangian", lr_lambda=5.0)),
              progress=False)
    out = tmp_path / "ddp"
    done = _launch(_cfg(llama_folder, data_files, out, controller="lagrangian", lr_lambda=5.0, grad_accum=2), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    _same_run(one, out)


def test_gradient_accumulation_equals_the_whole_batch(single, llama_folder, data_files, tmp_path):
    out = tmp_path / "accum"
    decompose(config_from_dict(_cfg(llama_folder, data_files, out, grad_accum=2)), progress=False)
    _same_run(single, out)
    out4 = tmp_path / "accum4"
    decompose(config_from_dict(_cfg(llama_folder, data_files, out4, grad_accum=4, gradient_checkpointing=True)),
              progress=False)
    _same_run(single, out4)

"""A grid on a cluster: submitit jobs (local executor; SLURM's sbatch faked), per-cell commands,
and a preempted job requeued by submitit that resumes its cell exactly (koff.experiments.cluster)."""

import json
import shlex
import stat

import pytest
import yaml
from conftest import uninterrupted_cell

from koff.cli import main
from koff.core.errors import ConfigError

pytest.importorskip("submitit", reason="the cluster executor needs submitit: pip install -e '.[test]'")


def _cells(tmp):
    return {p.stem: json.loads(p.read_text()) for p in (tmp / "results" / "cells").glob("*.json")}


def _ppl(cell):
    return {d: {k: v["test"]["ppl"] for k, v in rows.items()} for d, rows in cell["ppl"].items()}


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """`srun` and `sbatch` as a SLURM login node has them; sbatch records the scripts it was given."""
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncat "$1" >> {tmp_path}/submitted.txt\necho "Submitted batch job 4242"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return tmp_path / "submitted.txt"


def test_commands_print_one_line_per_missing_cell_and_each_runs_exactly_that_cell(grid, capsys):
    path, tmp = grid
    assert main(["compare", str(path), "--commands", "--checkpoint-every", "2", "--only", "seed1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"koff compare {path} --cell {c} --checkpoint-every 2" for c in ("wanda-sp+lora__seed1", "koff__seed1")]
    argv = shlex.split(lines[1])
    assert main(argv[1:]) == 0
    assert sorted(_cells(tmp)) == ["koff__seed1"]
    capsys.readouterr()
    assert main(["compare", str(path), "--commands", "--only", "seed1"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"koff compare {path} --cell wanda-sp+lora__seed1"]
    assert main(["compare", str(path), "--cell", "koff__seed9"]) == 2
    assert "no cell has the id 'koff__seed9'" in capsys.readouterr().err


def test_a_preempted_local_job_is_requeued_and_its_cell_equals_an_uninterrupted_run(grid, monkeypatch, capsys):
    path, tmp = grid
    reference = uninterrupted_cell(path, "koff__seed0")

    monkeypatch.setenv("KOFF_FAULT", "train.step.1:usr2")  # submitit's preemption notice, after step 1 of 3
    assert main(["compare", str(path), "--executor", "local", "--cell", "koff__seed0", "dense__seed0",
                 "--cluster-param", "timeout_min=30"]) == 0
    out = capsys.readouterr().out
    assert "ran job" in out and "koff__seed0" in out and "dense__seed0" in out
    cells = _cells(tmp)
    assert sorted(cells) == ["dense__seed0", "koff__seed0"]
    logs = "".join(p.read_text(errors="replace") for p in (tmp / "results" / "jobs").rglob("*_log.*"))
    assert "SIGUSR2 received" in logs and "Requeued" in logs  # stopped by koff, then requeued by submitit
    assert _ppl(cells["koff__seed0"]) == _ppl(reference)
    assert cells["koff__seed0"]["curves"] == reference["curves"]
    assert not list((tmp / "results" / "cells").glob("*.lock"))


def test_slurm_jobs_are_submitted_with_the_grids_and_the_flags_parameters(grid, fake_slurm, capsys):
    path, tmp = grid
    spec = yaml.safe_load(path.read_text())
    spec["cluster"] = {"timeout_min": 240, "slurm_partition": "cpu", "cpus_per_task": 4}
    path.write_text(yaml.safe_dump(spec))
    assert main(["compare", str(path), "--executor", "slurm", "--cell", "koff__seed0",
                 "--cluster-param", "slurm_partition=gpu", "--cluster-param", "gpus_per_node=1"]) == 0
    assert "submitted job 4242: koff__seed0" in capsys.readouterr().out
    script = fake_slurm.read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=240", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --signal=USR2@120", "#SBATCH --job-name=koff-tiny"):
        assert line in script, (line, script)
    assert "submitit.core._submit" in script
    assert not _cells(tmp)  # nothing ran here


def test_an_unknown_cluster_parameter_names_the_grid_and_the_valid_ones(grid, fake_slurm):
    from koff.experiments.cluster import submit

    path, _ = grid
    spec = yaml.safe_load(path.read_text())
    spec["cluster"] = {"slurm_partitoin": "gpu"}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"grid.yaml: cluster \(or --cluster-param\): .*partitoin.*Valid arguments"):
        submit(path, "slurm", ids=["koff__seed0"])
    spec["cluster"] = {"tasks_per_node": 4}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="a cell job runs one process"):
        submit(path, "slurm", ids=["koff__seed0"])
    spec["cluster"] = ["gpu"]
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="'cluster' must be a mapping"):
        submit(path, "local")

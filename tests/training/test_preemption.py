"""SIGTERM / SIGUSR1 during decompose and add-domain: the step in flight finishes, a checkpoint is
written, koff exits 75, and the same command with `--resume auto` gives the uninterrupted run's
bytes. In a 2-process launch the signal reaching one rank stops both at the same step.

The signal is sent by the process to itself at an exact step (`KOFF_FAULT=train.step.N:term`), so
the test does not depend on timing; one test also sends a real SIGTERM from outside at whatever
step the run has reached.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml
from conftest import _metrics, assert_same_run, tiny_config_dict, write_domain_files
from koff_process import _child, _context, koff
from test_distributed import _launch

from koff.cli import main
from koff.training.preemption import EXIT_PREEMPTED


def _write_cfg(tmp: Path, llama_folder, data, name: str, steps: int = 10, reference: bool = False, **train) -> Path:
    train = {"reg_every": 3, "consolidate_frac": 0.2, **train}
    d = tiny_config_dict(llama_folder, data, tmp / name, steps=steps, **train)
    d["reference"] = reference
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _next_step(checkpoint: Path) -> int:
    from koff.storage.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint)["loop"]["step"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, llama_folder):
    root = tmp_path_factory.mktemp("preempt")
    data = write_domain_files(root / "data", langs=("en", "fr"))
    return root, data


@pytest.fixture(scope="module")
def straight(setup, llama_folder):
    root, data = setup
    cfg = _write_cfg(root, llama_folder, data, "straight")
    assert main(["decompose", "--config", str(cfg), "--device", "cpu"]) == 0
    return root / "straight"


@pytest.mark.parametrize("fault", ["train.step.0:term", "train.step.4:term", "train.step.7:usr1"])
def test_signal_checkpoints_and_resume_auto_is_bitwise(fault, setup, straight, llama_folder, tmp_path):
    _, data = setup
    cfg = _write_cfg(tmp_path, llama_folder, data, "run")
    argv = ["decompose", "--config", cfg, "--device", "cpu", "--resume", "auto"]
    code, log = koff(argv, tmp_path / "logs" / "1.txt", fault)
    step = int(fault.split(".")[2].split(":")[0])
    assert code == EXIT_PREEMPTED, log
    assert "received: finishing the current step" in log and f"after step {step} of 10" in log, log
    assert "Traceback" not in log
    partial = tmp_path / "run.partial"
    assert not (tmp_path / "run").exists()
    assert _next_step(partial / "checkpoint") == step + 1  # the state after step N: N + 1 runs next
    assert len((partial / "metrics.jsonl").read_text().splitlines()) == step + 1
    code, log = koff(argv, tmp_path / "logs" / "2.txt")  # the requeued job: the very same command line
    assert code == 0, log
    assert not partial.exists()
    assert_same_run(straight, tmp_path / "run")
    code, log = koff(argv, tmp_path / "logs" / "3.txt")  # requeued once more after it finished: nothing to do
    assert code == 0 and "already complete" in log, log


def test_signal_during_the_reference_and_plain_resume(setup, llama_folder, tmp_path):
    """With a reference (trained first) and train.checkpoint_every: the stop comes in the
    reference's training; `--resume` (the flag as before) continues it, then the run."""
    _, data = setup
    runs = {}
    for name, fault in (("a", None), ("b", "train.step.2:term")):
        cfg = _write_cfg(tmp_path, llama_folder, data, name, steps=6, checkpoint_every=4, reference=True)
        argv = ["decompose", "--config", cfg, "--device", "cpu"]
        code, log = koff(argv, tmp_path / "logs" / f"{name}1.txt", fault)
        if fault:
            assert code == EXIT_PREEMPTED and "reference" in log, log
            assert (tmp_path / "b.partial" / "reference" / "checkpoint" / "state.json").is_file()
            code, log = koff(argv, tmp_path / "logs" / f"{name}0.txt")
            assert code == 2 and "pass --resume" in log, log  # without --resume: refused, nothing lost
            code, log = koff([*argv, "--resume"], tmp_path / "logs" / f"{name}2.txt")
        assert code == 0, log
        runs[name] = tmp_path / name
    assert_same_run(runs["a"], runs["b"], reference=True)


def _child_held_at(argv: list[str], log: str, hold: str) -> None:
    """`_child`, holding at the fault point `hold` until a stop signal has arrived from outside
    (so the signal's moment is known without any timing: the run cannot get past it first)."""
    import koff.core.faults as faults
    from koff.training import preemption

    point = faults.point

    def held(name: str) -> None:
        if name == hold:
            while preemption.received() is None:
                time.sleep(0.01)
        point(name)

    faults.point = held
    _child(argv, None, log, None)


def test_real_sigterm_from_outside(setup, llama_folder, tmp_path):
    """A SIGTERM sent by another process (here: once 20 steps are logged; the child holds at that
    step boundary until the signal is there, so no timing decides where it lands) stops the run at
    that step; the resumed run is the uninterrupted one."""
    _, data = setup
    for name in ("whole", "cut"):
        _write_cfg(tmp_path, llama_folder, data, name, steps=300)
    argv = lambda name: ["decompose", "--config", str(tmp_path / f"{name}.yaml"), "--device", "cpu",
                         "--resume", "auto"]
    assert main(argv("whole")) == 0
    (tmp_path / "logs").mkdir()
    p = _context().Process(target=_child_held_at, args=(argv("cut"), str(tmp_path / "logs" / "cut.txt"),
                                                        "train.step.19"))
    p.start()
    metrics = tmp_path / "cut.partial" / "metrics.jsonl"
    while p.is_alive() and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 20):
        time.sleep(0.01)
    assert p.is_alive(), (tmp_path / "logs" / "cut.txt").read_text()
    os.kill(p.pid, signal.SIGTERM)
    p.join()
    log = (tmp_path / "logs" / "cut.txt").read_text()
    assert p.exitcode == EXIT_PREEMPTED, log
    assert len(metrics.read_text().splitlines()) == 20, log  # stopped right after step 19
    assert main(argv("cut")) == 0
    assert_same_run(tmp_path / "whole", tmp_path / "cut")


def test_signal_without_checkpointing_saves_nothing_and_says_so(setup, llama_folder, tmp_path):
    _, data = setup
    cfg = _write_cfg(tmp_path, llama_folder, data, "run")
    code, log = koff(["decompose", "--config", cfg, "--device", "cpu"], tmp_path / "logs" / "1.txt",
                     "train.step.3:term")
    assert code == 128 + signal.SIGTERM, log
    assert "nothing was saved" in log and "--resume auto" in log
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_add_domain_signal_and_resume(setup, straight, tmp_path):
    _, data = setup
    runs = {}
    for name, fault in (("a", None), ("b", "train.step.1:term")):
        run = tmp_path / name
        shutil.copytree(straight, run)
        argv = ["add-domain", run, "--name", "xx", "--train", data["en"]["train"], "--steps", "4", "--resume", "auto"]
        code, log = koff(argv, tmp_path / "logs" / f"{name}1.txt", fault)
        if fault:
            assert code == EXIT_PREEMPTED, log
            part = run / "memories" / ".xx.partial"
            assert (part / "checkpoint" / "state.json").is_file() and not (run / "memories" / "xx").exists()
            code, log = koff(argv[:-2], tmp_path / "logs" / f"{name}0.txt")
            assert code == 2 and "pass --resume" in log, log
            code, log = koff(argv, tmp_path / "logs" / f"{name}2.txt")
        assert code == 0, log
        assert not (run / "memories" / ".xx.partial").exists()
        runs[name] = run / "memories" / "xx"
    for f in ("adapter_model.safetensors", "kv.safetensors"):
        assert (runs["a"] / f).read_bytes() == (runs["b"] / f).read_bytes(), f
    assert _metrics(runs["a"] / "metrics.jsonl") == _metrics(runs["b"] / "metrics.jsonl")


@pytest.mark.parametrize("step, rank", [(3, 1), (6, 0)])
def test_two_processes_stop_together_and_resume_bitwise(step, rank, setup, llama_folder, tmp_path_factory):
    """The signal reaches one rank only; both stop after the same step (the flag is all-reduced),
    neither hangs, and `--resume auto` under 2 processes gives the uninterrupted 2-process run."""
    _, data = setup
    tmp = tmp_path_factory.mktemp(f"ddp{step}")
    cfgs = {}
    for name in ("whole", "cut"):
        d = tiny_config_dict(llama_folder, data, tmp / name, steps=10, batch_size=4, reg_every=3, consolidate_frac=0.2)
        d["reference"] = False
        cfgs[name] = d
    done = _launch(cfgs["whole"], tmp, extra=["--resume", "auto"])
    assert done.returncode == 0, done.stderr[-3000:]
    stopped = _launch(cfgs["cut"], tmp, extra=["--resume", "auto"],
                      env={"KOFF_FAULT": f"train.step.{step}:term", "KOFF_FAULT_RANK": str(rank)})
    assert stopped.returncode != 0  # torchrun reports its workers' failure as its own status 1 ...
    assert "exitcode  : 75" in stopped.stderr or "exitcode: 75" in stopped.stderr.replace("  ", " "), \
        stopped.stderr[-3000:]  # ... and names theirs: 75 (checkpointed), not a crash
    assert _next_step(tmp / "cut.partial" / "checkpoint") == step + 1
    assert len((tmp / "cut.partial" / "metrics.jsonl").read_text().splitlines()) == step + 1
    resumed = _launch(cfgs["cut"], tmp, extra=["--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp / "whole", tmp / "cut")

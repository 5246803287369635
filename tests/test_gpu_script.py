"""benchmarks/gpu.py, the one-command GPU check, runs end to end (on the CPU, tiny shapes), so it
works when a GPU session comes; without a GPU and without --smoke it exits 0 saying so."""

import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu.py"


def test_smoke_run_prints_a_row():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    row = next(line for line in out.stdout.splitlines() if line.startswith("smoke"))
    assert "→" in row and len(row.split()) >= 8


def test_without_a_gpu_it_says_so():
    if torch.cuda.is_available():
        return
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "no CUDA GPU" in out.stdout

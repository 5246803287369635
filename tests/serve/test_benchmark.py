"""benchmarks/serve.py runs end to end on the tiny run (small counts), so its numbers can be
reproduced on a real run with one command."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "serve.py"


def test_serve_benchmark_smoke(tiny_run, tmp_path):
    import koff

    env = {**os.environ, "PYTHONPATH": str(Path(koff.__file__).parents[1])}
    out = subprocess.run([sys.executable, str(SCRIPT), "--run", str(tiny_run.run), "--requests", "30",
                          "--ratio-requests", "6", "--max-tokens", "8", "--out", str(tmp_path / "r.json")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["5xx"] == 0
    assert sum(r["a"]["statuses"].values()) == 30 and r["a"]["statuses"].get("200", 0) >= 20
    assert all(k in ("200", "400", "404") for k in r["a"]["statuses"])
    for key in ("b", "c", "d"):
        assert r[key]["ratio"] > 0
    assert "(c)" in out.stdout and "ratio" in out.stdout

"""A tiny decomposed run (three memories, a chat template) and real `koff serve` processes on it,
listening on 127.0.0.1 at an ephemeral port."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import tiny_config_dict, tiny_model, tiny_tokenizer, write_domain_files

API_KEY = "test-key"
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


@dataclass
class TinyRun:
    run: Path
    """en / fr / es memories."""
    with_de: Path
    """A copy of `run` with a fourth memory, de, trained on the same backbone (koff add-domain)."""
    foreign: Path
    """A copy of `run` whose backbone mask differs (its memories belong to another backbone)."""
    export: Path
    """`run` exported (pruned backbone + sliced memories)."""
    model: Path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    import torch
    from safetensors.torch import load_file, save_file

    from koff.config.recipe import config_from_dict
    from koff.core.files import sha256_file
    from koff.data.text import Domain
    from koff.export import export_run
    from koff.training.pipeline import add_domain, decompose

    root = tmp_path_factory.mktemp("serve")
    model = root / "model"
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tiny_model("llama", 0, vocab=len(tok)).save_pretrained(model)
    tok.save_pretrained(model)
    data = write_domain_files(root / "data", langs=("en", "fr", "es", "de"))
    cfg = tiny_config_dict(model, data, root / "run", langs=("en", "fr", "es"), steps=12)
    cfg["reference"] = False
    cfg["train"]["lr_lora"] = 0.02  # large enough that the memories visibly differ after 12 steps
    decompose(config_from_dict(cfg, "test"), progress=False)
    run = root / "run"

    with_de = root / "run-de"
    shutil.copytree(run, with_de)
    add_domain(with_de, Domain("de", [data["de"]["train"]], [data["de"]["test"]]), steps=6, reference=False,
               progress=False)

    foreign = root / "run-foreign"
    shutil.copytree(run, foreign)
    mask_file = foreign / "backbone" / "mask.safetensors"
    mask = load_file(str(mask_file))
    flipped = mask["layers.0.keep"].clone()
    flipped[0] = 1 - flipped[0]
    mask["layers.0.keep"] = flipped.to(torch.uint8)
    save_file(mask, str(mask_file), metadata={"format": "pt"})
    manifest = json.loads((foreign / "koff.json").read_text())
    manifest["files"]["backbone/mask.safetensors"] = sha256_file(mask_file)
    (foreign / "koff.json").write_text(json.dumps(manifest, indent=2))

    export = export_run(run, root / "export")
    return TinyRun(run, with_de, foreign, export, model)


class Server:
    """A `koff serve` process; stopped by `close`."""

    def __init__(self, path: Path, *args: str):
        import koff

        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(koff.__file__).parents[1]))
        self.proc = subprocess.Popen([sys.executable, "-m", "koff", "serve", str(path), "--port", "0", "--device",
                                      "cpu", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env)
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        line = self._ready_line(120)
        self.url = line.rsplit(" ", 1)[-1].strip()
        self.port = int(self.url.rsplit(":", 1)[-1])
        self._wait_healthy(60)

    def _ready_line(self, timeout: float) -> str:
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not box or "listening on http://127.0.0.1:" not in box[0]:
            self.close()
            raise RuntimeError(f"koff serve did not start: {box} {''.join(self.stderr)[-3000:]}")
        return box[0]

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if self.raw("GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("koff serve never became healthy")

    def raw(self, method: str, path: str, body: bytes | str | dict | None = None, key: str | None = API_KEY,
            headers: dict | None = None) -> tuple[int, dict, bytes]:
        """One plain HTTP request (stdlib only): status, headers, body."""
        import http.client

        if isinstance(body, dict):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
             **(headers or {})}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(method, path, body=body, headers=h)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def client(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120, **kw)

    def metric(self, line_start: str) -> float:
        """The sum of the samples whose line starts with `line_start` in /metrics."""
        text = self.raw("GET", "/metrics")[2].decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="session")
def server(tiny_run):
    s = Server(tiny_run.run, "--api-key", API_KEY, "--max-batch", "8", "--max-tokens", "64")
    yield s
    s.close()
    assert s.proc.returncode == 0, "".join(s.stderr)[-3000:]

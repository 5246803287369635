"""A new kind of memory part is one module: this file defines a third kind (a per-layer bias
vector added to each attention output), registers it, and runs decompose -> save -> load ->
evaluate -> serve with it, touching no other file of koff."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config_dict
from safetensors.torch import save_file
from torch import nn

from koff.core.errors import ArtifactError
from koff.core.fields import require
from koff.core.files import load_tensors
from koff.model.base_model import decoder_layers, inspect_model
from koff.model.memory import parts as memory_parts
from koff.model.memory.parts import Call, MemoryPart, PartState, current_call

BIAS_FILE = "bias.safetensors"


@dataclass(frozen=True)
class BiasSection:
    layers: int
    hidden: int

    def to_dict(self) -> dict:
        return {"layers": self.layers, "hidden": self.hidden}


@dataclass
class BiasState(PartState):
    kind: ClassVar[str] = "bias"
    FILES: ClassVar[tuple[str, ...]] = (BIAS_FILE,)
    bias: torch.Tensor  # [layers, hidden]

    @staticmethod
    def parse_section(d: dict, where: str) -> BiasSection:
        return BiasSection(require(d, "layers", int, where), require(d, "hidden", int, where))

    def save(self, folder: Path, base_source: str | None = None) -> BiasSection:
        save_file({"bias": self.bias.detach().float().contiguous()}, str(folder / BIAS_FILE))
        return BiasSection(*self.bias.shape)

    @classmethod
    def load(cls, folder, section, where, geometry=None, against="the base model") -> BiasState:
        t = load_tensors(folder / BIAS_FILE, dtype=torch.float32)["bias"]
        if list(t.shape) != [section.layers, section.hidden]:
            raise ArtifactError(f"{folder / BIAS_FILE}: shape {list(t.shape)} is not {where}'s")
        return cls(t)

    def check(self, base: nn.Module, where: Path) -> None:
        g = inspect_model(base)
        if list(self.bias.shape) != [g.num_layers, g.hidden_size]:
            raise ArtifactError(f"{where}: bias of shape {list(self.bias.shape)} does not fit the base model")

    def describe(self) -> dict:
        return {"bias_layers": int(self.bias.shape[0])}


class BiasPart(MemoryPart):
    kind: ClassVar[str] = "bias"
    state_class: ClassVar[type[PartState]] = BiasState

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.biases = nn.ParameterDict()
        for i, layer in enumerate(decoder_layers(base)):
            layer.self_attn.o_proj.register_forward_hook(self._hook(i))

    @classmethod
    def enabled(cls, cfg) -> bool:
        return True

    def names(self) -> list[str]:
        return list(self.biases)

    def create(self, name, cfg, init) -> None:
        g = inspect_model(self._base)
        self.biases[name] = nn.Parameter(torch.zeros(g.num_layers, g.hidden_size))

    def install(self, name, state: BiasState) -> None:
        state.check(self._base, Path(name))
        self.biases[name] = nn.Parameter(state.bias.clone())

    def snapshot(self, name) -> BiasState:
        return BiasState(self.biases[name].detach().cpu().clone())

    def remove(self, name) -> None:
        del self.biases[name]

    def parameters_of(self, name) -> list[nn.Parameter]:
        return [self.biases[name]] if name in self.biases else []

    def lr(self, train_cfg) -> float:
        return 0.05

    def prepare(self, call: Call) -> None:
        if any(n in self.biases for n in call.rows):
            zero = next(iter(self.biases.values())).new_zeros(next(iter(self.biases.values())).shape)
            call.state[self.kind] = torch.stack([self.biases[n] if n in self.biases else zero for n in call.rows])

    def _hook(self, layer: int):
        def add(module, args, output):
            call = current_call()
            rows = None if call is None else call.state.get(self.kind)
            return None if rows is None else output + rows[:, layer][:, None, :].to(output.dtype)

        return add


@pytest.fixture
def with_bias_kind():
    memory_parts.register_part(BiasPart)  # all there is to adding a kind
    yield
    del memory_parts.PART_KINDS["bias"], memory_parts.STATE_CLASSES["bias"]


def test_a_third_part_kind_trains_saves_loads_evaluates_and_serves(with_bias_kind, llama_folder, data_files, tmp_path):
    from fastapi.testclient import TestClient

    from koff import build_model, decompose, load_run
    from koff.config import config_from_dict
    from koff.core.runtime import Runtime
    from koff.evaluation.generation import generate
    from koff.evaluation.perplexity import EvalSettings, evaluate_run
    from koff.serve.app import AppSettings, create_app
    from koff.serve.loading import load_served
    from koff.serve.metrics import server_metrics
    from koff.serve.scheduler import Engine, EngineConfig

    d = tiny_config_dict(llama_folder, data_files, tmp_path / "run", steps=8)
    d["reference"] = False
    decompose(config_from_dict(d), progress=False)

    run = load_run(tmp_path / "run")
    bias = run.memories["en"].parts["bias"].bias
    assert float(bias.abs().max()) > 0, "the bias part trained"
    section = json.loads((tmp_path / "run" / "memories" / "en" / "memory.json").read_text())["bias"]
    assert section == {"layers": 2, "hidden": 32}
    km, _ = build_model(run)
    x = torch.randint(3, 60, (1, 8))
    with torch.no_grad():
        with_bias = km(x, memory="en")
        km.parts["bias"].biases["en"].data.zero_()
        without = km(x, memory="en")
    assert float((with_bias - without).abs().max()) > 1e-4  # it is applied to the memory's rows

    result = evaluate_run(tmp_path / "run", EvalSettings(block=16, max_tokens=64), progress=False)
    assert result["rows"]["backbone + own memory"]["en"]["test"]["ppl"] > 1

    served = load_served(tmp_path / "run", Runtime.from_env())
    en = next(m for m in served.memories if m.name == "en")
    assert en.info["bias_layers"] == 2 and "bias" in en.info["parts"]
    assert float(F.mse_loss(en.states["bias"].bias, bias)) == 0.0
    holder: dict = {}
    metrics = server_metrics(lambda: holder["engine"].queue_depth(), lambda: holder["engine"].running(),
                             lambda: holder["engine"].memory_names())
    engine = holder["engine"] = Engine(served.km, served.tokenizer, EngineConfig(router="loss"), metrics)
    engine.start(served.memories)
    try:
        client = TestClient(create_app(engine, served, AppSettings(), metrics))
        models = client.get("/v1/models").json()["data"]
        assert next(m for m in models if m["id"] == "en")["koff"]["bias_layers"] == 2
        r = client.post("/v1/completions", json={"model": "en", "prompt": "the cat", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["text"]
    finally:
        engine.stop()
    want = generate(km_with(run, "en"), served.tokenizer, ["the cat"], "en", max_new_tokens=5)[0]
    assert text == want  # the server applies the bias part exactly as koff's own generation does


def km_with(run, memory):
    from koff import build_model

    km, _ = build_model(run, memories=[memory])
    return km

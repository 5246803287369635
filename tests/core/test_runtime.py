"""Devices and precision: flag parsing, and a bfloat16 run that matches float32."""

import json

import pytest
import torch
from conftest import tiny_config_dict

from koff.config.recipe import config_from_dict
from koff.core.errors import ConfigError
from koff.core.runtime import Runtime, resolve_device, resolve_dtype
from koff.evaluation.perplexity import EvalSettings, evaluate_run
from koff.training.pipeline import decompose


def test_device_and_dtype_flags():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype(None) is torch.float32
    for bad in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(ConfigError, match="--device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda:0")
    with pytest.raises(ConfigError, match="--dtype"):
        resolve_dtype("int8")


def test_launch_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    rt = Runtime.from_env("cpu", "bfloat16")
    assert (rt.rank, rt.world_size, rt.is_main, rt.distributed, rt.dtype) == (2, 4, False, True, torch.bfloat16)


def test_bfloat16_run_matches_float32(llama_folder, data_files, tmp_path):
    """Frozen base weights in bfloat16 (gates, LoRA and KV in float32): the same run's perplexity
    lands within 2% of the float32 run's, and the stored memories stay float32."""
    ppl = {}
    for dtype in ("float32", "bfloat16"):
        d = tiny_config_dict(llama_folder, data_files, tmp_path / dtype, steps=8, dtype=dtype)
        d["reference"] = False
        decompose(config_from_dict(d), progress=False)
        result = evaluate_run(tmp_path / dtype, EvalSettings(block=32, max_tokens=512), progress=False,
                              runtime=Runtime(torch.device("cpu"), resolve_dtype(dtype)))
        ppl[dtype] = result["rows"]["backbone + own memory"]
        manifest = json.loads((tmp_path / dtype / "koff.json").read_text())
        assert manifest["runtime"]["dtype"] == dtype
    from safetensors.torch import load_file

    assert all(t.dtype == torch.float32 for t in load_file(str(tmp_path / "bfloat16/memories/en/kv.safetensors")).values())
    for lang in ("en", "fr"):
        a, b = ppl["float32"][lang]["test"]["ppl"], ppl["bfloat16"][lang]["test"]["ppl"]
        assert abs(b - a) / a < 0.02, (lang, a, b)


@pytest.mark.parametrize("command", ["decompose", "evaluate", "analyze", "generate", "export", "add-domain",
                                     "compare", "demo", "lm-eval", "plan", "serve"])
def test_every_command_takes_device_and_dtype(command):
    """Every command that runs the model takes both; export only slices tensors (it never runs the
    model, so it has no device) and takes --dtype for the weights it stores."""
    from koff.cli import make_parser

    actions = {a.dest for sub in make_parser()._subparsers._group_actions for name, p in sub.choices.items()
               if name == command for a in p._actions}
    assert ({"dtype"} if command == "export" else {"device", "dtype"}) <= actions, command


def test_demo_trains_and_evaluates_in_the_dtype_it_is_given(monkeypatch, tmp_path):
    from koff.cli import demo, main

    seen = {}
    monkeypatch.setattr(demo, "decompose", lambda cfg, overwrite, runtime: seen.update(cfg=cfg, train=runtime))
    monkeypatch.setattr(demo, "evaluate_run", lambda run, settings, runtime: seen.update(eval=runtime) or {})
    monkeypatch.setattr(demo, "print_result", lambda result: None)
    assert main(["demo", "-o", str(tmp_path / "d"), "--device", "cpu", "--dtype", "bfloat16"]) == 0
    assert seen["cfg"].train.dtype == "bfloat16"
    assert seen["train"].dtype is torch.bfloat16 and seen["eval"].dtype is torch.bfloat16

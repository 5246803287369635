"""--report-to: every metrics.jsonl field, the config and the evaluation tables reach TensorBoard
(read back with its EventAccumulator), W&B (offline; its run file read back), MLflow (a local
file store) and trackio (local SQLite), from the main process only."""

from __future__ import annotations

import glob
import json
import struct
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config_dict

from koff.cli import main
from koff.config.recipe import ConfigError
from koff.training.tracking import flatten, open_tracker, parse_report_to

pytest.importorskip("tensorboard")


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _tb(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _tb_text(acc, tag: str) -> list[str]:
    return [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(f"{tag}/text_summary")]


def wandb_records(path: Path):
    """The protobuf records of a W&B run file (`run-ID.wandb`: W&B's LevelDB-style log: 32 KiB
    blocks of chunks, each with a 7-byte header crc32 / length / type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # FULL, LAST
            r = pb.Record()
            r.ParseFromString(buf + chunk if kind == 4 else chunk)
            buf = b""
            yield r
        else:  # FIRST, MIDDLE
            buf = chunk if kind == 2 else buf + chunk


def test_flatten_and_names():
    nums, texts = flatten({"step": 3, "loss": 1.5, "phase": "main", "memory": None, "fixed": True,
                           "domain_weights": {"en": 0.25, "fr": 0.75}, "lambdas": [1, 2]})
    assert nums == {"step": 3.0, "loss": 1.5, "fixed": 1.0, "domain_weights/en": 0.25, "domain_weights/fr": 0.75,
                    "lambdas/0": 1.0, "lambdas/1": 2.0}
    assert texts == {"phase": "main"}
    assert parse_report_to(["TensorBoard", "wandb", "wandb"]) == ["tensorboard", "wandb"]
    assert parse_report_to("none") == [] and parse_report_to(None) == []
    with pytest.raises(ConfigError, match="unknown tracker 'comet'"):
        parse_report_to(["comet"])


def test_missing_library_names_the_extra(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"--report-to wandb needs the wandb package.*pip install 'koff\[tracking\]'"):
        open_tracker(["tensorboard", "wandb"], "r", tmp_path)
    assert not (tmp_path / "tensorboard").exists()  # refused before any tracker opened


def test_decompose_and_evaluate_report_to_every_tracker(llama_folder, data_files, tmp_path, monkeypatch):
    for lib in ("wandb", "mlflow", "trackio"):
        pytest.importorskip(lib)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    d = tiny_config_dict(llama_folder, data_files, tmp_path / "runs" / "r1", steps=6, reg_every=3, controller="lagrangian")
    d["report_to"] = ["tensorboard", "wandb"]  # in the config; the flag below replaces it
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(d))
    track = tmp_path / "track"
    assert main(["decompose", "--config", str(cfg), "--device", "cpu", "--report-to", "tensorboard", "wandb",
                 "mlflow", "trackio", "--tracking-dir", str(track)]) == 0
    run = tmp_path / "runs" / "r1"
    main_rec = _records(run)
    ref_rec = _records(run / "reference")
    assert "report_to" not in (run / "config.yaml").read_text()  # reporting is no part of the run's config

    # TensorBoard: every numeric field of every record, per-domain losses, text fields, the config
    acc = _tb(track / "tensorboard" / "r1")
    scalars = set(acc.Tags()["scalars"])
    numeric = {k for r in main_rec for k, v in flatten(r)[0].items() if k != "step"}
    assert numeric and numeric <= scalars, numeric - scalars
    assert {"lambda1", "lambda2", "loss/en", "loss/fr", "loss/general", "reference/loss"} <= scalars
    assert [e.step for e in acc.Scalars("loss")] == [r["step"] for r in main_rec]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([r["loss"] for r in main_rec], rel=1e-6)
    assert [e.value for e in acc.Scalars("reference/loss")] == pytest.approx([r["loss"] for r in ref_rec], rel=1e-6)
    assert "main" in _tb_text(acc, "phase") or "warmup" in _tb_text(acc, "phase")
    assert "target_sparsity: 0.25" in _tb_text(acc, "config")[0]

    # W&B offline: the run file holds the config and one history row per step
    runfile = Path(glob.glob(str(track / "wandb" / "offline-run-*" / "run-*.wandb"))[0])
    history, config = [], {}
    for r in wandb_records(runfile):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
    assert config["target_sparsity"] == 0.25 and config["train"]["steps"] == 6
    main_rows = [h for h in history if "loss" in h]
    assert [h["loss"] for h in main_rows] == pytest.approx([r["loss"] for r in main_rec])
    assert all(numeric <= set(h) | {"expected_sparsity"} for h in main_rows)

    # MLflow (local file store): metric history, params, config artifact
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(track / "mlruns").resolve().as_uri())
    (mrun,) = client.search_runs([client.get_experiment_by_name("koff").experiment_id])
    hist = client.get_metric_history(mrun.info.run_id, "loss")
    assert [m.value for m in sorted(hist, key=lambda m: m.step)] == pytest.approx([r["loss"] for r in main_rec])
    assert mrun.data.params["train.steps"] == "6" and "loss.en" in mrun.data.metrics

    # trackio (local SQLite): the same losses
    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs("koff", "r1")
    assert [x["loss"] for x in logs if "loss" in x] == pytest.approx([r["loss"] for r in main_rec])

    # the evaluation table, through koff evaluate
    assert main(["evaluate", str(run), "--device", "cpu", "--max-tokens", "64", "--block", "16",
                 "--report-to", "tensorboard", "--tracking-dir", str(track)]) == 0
    table = json.loads((run / "eval" / "perplexity.json").read_text())
    acc = _tb(track / "tensorboard" / "r1")
    md = _tb_text(acc, "eval/perplexity")
    assert md and "# Perplexity" in md[-1]
    ppl = table["rows"]["backbone"]["en"]["test"]["ppl"]
    assert acc.Scalars("eval/perplexity/backbone/en")[-1].value == pytest.approx(ppl, rel=1e-6)

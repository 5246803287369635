"""SIGKILL (and Ctrl-C) at every point where add-domain, export and decompose write.

Each command runs in its own process (forked from a forkserver that has koff imported, so a
process costs a fork, not an interpreter start) with `KOFF_FAULT` naming the point where it dies
by SIGKILL (or gets a SIGINT): no wall-clock luck. After each kill the run is checked: every file
that existed before is byte-identical, no output is half-visible (a memory or export either is not
there or is complete and loads), and whatever the process left is a temporary name. Then the
same command runs again: it succeeds (or, where the killed one had finished its work, the work is
there), removes the leftovers and says so, and its result is bitwise the uninterrupted one's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import tiny_config_dict, write_domain_files
from koff_process import koff
from safetensors.torch import load_file
from test_campaign import tree_hashes

from koff.cli import main
from koff.config.recipe import config_from_dict
from koff.export import read_backbone_manifest
from koff.storage.run_dir import load_run
from koff.training.pipeline import decompose


def tree(root: Path) -> dict[str, str]:
    """Every file under `root` but the logs of the processes run there."""
    return {k: v for k, v in tree_hashes(root).items() if not k.startswith("logs/")}


def is_temporary(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    top = next((part for part in rel.split("/") if part.startswith(".")), None)
    return top is not None and (".tmp-" in top or ".old-" in top or top.endswith((".lock", ".partial"))) \
        or name == ".koff-partial.yaml"


def _strip_seconds(data: bytes) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in data.decode().splitlines()]


def _manifest_without_clock(path: Path) -> dict:
    """koff.json without what wall-clock time decides: metrics.seconds, and the sha256 of
    metrics.jsonl (whose lines carry seconds; they are compared without them)."""
    m = json.loads(path.read_text())
    assert m["metrics"].pop("seconds") >= 0
    m["files"].pop("metrics.jsonl")
    return m


def assert_same_memory(a: Path, b: Path) -> None:
    """Two memories trained the same way hold the same bytes (wall-clock seconds aside)."""
    for f in ("adapter_config.json", "adapter_model.safetensors", "kv.safetensors"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert _strip_seconds((a / "metrics.jsonl").read_bytes()) == _strip_seconds((b / "metrics.jsonl").read_bytes())


@pytest.fixture(scope="module")
def world(tmp_path_factory, llama_folder):
    root = tmp_path_factory.mktemp("kill")
    data = write_domain_files(root / "data", langs=("en", "fr", "de"))
    run = root / "run"
    decompose(config_from_dict(tiny_config_dict(llama_folder, data, run, steps=4)), progress=False)
    straight = root / "straight"
    shutil.copytree(run, straight / "run")
    add = ["add-domain", straight / "run", "--name", "xx", "--train", data["de"]["train"], "--test", data["de"]["test"],
           "--steps", "2"]
    assert main([str(a) for a in add]) == 0
    assert main(["export", str(run), str(straight / "out")]) == 0
    return {"root": root, "run": run, "data": data, "straight": straight, "model": llama_folder}


def _add_argv(run: Path, data: dict, overwrite: bool) -> list:
    return ["add-domain", run, "--name", "xx", "--train", data["de"]["train"], "--test", data["de"]["test"],
            "--steps", "2", *(["--overwrite"] if overwrite else [])]


ADD_POINTS = [
    ("output.created", False),          # the run's staging folder made, nothing trained
    ("train.step.0", False),            # training the run's memory
    ("train.step.1", False),            # the run's memory trained, not yet written
    ("train.step.0#2", False),          # training the reference's memory
    ("add_domain.staged", False),       # both memories complete under temporary names
    ("add_domain.swapped", False),      # the reference's memory in place, the run's not yet
    ("add_domain.swapped#2", False),    # both in place, nothing cleaned up yet
    ("add_domain.staged", True),        # --overwrite: the new memories staged, the old ones in place
    ("add_domain.swapped", True),       # --overwrite: the reference's replaced, the run's still the old one
    ("train.step.1:int", False),        # Ctrl-C while training
]


@pytest.mark.parametrize("fault, overwrite", ADD_POINTS, ids=[f"{f}{'-overwrite' if o else ''}" for f, o in ADD_POINTS])
def test_add_domain_killed(fault, overwrite, world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["straight"] / "run" if overwrite else world["run"], run)
    argv = _add_argv(run, world["data"], overwrite)
    before = tree(tmp_path)
    memories_before = set(load_run(run).memories)
    code, log = koff(argv, tmp_path / "logs" / "1.txt", fault)
    after = tree(tmp_path)
    if fault.endswith(":int"):
        assert code == 130, log
        assert "koff: interrupted" in log and "Traceback" not in log
        assert after == before, "Ctrl-C must leave nothing behind"
        return
    assert code == -9, log

    run_loaded = load_run(run)  # loads: nothing half-written is visible
    added = set(run_loaded.memories) - memories_before
    done = fault == "add_domain.swapped#2"
    assert added == ({"xx"} if done and not overwrite else set())
    ref = load_run(run / "reference")
    assert set(ref.memories) - memories_before <= {"xx"}
    changed = {k for k in before if after.get(k) != before[k]}
    may_change = ("run/memories/xx/", "run/reference/memories/xx/") if done else (
        ("run/reference/memories/xx/",) if fault == "add_domain.swapped" else ())
    assert all(may_change and k.startswith(may_change) for k in changed), sorted(changed)
    new = set(after) - set(before)
    assert all(is_temporary(k) or k.startswith(("run/memories/xx/", "run/reference/memories/xx/")) for k in new), new
    left = [k for k in new if is_temporary(k) and not k.endswith(".lock")]  # a stale lock file is reused silently

    if "xx" in run_loaded.memories and not overwrite:  # the killed command had committed its work
        assert_same_memory(run / "memories" / "xx", world["straight"] / "run" / "memories" / "xx")
        assert_same_memory(run / "reference" / "memories" / "xx",
                           world["straight"] / "run" / "reference" / "memories" / "xx")
        return
    code, log = koff(argv, tmp_path / "logs" / "2.txt")
    assert code == 0, log
    if left:
        assert "left by an interrupted koff command" in log
    if fault == "add_domain.swapped" and not overwrite:
        assert "left by an interrupted add-domain" in log
    assert not [k for k in tree(tmp_path) if is_temporary(k)], "leftovers remain after the rerun"
    assert_same_memory(run / "memories" / "xx", world["straight"] / "run" / "memories" / "xx")
    assert_same_memory(run / "reference" / "memories" / "xx", world["straight"] / "run" / "reference" / "memories" / "xx")
    final = tree(tmp_path)
    assert all(final[k] == before[k] for k in before
               if not k.startswith(("run/memories/xx/", "run/reference/memories/xx/"))), "an existing file changed"


EXPORT_POINTS = [
    ("output.created", False),      # the temporary folder made, nothing written
    ("output.staged", False),       # the export complete under its temporary name
    ("output.exchanged", False),    # renamed into place
    ("output.created", True),       # --overwrite of an earlier export ...
    ("output.staged", True),
    ("output.exchanged", True),     # ... swapped in, the old one not yet removed
    ("output.staged:int", True),    # Ctrl-C just before the swap
]


@pytest.mark.parametrize("fault, overwrite", EXPORT_POINTS,
                         ids=[f"{f}{'-overwrite' if o else ''}" for f, o in EXPORT_POINTS])
def test_export_killed(fault, overwrite, world, tmp_path):
    out = tmp_path / "out"
    if overwrite:
        shutil.copytree(world["straight"] / "out", out)
        old = read_backbone_manifest(out)
        (out / "notes.txt").write_text("an earlier export: replaced as a whole by --overwrite")
    argv = ["export", world["run"], out, *(["--overwrite"] if overwrite else [])]
    before = tree(tmp_path)
    run_before = tree_hashes(world["run"])
    code, log = koff(argv, tmp_path / "logs" / "1.txt", fault)
    assert tree_hashes(world["run"]) == run_before
    if fault.endswith(":int"):
        assert code == 130 and "koff: interrupted" in log and "Traceback" not in log, log
        assert tree(tmp_path) == before
        return
    assert code == -9, log
    after = tree(tmp_path)
    swapped = fault == "output.exchanged"
    if not swapped:  # the output is exactly what it was: absent, or the earlier export
        assert {k: v for k, v in after.items() if k.startswith("out/")} == \
               {k: v for k, v in before.items() if k.startswith("out/")}
        if overwrite:
            assert read_backbone_manifest(out) == old
    else:  # the new export, complete (its manifest checks every hash)
        read_backbone_manifest(out)
        assert not (out / "notes.txt").exists()
    left = [k for k in after if is_temporary(k) and not k.endswith(".lock")]
    assert all(is_temporary(k) or k.startswith("out/") for k in set(after) - set(before))

    code, log = koff(argv + (["--overwrite"] if swapped and not overwrite else []), tmp_path / "logs" / "2.txt")
    assert code == 0, log
    if left:
        assert "left by an interrupted koff command" in log
    assert not [k for k in tree(tmp_path) if is_temporary(k)]
    for f in ("model.safetensors", "kept_neurons.safetensors", "memories/fr/kv.safetensors",
              "memories/en/adapter_model.safetensors"):
        assert (out / f).read_bytes() == (world["straight"] / "out" / f).read_bytes(), f


@pytest.mark.parametrize("fault", ["output.staged", "output.exchanged"])
def test_evaluate_killed(fault, world, tmp_path):
    """eval/ holds the earlier tables until the new ones replace them, together."""
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    argv = ["evaluate", run, "--block", "16", "--max-tokens", "32"]
    assert koff(argv, tmp_path / "logs" / "0.txt")[0] == 0
    (run / "eval" / "perplexity-other.json").write_text("{}")  # a table of another --tag
    old = tree(run)
    md = (run / "eval" / "perplexity.md").read_text()
    (run / "eval" / "perplexity.md").write_text(md + "\nedited\n")  # so the rewrite is visible
    before = tree(run)
    code, log = koff(argv, tmp_path / "logs" / "1.txt", fault)
    assert code == -9, log
    after = {k: v for k, v in tree(run).items() if not is_temporary(k)}
    if fault == "output.staged":
        assert after == before
    else:
        assert {k: v for k, v in after.items() if not k.startswith("eval/")} == \
               {k: v for k, v in before.items() if not k.startswith("eval/")}
        assert after["eval/perplexity.md"] == old["eval/perplexity.md"] and "eval/perplexity-other.json" in after
    assert [k for k in tree(tmp_path) if is_temporary(k) and not k.endswith(".lock")]
    code, log = koff(argv, tmp_path / "logs" / "2.txt")
    assert code == 0 and "left by an interrupted koff command" in log, log
    assert tree(run) == {**old, "eval/perplexity-other.json": before["eval/perplexity-other.json"]}
    assert not [k for k in tree(tmp_path) if is_temporary(k)]


def _decompose_argv(world, folder: Path, extra=()) -> list:
    """`koff decompose` of a resumable tiny run into FOLDER/r, run from FOLDER (the output is
    recorded as given, so runs made in different folders compare bitwise)."""
    d = tiny_config_dict(world["model"], world["data"], Path("r"), steps=6, checkpoint_every=2)
    (folder / "c.yaml").write_text(json.dumps(d))
    return ["decompose", "--config", "c.yaml", *extra]


DECOMPOSE_POINTS = [
    "train.step.2",        # the reference half-trained (a checkpoint after its step 1)
    "train.step.4#2",      # the run half-trained, the reference finished
    "checkpoint.staged#3",  # the run's first checkpoint written, not yet swapped in
    "run.written#2",       # the run's koff.json written, its checkpoint not yet removed
    "decompose.published",  # --overwrite: the run swapped in, the replaced one not yet removed
]


@pytest.fixture(scope="module")
def straight_decompose(world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight-decompose")
    code, log = koff(_decompose_argv(world, folder), folder / "logs" / "0.txt", cwd=folder)
    assert code == 0, log
    return folder / "r"


@pytest.mark.parametrize("fault", DECOMPOSE_POINTS)
def test_decompose_killed_resumes_bitwise(fault, world, straight_decompose, tmp_path):
    out = tmp_path / "r"
    overwrite = fault == "decompose.published"
    if overwrite:
        shutil.copytree(world["run"], out)
    argv = _decompose_argv(world, tmp_path, ["--overwrite"] if overwrite else [])
    before = tree(tmp_path)
    code, log = koff(argv, tmp_path / "logs" / "1.txt", fault, cwd=tmp_path)
    assert code == -9, log
    after = tree(tmp_path)
    if overwrite:  # the new run is in place, complete
        load_run(out)
    else:  # nothing at OUTPUT yet: the partial run is only under OUTPUT.partial
        assert not out.exists()
        assert all(k.startswith(("r.partial/", ".r.")) or k == "c.yaml" for k in after)
    assert all(after.get(k) == v for k, v in before.items() if not (overwrite and k.startswith("r/")))
    if not overwrite:
        code, log = koff(argv + ["--resume"], tmp_path / "logs" / "2.txt", cwd=tmp_path)
        assert code == 0, log
        assert not [k for k in tree(tmp_path) if is_temporary(k)]
    else:  # the next writer of OUTPUT clears the replaced run's remains
        code, log = koff(argv, tmp_path / "logs" / "2.txt", cwd=tmp_path)
        assert code == 0 and "left by an interrupted koff command" in log, log
        assert not [k for k in tree(tmp_path) if is_temporary(k)]
    a, b = tree_hashes(straight_decompose), tree_hashes(out)
    assert set(a) == set(b)
    for rel in a:
        if rel.endswith("koff.json"):
            assert _manifest_without_clock(straight_decompose / rel) == _manifest_without_clock(out / rel), rel
        elif rel.endswith("metrics.jsonl"):
            assert _strip_seconds((straight_decompose / rel).read_bytes()) == _strip_seconds((out / rel).read_bytes())
        else:
            assert a[rel] == b[rel], rel


def test_two_identical_decompose_commands_give_identical_runs(world, straight_decompose, tmp_path):
    """Bitwise, but for wall-clock seconds (koff.json metrics.seconds, metrics.jsonl seconds)."""
    argv = _decompose_argv(world, tmp_path)
    code, log = koff(argv, tmp_path / "logs" / "1.txt", cwd=tmp_path)
    assert code == 0, log
    first = tmp_path / "first"
    os.rename(tmp_path / "r", first)
    out = straight_decompose
    a, b = tree_hashes(first), tree_hashes(out)
    assert set(a) == set(b) and len(a) > 10
    differ = sorted(rel for rel in a if a[rel] != b[rel])
    assert set(differ) <= {"koff.json", "metrics.jsonl", "reference/koff.json", "reference/metrics.jsonl"}, differ
    for rel in differ:
        if rel.endswith("koff.json"):
            assert _manifest_without_clock(first / rel) == _manifest_without_clock(out / rel)
        else:
            assert _strip_seconds((first / rel).read_bytes()) == _strip_seconds((out / rel).read_bytes())
    for rel in a:
        if rel.endswith(".safetensors"):
            ta, tb = load_file(str(first / rel)), load_file(str(out / rel))
            assert all((ta[k] == tb[k]).all() for k in ta)

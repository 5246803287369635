"""Output folders: atomic replacement, kinds, inputs, locks, leftovers and permissions."""

import json
import os
import stat

import pytest

from koff.core import atomic as outputs
from koff.core.atomic import (
    atomic_output,
    atomic_write_text,
    check_output,
    clean_leftovers,
    kind_of,
    lock,
    swap_in,
    temp_name,
)
from koff.core.errors import ArtifactError


def _run_folder(path, tag="old"):
    path.mkdir(parents=True)
    (path / "koff.json").write_text(json.dumps({"format": "koff.run", "tag": tag}))
    return path


def _dead_pid() -> int:
    pid = 2 ** 22 - 7
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_replaces_only_an_earlier_output_of_the_same_kind(tmp_path):
    run = _run_folder(tmp_path / "run")
    with atomic_output(run, kind="run", overwrite=True) as tmp:
        (tmp / "koff.json").write_text(json.dumps({"format": "koff.run", "tag": "new"}))
    assert json.loads((run / "koff.json").read_text())["tag"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(ArtifactError, match="not a folder koff wrote"):
        check_output(mine, "run", overwrite=True)
    with pytest.raises(ArtifactError, match="a koff run, not a koff export"):
        check_output(run, "backbone", overwrite=True)
    with pytest.raises(ArtifactError, match="already exists"):
        check_output(run, "run")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="a file"):
        check_output(tmp_path / "file", "run", overwrite=True)


def test_kind_of_what_is_written_must_match_what_it_replaces(tmp_path):
    """With no kind given (the generic API an export uses), the new folder's kind is checked
    against the old one's before the swap: an export never replaces a run."""
    run = _run_folder(tmp_path / "run")
    before = (run / "koff.json").read_bytes()
    with pytest.raises(ArtifactError, match="koff run; the output written is a koff export"):
        with atomic_output(run, overwrite=True) as tmp:
            (tmp / "koff_backbone.json").write_text(json.dumps({"format": "koff.backbone"}))
    assert (run / "koff.json").read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_output_must_not_be_contain_or_lie_inside_an_input(tmp_path):
    data = tmp_path / "data"
    (data / "en").mkdir(parents=True)
    (data / "en" / "train.txt").write_text("x")
    with pytest.raises(ArtifactError, match="is the input"):
        check_output(data, None, [data], overwrite=True)
    with pytest.raises(ArtifactError, match="lies inside the input"):
        check_output(data / "out", None, [data])
    with pytest.raises(ArtifactError, match="contains the input"):
        check_output(data, None, [data / "en" / "train.txt"], overwrite=True)
    check_output(tmp_path / "out", None, [data, None, tmp_path / "missing"])


def test_failure_leaves_the_old_output_and_no_temporary(tmp_path):
    run = _run_folder(tmp_path / "run")
    for exc in (RuntimeError("crash"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), atomic_output(run, kind="run", overwrite=True) as tmp:
            (tmp / "koff.json").write_text("half")
            raise exc
        assert json.loads((run / "koff.json").read_text())["tag"] == "old"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_swap_is_an_exchange_or_a_recoverable_pair_of_renames(tmp_path, monkeypatch):
    old, new = _run_folder(tmp_path / "run"), _run_folder(tmp_path / "new", "new")
    held = swap_in(new, old)
    assert json.loads((old / "koff.json").read_text())["tag"] == "new"
    assert held is not None and json.loads((held / "koff.json").read_text())["tag"] == "old"

    # without an atomic exchange: a crash between the renames leaves the old run at .run.old-*,
    # and the next writer puts it back
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    moved = temp_name(old, "old")
    os.rename(old, moved)
    clean_leftovers(old)
    assert json.loads((old / "koff.json").read_text())["tag"] == "new" and not moved.exists()
    other = _run_folder(tmp_path / "other", "third")
    held = swap_in(other, old)
    assert json.loads((old / "koff.json").read_text())["tag"] == "third" and ".run.old-" in held.name


def test_leftovers_are_removed_by_the_next_writer_with_a_notice(tmp_path, capsys):
    run = _run_folder(tmp_path / "run")
    dead = tmp_path / f".run.tmp-{_dead_pid()}-abcd1234"
    dead.mkdir()
    (dead / "big.safetensors").write_bytes(b"x" * 100)
    legacy = tmp_path / ".run.tmp-k2j4_x9q"  # the name tempfile.mkdtemp gave before
    legacy.mkdir()
    with atomic_output(run, kind="run", overwrite=True) as tmp:
        (tmp / "koff.json").write_text(json.dumps({"format": "koff.run"}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    err = capsys.readouterr().err
    assert err.count("left by an interrupted koff command") == 2 and str(dead) in err

    # a single file's temporary belonging to a live process is kept (files are written unlocked)
    live = tmp_path / f".cell.json.tmp-{os.getpid()}-00000000"
    live.write_text("being written")
    gone = tmp_path / f".cell.json.tmp-{_dead_pid()}-00000000"
    gone.write_text("crashed")
    atomic_write_text(tmp_path / "cell.json", "{}")
    assert live.exists() and not gone.exists()


def test_a_second_writer_is_refused(tmp_path):
    target = tmp_path / "run"
    with lock(target):
        with pytest.raises(ArtifactError, match=r"being written by pid \d+"), lock(target):
            pass
        with pytest.raises(ArtifactError, match="being written"), lock(target, shared=True):
            pass
    assert not (tmp_path / ".run.lock").exists()
    with lock(target, shared=True), lock(target, shared=True):  # readers writing inside the run
        with pytest.raises(ArtifactError, match="being written"):
            with lock(target):
                pass
    assert not (tmp_path / ".run.lock").exists()
    with lock(target):
        pass


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_files_and_folders_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        assert outputs.umask() == mask
        with atomic_output(tmp_path / "run", kind="run") as tmp:
            (tmp / "koff.json").write_text(json.dumps({"format": "koff.run"}))
        atomic_write_text(tmp_path / "cell.json", "{}")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)
    assert mode(tmp_path / "run") == 0o777 & ~mask
    assert mode(tmp_path / "run" / "koff.json") == 0o666 & ~mask
    assert mode(tmp_path / "cell.json") == 0o666 & ~mask


def test_kinds_are_recognised_by_what_koff_writes(tmp_path):
    assert kind_of(_run_folder(tmp_path / "r")) == "run"
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "perplexity.json").write_text("{}")
    assert kind_of(tmp_path / "e") == "eval"
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "koff_backbone.json").write_text('{"format": "koff.backbone"}')
    assert kind_of(tmp_path / "b") == "backbone"
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "koff.json").write_text("not json")
    assert kind_of(tmp_path / "x") is None and kind_of(tmp_path / "missing") is None
    outputs.register_kind("gguf", lambda p: (p / "model.gguf").is_file(), "a GGUF export")
    try:
        (tmp_path / "g").mkdir()
        (tmp_path / "g" / "model.gguf").write_bytes(b"GGUF")
        assert kind_of(tmp_path / "g") == "gguf"
        with pytest.raises(ArtifactError, match="a GGUF export, not a koff run"):
            check_output(tmp_path / "g", "run", overwrite=True)
    finally:
        outputs.KINDS.pop("gguf")
        outputs.KIND_NAMES.pop("gguf")


def test_an_updated_folder_keeps_what_the_command_did_not_write(tmp_path):
    """RUN/eval/ collects tables (one per --tag): a new table and its Markdown replace the old
    pair in one swap; every other file stays; a failure changes nothing."""
    from koff.core.atomic import updated_folder

    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "perplexity.json").write_text("old")
    (folder / "perplexity-long.json").write_text("another tag")
    (folder / "plots").mkdir()
    (folder / "plots" / "a.png").write_bytes(b"png")
    with pytest.raises(RuntimeError), updated_folder(folder) as tmp:
        (tmp / "perplexity.json").write_text("half")
        raise RuntimeError("crash")
    assert (folder / "perplexity.json").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["eval"]
    with updated_folder(folder) as tmp:
        atomic_write_text(tmp / "perplexity.json", "new")
        atomic_write_text(tmp / "perplexity.md", "new table")
    assert sorted(p.name for p in folder.iterdir()) == ["perplexity-long.json", "perplexity.json", "perplexity.md",
                                                         "plots"]
    assert (folder / "perplexity.json").read_text() == "new" and (folder / "plots" / "a.png").read_bytes() == b"png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="a file, not a folder"), updated_folder(tmp_path / "file"):
        pass

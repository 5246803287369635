"""Writing koff's outputs so that a crash, a Ctrl-C or a second command never costs a file.

Every output (a run, a memory, an export, an eval/ or analysis/ folder, a cell or report file) is
built under a temporary name beside its final place, `.NAME.tmp-PID-XXXX` in the same parent, and
swapped in by one atomic rename. An existing output is replaced only when it is an earlier koff
output of the same kind, never when it is (or contains, or lies inside) one of the command's
inputs; the replacement is an atomic exchange where the OS offers one (Linux `renameat2`), so at
every instant the final path holds either the complete old output or the complete new one.

A writer holds a lock on its output (`.NAME.lock` in the parent, an advisory `flock`), so a second
command writing the same output is refused, not interleaved. Holding it, the writer removes the
temporary folders an interrupted earlier command left for the same output and says so in one line
on stderr. Files and folders get the permissions the user's umask gives (a temporary folder is
made private by `mkdtemp`; its mode is set from the umask before it is swapped in).

The guarantees hold against the process dying (SIGKILL, Ctrl-C, an exception) and against the
machine losing power: before each rename that publishes an output (`atomic_write_bytes`,
`swap_in`), every file of the new output and its folders are fsynced, and after it the parent
folder (whose entry the rename changed), so a crash never leaves a renamed name pointing at data
that never reached the disk. `KOFF_FSYNC=0` turns this off (a scratch file system, or tests that
write thousands of outputs).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from koff.core import faults
from koff.core.errors import ArtifactError

# -- permissions ---------------------------------------------------------------------------------


def umask() -> int:
    """The process' umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _dir_mode() -> int:
    return 0o777 & ~umask()


def _file_mode() -> int:
    return 0o666 & ~umask()


# -- temporary names and leftovers ---------------------------------------------------------------


def temp_name(final: Path, tag: str = "tmp") -> Path:
    """A fresh temporary sibling of `final`: `.NAME.tmp-PID-XXXX` (the pid names its owner)."""
    final = Path(final)
    return final.parent / f".{final.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def _owner_alive(leftover: Path) -> bool:
    """Whether the process that created a `.NAME.tmp-PID-XXXX` is still running."""
    try:
        pid = int(leftover.name.rsplit("-", 2)[-2])
    except (ValueError, IndexError):
        return False
    return pid == os.getpid() or pid_alive(pid)


def pid_alive(pid: int) -> bool:
    """Whether a process of this PID runs on this machine (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def notice(message: str) -> None:
    """One line on stderr about something koff did on the user's behalf."""
    print(f"koff: {message}", file=sys.stderr)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def leftovers(final: Path) -> list[Path]:
    """Temporary siblings of `final` (`.NAME.tmp-*`, `.NAME.old-*`) left by earlier writers."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    prefix = f".{final.name}."
    return sorted(p for p in final.parent.iterdir()
                  if p.name.startswith(prefix) and p.name[len(prefix):].startswith(("tmp-", "old-")))


def clean_leftovers(final: Path, only_dead: bool = False) -> list[Path]:
    """Remove what interrupted writers of `final` left beside it, with a one-line notice each.

    Callers hold the output's lock, so no live writer owns them; `only_dead` (for unlocked single
    files) keeps those whose owning process still runs. When the final path is missing but an
    `.old-*` copy exists (a crash between the two renames of a non-atomic replacement), that copy
    is the previous output and is put back instead of removed.
    """
    final = Path(final)
    removed = []
    for p in leftovers(final):
        if only_dead and _owner_alive(p):
            continue
        if ".old-" in p.name and not final.exists():
            os.rename(p, final)
            notice(f"restored {final} from {p.name}, left by an interrupted koff command")
            continue
        _remove(p)
        removed.append(p)
        notice(f"removed {p}, left by an interrupted koff command")
    return removed


# -- durability ----------------------------------------------------------------------------------


def _fsync_enabled() -> bool:
    return os.environ.get("KOFF_FSYNC", "1") != "0"


def fsync_path(path: Path) -> None:
    """Flush one file's or folder's data and metadata to the disk (a folder: its entries)."""
    if not _fsync_enabled():
        return
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot fsync a folder; the data files were
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (deepest first), then `root` itself."""
    if not _fsync_enabled():
        return
    root = Path(root)
    if root.is_dir() and not root.is_symlink():
        for dirpath, dirnames, filenames in os.walk(root, topdown=False):
            for name in filenames:
                p = Path(dirpath) / name
                if not p.is_symlink():
                    fsync_path(p)
            for name in dirnames:
                p = Path(dirpath) / name
                if not p.is_symlink():
                    fsync_path(p)
    if root.exists() and not root.is_symlink():
        fsync_path(root)


# -- atomic replacement --------------------------------------------------------------------------


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE); False where the OS or
    file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in(new: Path, final: Path) -> Path | None:
    """Make the complete `new` (a sibling of `final`) appear at `final` in one step; returns the
    path now holding what `final` held before (for the caller to delete), or None."""
    new, final = Path(new), Path(final)
    fsync_tree(new)  # the data on the disk before any name points at it
    parents = {new.parent, final.parent}
    try:
        if not final.exists() and not final.is_symlink():
            os.rename(new, final)
            return None
        if final.is_dir() == new.is_dir() and _exchange(new, final):
            return new
        if not final.is_dir():
            os.replace(new, final)
            return None
        # no atomic exchange here: a crash between the two renames leaves the previous output at
        # .NAME.old-*, which the next writer of this output puts back (clean_leftovers)
        old = temp_name(final, "old")
        os.rename(final, old)
        os.rename(new, final)
        return old
    finally:
        for parent in parents:  # the renames themselves
            if parent.is_dir():
                fsync_path(parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file via a temporary sibling and one rename; mode from the umask."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"cannot create {path.parent} for {path.name}: {e.strerror or e}") from None
    clean_leftovers(path, only_dead=True)
    tmp = temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _file_mode())
    except OSError as e:
        raise ArtifactError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if _fsync_enabled():
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file (UTF-8) via a temporary sibling and one rename; mode from the umask."""
    atomic_write_bytes(path, text.encode("utf-8"))


def make_temp_dir(final: Path) -> Path:
    """A new, empty temporary sibling folder of `final` with the umask's mode."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(final)
        tmp.mkdir(mode=0o700)
        os.chmod(tmp, _dir_mode())
    except OSError as e:
        raise ArtifactError(f"cannot create the output {final}: {e.strerror or e}") from None
    faults.point("output.created")
    return tmp


# -- output kinds --------------------------------------------------------------------------------


def _manifest_format(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("format") if isinstance(data, dict) else None


def _has_json_object(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


KINDS: dict[str, Callable[[Path], bool]] = {
    "run": lambda p: _manifest_format(p / "koff.json") == "koff.run",
    "memory": lambda p: _manifest_format(p / "memory.json") == "koff.memory",
    "backbone": lambda p: _manifest_format(p / "koff_backbone.json") == "koff.backbone",
    "eval": lambda p: _has_json_object(p / "perplexity.json"),
    "analysis": lambda p: _has_json_object(p / "specialization.json"),
}
"""Kinds of output folder koff writes, each recognised by what koff writes into it."""

KIND_NAMES = {"run": "a koff run", "memory": "a koff memory", "backbone": "a koff export",
              "eval": "an evaluation (eval/) folder", "analysis": "an analysis folder"}


def register_kind(name: str, detect: Callable[[Path], bool], description: str | None = None) -> None:
    """Add a kind of output folder (e.g. a new export format): `detect(folder)` says whether a
    folder is an earlier output of that kind."""
    KINDS[name] = detect
    KIND_NAMES[name] = description or name


def kind_of(folder: Path) -> str | None:
    """The kind of koff output `folder` is (None: not a koff output folder)."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return None
    return next((k for k, detect in KINDS.items() if detect(folder)), None)


def _describe(kind: str | None) -> str:
    return KIND_NAMES.get(kind, kind) if kind else "not a koff output"


def check_output(out: Path, kind: str | None = None, inputs: Iterable[Path | str | None] = (),
                 overwrite: bool = False, flag: str = "--overwrite") -> None:
    """Refuse an output that would destroy something: one that is, contains or lies inside one of
    `inputs`; one that exists (without `overwrite`); one that is not an earlier koff output of the
    same `kind` (None: of any koff kind; the kind written is checked again when swapping in)."""
    out = Path(out)
    target = out.resolve()
    for item in inputs:
        if item is None:
            continue
        src = Path(item)
        if not src.exists():
            continue
        src_r = src.resolve()
        if target == src_r:
            raise ArtifactError(f"output {out} is the input {src}; choose another output")
        if src_r in target.parents:
            raise ArtifactError(f"output {out} lies inside the input {src}; choose an output outside it")
        if target in src_r.parents:
            raise ArtifactError(f"output {out} contains the input {src}; choose another output")
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise ArtifactError(f"{out} already exists (choose another output or pass {flag})")
    if out.is_symlink() or not out.is_dir():
        raise ArtifactError(f"{out} is not a folder koff wrote ({'a symlink' if out.is_symlink() else 'a file'}); "
                            f"{flag} only replaces an earlier koff output; remove it yourself or choose another output")
    found = kind_of(out)
    if found is None or (kind is not None and found != kind):
        what = f"is {_describe(found)}, not {_describe(kind)}" if found and kind else "is not a folder koff wrote"
        raise ArtifactError(f"{out} {what}: {flag} only replaces an earlier output of the same kind; remove it "
                            "yourself or choose another output")


# -- locks ---------------------------------------------------------------------------------------


def lock_path(target: Path) -> Path:
    target = Path(target)
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def lock(target: Path, shared: bool = False) -> Iterator[None]:
    """Hold the lock on output `target` for the block: exclusive (a writer of `target`) or shared
    (a command writing inside it, e.g. RUN/eval, which must not see RUN replaced meanwhile).
    A conflicting holder gets the command refused with an ArtifactError naming it."""
    import fcntl

    target = Path(target)
    path = lock_path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"cannot create the output {target}: {e.strerror or e}") from None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, _file_mode())
        except OSError as e:
            raise ArtifactError(f"cannot write beside {target} (lock file {path}): {e.strerror or e}") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 300).decode("utf-8", "replace").strip() or "another koff command"
            finally:
                os.close(fd)
            raise ArtifactError(f"{target} is being written by {holder}; wait for it to finish "
                                f"(if no koff command is running, delete {path})") from None
        try:  # a releasing holder may have unlinked the file between our open and flock
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    if not shared:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} (koff {' '.join(sys.argv[1:3])})".encode()[:300])
    try:
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no other holder: the file can go
            os.unlink(path)
        except (BlockingIOError, FileNotFoundError):
            pass
        os.close(fd)


def check_not_locked(target: Path, shared: bool = True) -> None:
    """Refuse now, rather than after minutes of work, if a writer holds `target` (the lock is
    taken again, for real, when the output is written)."""
    with lock(target, shared=shared):
        pass


# -- whole outputs -------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_output(final: Path, kind: str | None = None, inputs: Iterable[Path | str | None] = (),
                  overwrite: bool = False, flag: str = "--overwrite", hold_lock: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes `final` only if the block completes.

    Checks `final` first (`check_output`), holds its lock (unless the caller does:
    `hold_lock=False`), removes leftovers of interrupted writers of `final`, and on success swaps
    the new folder in. With `kind` None, the kind of the new folder (what the block wrote) must
    match that of the folder it replaces. On any failure or interruption the temporary folder is
    removed and `final` is as it was.
    """
    final = Path(final)
    inputs = list(inputs)
    check_output(final, kind, inputs, overwrite, flag)
    with lock(final) if hold_lock else contextlib.nullcontext():
        clean_leftovers(final)
        check_output(final, kind, inputs, overwrite, flag)  # another writer may have finished meanwhile
        tmp = make_temp_dir(final)
        old = None
        try:
            yield tmp
            if final.exists() and kind is None and kind_of(tmp) != kind_of(final):
                raise ArtifactError(f"{final} is {_describe(kind_of(final))}; the output written is "
                                    f"{_describe(kind_of(tmp))}: {flag} only replaces an earlier output of the same kind")
            faults.point("output.staged")
            old = swap_in(tmp, final)
            faults.point("output.exchanged")
        finally:
            for leftover in (tmp, old):
                if leftover is not None and (leftover.exists() or leftover.is_symlink()):
                    _remove(leftover)


def check_folder(folder: Path) -> None:
    """`folder` is a folder (or not there yet), not a file or a symlink koff would write through."""
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise ArtifactError(f"{folder} is {'a symlink' if folder.is_symlink() else 'a file'}, not a folder; koff "
                            "writes its tables there: move it away")


@contextlib.contextmanager
def updated_folder(folder: Path) -> Iterator[Path]:
    """Yield a staging copy of `folder` (a folder of result files that several commands add to,
    e.g. RUN/eval/ with one table per `--tag`): what the block writes there, and every file it
    leaves alone, replace `folder` in one swap. A crash or Ctrl-C leaves `folder` as it was; a
    reader never sees a table without its companions."""
    folder = Path(folder)
    check_folder(folder)
    with lock(folder):
        clean_leftovers(folder)
        tmp = make_temp_dir(folder)
        old = None
        try:
            if folder.is_dir():
                for p in folder.iterdir():
                    if p.is_dir() and not p.is_symlink():
                        shutil.copytree(p, tmp / p.name, symlinks=True)
                    else:  # copies, not links: a writer that rewrites a file in place must not touch the live one
                        shutil.copy2(p, tmp / p.name, follow_symlinks=False)
            yield tmp
            faults.point("output.staged")
            old = swap_in(tmp, folder)
            faults.point("output.exchanged")
        finally:
            for leftover in (tmp, old):
                if leftover is not None and (leftover.exists() or leftover.is_symlink()):
                    _remove(leftover)


def remove_tree(path: Path) -> None:
    """Delete a folder (or file) that koff owns, ignoring one that is already gone."""
    _remove(Path(path))


__all__ = ["pid_alive", "atomic_output", "atomic_write_bytes", "atomic_write_text", "check_folder", "check_not_locked", "check_output",
           "fsync_path", "fsync_tree",
           "clean_leftovers", "kind_of", "updated_folder",
           "leftovers", "lock", "make_temp_dir", "notice", "register_kind", "remove_tree", "swap_in", "temp_name",
           "umask"]

"""Claims on a unit of work (a grid cell) that hold across hosts on a shared filesystem.

Several `koff compare` workers, on one machine or on many nodes of a cluster, share a grid by
claiming a cell before running it. A claim is a file created with `O_CREAT | O_EXCL` (atomic on
local filesystems and on NFSv3+) holding the claimant's host, PID and a random token. While the
claim is held a daemon thread touches the file every `heartbeat` seconds. A claim is stale, and
may be taken over, when

- its host is this host and its PID is not alive (a crashed or killed worker: seen at once), or
- its file has not been touched for `stale_after` seconds (a worker on another host, or one whose
  host died: a PID means nothing across hosts, so only the heartbeat can tell).

`flock` is not used because its semantics over NFS depend on the client and server (lockd), and a
lock whose holder's host died may never be released.

Taking over is itself guarded by a second exclusive file (`NAME.takeover`), so two workers that
both see the same stale claim cannot both win; the winner re-reads the claim under that guard
before replacing it. `stale_after` must exceed the heartbeat by a wide margin and the clock skew
between hosts (NTP keeps it at milliseconds; the default is 10 minutes).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from koff.core.atomic import pid_alive

HEARTBEAT_S = 30.0
"""How often a held claim's file is touched."""

STALE_AFTER_S = 600.0
"""A claim whose file is older than this is stale, whatever its host."""


@dataclass(frozen=True)
class Holder:
    """Who holds a claim, as its file says."""

    host: str
    pid: int
    token: str = ""

    @classmethod
    def read(cls, path: Path) -> Holder | None:
        """The holder recorded in `path` (None: the file is gone). A file of an older koff (a bare
        PID) counts as held by this host with that PID; one being written (empty or half-written)
        as held by an unknown host, so only its age can make it stale."""
        try:
            text = path.read_text(encoding="utf-8", errors="replace").strip()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
            return cls(str(data["host"]), int(data["pid"]), str(data.get("token", "")))
        except (ValueError, KeyError, TypeError):
            return cls(socket.gethostname(), int(text)) if text.isdigit() else cls("?", 0)

    def alive(self) -> bool:
        """On this host: whether the PID runs. On another host: unknown, so True (the heartbeat decides)."""
        return self.host != socket.gethostname() or (self.pid > 0 and pid_alive(self.pid))


def _age(path: Path) -> float | None:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


def is_stale(path: Path, stale_after: float = STALE_AFTER_S) -> bool:
    """Whether the claim at `path` may be taken over (a missing file is not a claim at all)."""
    holder, age = Holder.read(path), _age(path)
    if holder is None or age is None:
        return False
    return age > stale_after or not holder.alive()


def _create(path: Path, holder: Holder) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"host": holder.host, "pid": holder.pid, "token": holder.token,
                   "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, f)
        f.flush()
        os.fsync(f.fileno())  # the claim must be visible to other hosts before work starts
    return True


def _take_over(path: Path, holder: Holder, stale_after: float) -> bool:
    """Replace a stale claim, under the takeover guard; False if someone else did or it is not stale."""
    guard = path.with_name(path.name + ".takeover")
    if not _create(guard, holder):
        age = _age(guard)
        if age is not None and age > stale_after:  # a worker died in the few lines below
            guard.unlink(missing_ok=True)
        return False
    try:
        if not is_stale(path, stale_after):  # re-read under the guard: it may have been replaced meanwhile
            return False
        path.unlink(missing_ok=True)
        return _create(path, holder)
    finally:
        guard.unlink(missing_ok=True)


class _Heartbeat(threading.Thread):
    def __init__(self, path: Path, token: str, every: float):
        super().__init__(daemon=True, name=f"koff-claim-heartbeat {path.name}")
        self.path, self.token, self.every = path, token, every
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            holder = Holder.read(self.path)
            if holder is None or holder.token != self.token:
                return  # taken over (we looked dead): stop touching someone else's claim
            with contextlib.suppress(OSError):
                os.utime(self.path)


@contextlib.contextmanager
def claim(path: Path, heartbeat: float = HEARTBEAT_S, stale_after: float = STALE_AFTER_S) -> Iterator[bool]:
    """Claim the work named by `path` for this process for the block.

    Yields True when the claim is ours (it is released at the end of the block, however the block
    ends), False when another live worker holds it. A stale claim (see the module docstring) is
    taken over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = Holder(socket.gethostname(), os.getpid(), secrets.token_hex(8))
    mine = _create(path, me) or (is_stale(path, stale_after) and _take_over(path, me, stale_after))
    if not mine:
        yield False
        return
    beat = _Heartbeat(path, me.token, heartbeat)
    beat.start()
    try:
        yield True
    finally:
        beat.stop.set()
        beat.join()
        holder = Holder.read(path)
        if holder is not None and holder.token == me.token:  # never remove a claim that was taken over
            path.unlink(missing_ok=True)


__all__ = ["HEARTBEAT_S", "STALE_AFTER_S", "Holder", "claim", "is_stale"]

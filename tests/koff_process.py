"""Run `koff ARGV` in a process of its own, forked from a forkserver that has koff imported (a
process costs a fork, not an interpreter start), optionally dying at a `KOFF_FAULT` point. Used by
the crash tests (tests/core/test_kill.py) and the preemption tests (tests/training/test_preemption.py)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from pathlib import Path

_FORKSERVER = None


def _context():
    """The forkserver, started once with every module this process has used for koff so far
    (transformers imports its model code lazily, which would cost each child seconds)."""
    global _FORKSERVER
    if _FORKSERVER is None:
        _FORKSERVER = multiprocessing.get_context("forkserver")
        prefixes = ("torch", "transformers", "tokenizers", "safetensors", "peft", "accelerate", "koff", "yaml", "tqdm",
                    "numpy", "scipy", "huggingface_hub")
        _FORKSERVER.set_forkserver_preload(sorted(m for m in list(sys.modules) if m.split(".")[0] in prefixes
                                                  and "__main__" not in m and ".tests" not in m))
    return _FORKSERVER


def _child(argv: list[str], fault: str | None, log: str, cwd: str | None) -> None:
    if cwd is not None:
        os.chdir(cwd)
    # A Ctrl-C reaches koff as KeyboardInterrupt in an interactive shell; a test run started from a
    # script inherits SIGINT ignored (and so would this child), and the ":int" points would not fire.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.pop("KOFF_FAULT", None)
    if fault:
        os.environ["KOFF_FAULT"] = fault
    from koff.cli import main as koff_main

    try:
        code = koff_main(argv)
    except SystemExit as e:
        code = e.code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)


def koff(argv: list[str], log: Path, fault: str | None = None, cwd: Path | None = None) -> tuple[int, str]:
    """Run `koff ARGV` in a process of its own; (exit code, negative for a signal; its output)."""
    log.parent.mkdir(exist_ok=True)
    p = _context().Process(target=_child, args=([str(a) for a in argv], fault, str(log), cwd and str(cwd)))
    p.start()
    p.join(600)
    assert p.exitcode is not None, f"koff {argv} hung"
    return p.exitcode, log.read_text(errors="replace")

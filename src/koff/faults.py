"""Fault injection for crash tests: `KOFF_FAULT=<point>` makes the process die at that point as a
SIGKILL would (no cleanup, no exception handlers, no atexit).

Points are named where koff writes: `train.step.N` (after optimizer step N and any checkpoint
due there), `artifact.before_rename`, ... Unset (the normal case) it costs one environment lookup.
"""

from __future__ import annotations

import os

EXIT_CODE = 137
"""What a shell reports for a SIGKILLed process (128 + 9)."""


def point(name: str) -> None:
    """Die here if KOFF_FAULT names this point."""
    if os.environ.get("KOFF_FAULT") == name:
        os._exit(EXIT_CODE)

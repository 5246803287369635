"""Fault injection for crash tests: `KOFF_FAULT=<point>` makes the process die at that point by
SIGKILL (no cleanup, no exception handlers, no atexit, unflushed buffers lost).

`KOFF_FAULT=<point>#<n>` dies at the n-th time the point is reached (a point reached once per
trained model, e.g. `train.step.2` in a run and then in its reference); `KOFF_FAULT=<point>:int`
sends SIGINT instead (a Ctrl-C arriving exactly there); `:term`, `:usr1` and `:usr2` send SIGTERM /
SIGUSR1 / SIGUSR2 (a scheduler's preemption notice arriving there; USR2 is submitit's). `KOFF_FAULT_RANK=R` limits the fault to the
process of rank R in a multi-process launch (the others never see it). Points are named where koff writes:
`train.step.N` (after optimizer step N and any checkpoint due there), `output.created` (an
output's temporary folder made), `output.staged` (a new output complete in its temporary folder),
`output.exchanged` (swapped in, the old one not yet removed), `add_domain.staged` /
`add_domain.swapped`, `checkpoint.staged`, `run.written`, `decompose.publish` /
`decompose.published` (see the callers). Unset (the normal case)
it costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

EXIT_CODE = 137
"""What a shell reports for a SIGKILLed process (128 + 9)."""

_hits: dict[str, int] = {}


def point(name: str) -> None:
    """Die here (or be interrupted) if KOFF_FAULT names this point."""
    spec = os.environ.get("KOFF_FAULT")
    if not spec:
        return
    target, _, how = spec.partition(":")
    target, _, nth = target.partition("#")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != (int(nth) if nth else 1):
        return
    rank = os.environ.get("KOFF_FAULT_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    signals = {"int": signal.SIGINT, "term": signal.SIGTERM, "usr1": signal.SIGUSR1, "usr2": signal.SIGUSR2}
    if how in signals:
        os.kill(os.getpid(), signals[how])
        return
    os.kill(os.getpid(), signal.SIGKILL)
    os._exit(EXIT_CODE)  # pragma: no cover - where SIGKILL cannot be sent to oneself

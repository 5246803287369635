"""Stopping cleanly when a scheduler asks: SIGTERM / SIGUSR1 finish the step, checkpoint, exit 75.

SLURM (at the end of a time limit, on preemption, on `scancel --signal`), Kubernetes and spot
instances send SIGTERM (SLURM's `--signal=USR1@120` sends SIGUSR1 ahead of it) and kill the
process after a grace period. While `handle_signals()` is active, such a signal only sets a flag;
the training loop looks at it at every step boundary (`stop_requested`), so the step in flight
completes, a checkpoint is written, and `Preempted` is raised. The command line turns that into
exit status `EXIT_PREEMPTED`. A second signal of the same kind restores the default action and
re-raises it: whoever sends two means it.

In a multi-process launch the signal may reach only some ranks (or reach them between two
different steps), so the flag is all-reduced (max) at each step boundary: every rank sees the same
answer at the same step, all of them checkpoint that step together, and none is left waiting in a
collective the others never enter.

Exit status 75 is `EX_TEMPFAIL` of sysexits.h, "a temporary failure; the user is invited to retry":
it is what a requeue wrapper should act on. It is deliberately not 143 (128 + SIGTERM), which is
what a shell reports when the signal killed the process before koff could save (e.g. the grace
period ran out, or the signal came before training started): a wrapper can tell "stopped cleanly,
resume me" from "killed". Resume with the same command line plus `--resume auto`.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator

from koff.core.errors import KoffError

EXIT_PREEMPTED = 75
"""Exit status after a signal-triggered checkpoint (sysexits EX_TEMPFAIL: retry later)."""

SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)
"""The signals that ask a training command to checkpoint and stop."""

_received: list[int] = []
_active = 0


class Preempted(KoffError):
    """Training stopped on a signal after writing a checkpoint (or with nothing to save)."""

    def __init__(self, message: str, signum: int | None = None, saved: bool = True):
        super().__init__(message)
        self.signum = signum
        self.saved = saved


def _handler(signum, frame) -> None:
    if signum in _received:  # the second one: do what the signal would have done
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
        return
    _received.append(signum)
    name = signal.Signals(signum).name
    print(f"koff: {name} received: finishing the current step, then saving a checkpoint and exiting "
          f"({EXIT_PREEMPTED}); send it again to stop at once", file=sys.stderr, flush=True)


@contextlib.contextmanager
def handle_signals(signals: tuple[int, ...] = SIGNALS) -> Iterator[None]:
    """Within the block, `signals` (SIGTERM and SIGUSR1) request a clean stop instead of killing the
    process. Nested uses share one state; the previous handlers come back at the end of the outermost."""
    global _active
    import threading

    if threading.current_thread() is not threading.main_thread():  # signals are a main-thread affair
        yield
        return
    previous = {}
    if not _active:
        _received.clear()
        for s in signals:
            previous[s] = signal.signal(s, _handler)
    _active += 1
    try:
        yield
    finally:
        _active -= 1
        for s, h in previous.items():
            signal.signal(s, h)


def received() -> int | None:
    """The first stop signal received in this process (None: none)."""
    return _received[0] if _received else None


def request_stop(signum: int = signal.SIGTERM) -> None:
    """Ask for a stop as a signal would (for schedulers that call in-process, e.g. submitit's
    checkpoint hook, and for tests)."""
    if signum not in _received:
        _received.append(signum)


def stop_requested(runtime=None) -> bool:
    """Whether to stop at this step boundary: this process got a stop signal, or (in a launch)
    any process did. Collective: in a launch every rank must call it at the same boundary."""
    local = bool(_received)
    if runtime is None or not runtime.distributed:
        return local
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return local
    device = runtime.device if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def reset() -> None:
    """Forget received signals (a process that goes on to other work after a stop)."""
    _received.clear()


__all__ = ["EXIT_PREEMPTED", "Preempted", "SIGNALS", "handle_signals", "received", "request_stop", "reset",
           "stop_requested"]

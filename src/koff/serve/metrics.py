"""The server's counters, gauges and histograms, rendered in the Prometheus text format (0.0.4).

A few dozen series do not need a client library: every update takes one lock, and `render`
writes the exposition format by hand.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


@dataclass
class _Family:
    kind: str
    help: str
    buckets: tuple[float, ...] = ()
    values: dict = field(default_factory=dict)
    """labels (sorted tuple of pairs) -> value (counter / gauge) or [bucket counts..., sum, count]."""


class Metrics:
    """A registry of metric families; every method is thread-safe."""

    def __init__(self, prefix: str = "koff_"):
        self.prefix = prefix
        self._lock = threading.Lock()
        self._families: dict[str, _Family] = {}
        self._gauge_fns: dict[str, Callable[[], dict[tuple, float]]] = {}

    def counter(self, name: str, help: str) -> None:
        self._families[name] = _Family("counter", help)

    def gauge(self, name: str, help: str, fn: Callable[[], dict[tuple, float]] | None = None) -> None:
        """A gauge; with `fn`, its series are read from fn() (labels tuple -> value) at each render."""
        self._families[name] = _Family("gauge", help)
        if fn is not None:
            self._gauge_fns[name] = fn

    def histogram(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self._families[name] = _Family("histogram", help, tuple(sorted(buckets)))

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            fam = self._families[name]
            fam.values[key] = fam.values.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._families[name].values[tuple(sorted(labels.items()))] = float(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            fam = self._families[name]
            row = fam.values.setdefault(key, [0] * len(fam.buckets) + [0.0, 0])
            for i, b in enumerate(fam.buckets):
                if value <= b:
                    row[i] += 1
            row[-2] += value
            row[-1] += 1

    def value(self, name: str, **labels: str) -> float:
        """A counter's or gauge's current value (0 if never set); a histogram's count."""
        with self._lock:
            v = self._families[name].values.get(tuple(sorted(labels.items())), 0.0)
        return float(v[-1]) if isinstance(v, list) else float(v)

    def render(self) -> str:
        computed = {name: fn() for name, fn in self._gauge_fns.items()}
        lines = []
        with self._lock:
            for name, fam in self._families.items():
                full = self.prefix + name
                lines.append(f"# HELP {full} {fam.help}")
                lines.append(f"# TYPE {full} {fam.kind}")
                values = computed[name] if name in computed else fam.values
                for key, v in sorted(values.items()):
                    if fam.kind == "histogram":
                        for b, c in zip(fam.buckets, v):
                            lines.append(f"{full}_bucket{_labels(key + (('le', _num(b)),))} {c}")
                        lines.append(f"{full}_bucket{_labels(key + (('le', '+Inf'),))} {v[-1]}")
                        lines.append(f"{full}_sum{_labels(key)} {_num(v[-2])}")
                        lines.append(f"{full}_count{_labels(key)} {v[-1]}")
                    else:
                        lines.append(f"{full}{_labels(key)} {_num(v)}")
        return "\n".join(lines) + "\n"


def _labels(pairs: tuple) -> str:
    if not pairs:
        return ""
    body = ",".join(f'{k}="{_escape(str(v))}"' for k, v in pairs)
    return "{" + body + "}"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    if isinstance(x, float) and math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(float(x))


def server_metrics(queue_depth: Callable[[], int], running: Callable[[], int],
                   memories: Callable[[], list[str]]) -> Metrics:
    """The families koff serve exports; the gauges read the engine's state when scraped."""
    m = Metrics()
    m.counter("requests_total", "HTTP requests by endpoint and status code")
    m.histogram("request_seconds", "time from request to last byte, successful generations", LATENCY_BUCKETS)
    m.histogram("time_to_first_token_seconds", "time from request to the first generated token", LATENCY_BUCKETS)
    m.counter("prompt_tokens_total", "prompt tokens prefilled, by memory")
    m.counter("completion_tokens_total", "tokens generated, by memory")
    m.histogram("batch_rows", "rows (requests) in each decoding step", BATCH_BUCKETS)
    m.histogram("prefill_rows", "requests admitted together in one prefill", BATCH_BUCKETS)
    m.counter("decode_steps_total", "decoding steps run")
    m.counter("auto_routed_total", "requests with model 'auto', by the memory chosen")
    m.counter("memory_loads_total", "memory load requests by result")
    m.gauge("queue_depth", "requests waiting for a batch slot", lambda: {(): float(queue_depth())})
    m.gauge("running_requests", "requests in the running batch", lambda: {(): float(running())})
    m.gauge("memories_loaded", "memories that requests can name", lambda: {(): float(len(memories()))})
    m.gauge("memory_loaded", "1 for each memory that requests can name",
            lambda: {(("memory", n),): 1.0 for n in memories()})
    return m

"""The batching engine: one scheduler thread owns the model and runs every request.

Requests (`Job`s) wait in a bounded queue. Between two decoding steps the scheduler thread

  1. applies memory loads and unloads (so a memory never changes under a running step),
  2. admits waiting jobs into free batch slots (continuous batching): it prefills them together
     (each row with its own memory: LoRA rows selected per row, KV prefix in front of the row's
     cache), samples their first token and merges their cache into the running batch,
  3. runs one decoding step for every running row, samples each row's next token with that row's
     own settings and seeded generator, and drops finished rows from the batch.

The routing of the running batch (`KoffModel.route` -> a `Call`) is rebuilt on this thread
whenever its rows change and passed to every forward; nothing about routing is stored on the
model. An unloaded memory stops being nameable at once but is removed from the model only when
the last accepted request that uses it has finished, so running requests are never disturbed.

The cache of the running batch is left-padded: a `[B, C]` mask marks each row's real slots (its
memory prefix, prompt and generated tokens) and each row carries its own next position, so rows
admitted at different times, with prefixes of different lengths, share one cache. Merging needs
plain `DynamicLayer` caches; for models with sliding-window layers the engine batches statically
(admits a new group only once the batch is empty), which `batching="static"` also selects.
"""

from __future__ import annotations

import copy
import logging
import math
import secrets
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from koff.core.compat.transformers import cache_kwarg, is_plain_dynamic_cache
from koff.core.errors import ServeError
from koff.core.fields import short
from koff.model.koff_model import KoffModel
from koff.model.memory import Call, routed
from koff.serve import routing as router
from koff.serve.loading import StoredMemory
from koff.serve.metrics import Metrics
from koff.serve.text import TextStream

AUTO = "auto"
"""The model name that asks the router to pick a memory."""
BATCHING = ("continuous", "static")
log = logging.getLogger("koff.serve")


class QueueFull(ServeError):
    """The waiting queue is full; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class UnknownMemory(ServeError, KeyError):
    """A request named a memory that is not loaded."""

    def __init__(self, name: str, available: list[str]):
        super().__init__(f"no memory named {short(name)}; available: {', '.join(available) or '(none)'}")
        self.name = name
        self.available = available

    def __str__(self) -> str:
        return self.args[0]


class MemoryConflict(ServeError):
    """A memory of that name is loaded (or still finishing requests)."""


@dataclass(frozen=True)
class Sampling:
    """How one job picks its tokens."""

    max_tokens: int
    temperature: float = 0.0
    """0: greedy."""
    top_p: float = 1.0
    seed: int | None = None
    """Seeds this job's own generator, so its sample does not depend on what it is batched with."""
    stop: tuple[str, ...] = ()


@dataclass
class Event:
    """What a job reports, in order: one "start" (with the memory it runs with), "text" pieces,
    then one "end" (finish_reason "stop" or "length", token counts) or one "error"."""

    kind: str
    text: str = ""
    memory: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: int = 0


@dataclass(eq=False)
class Job:
    """One generation: prompt token ids, a memory (a name, None for the bare backbone, or AUTO),
    how to sample, and where its events go (`emit` is called on the scheduler thread)."""

    prompt: list[int]
    memory: str | None
    sampling: Sampling
    emit: Callable[[Event], None]
    route_prompt: list[int] | None = None
    """What the router scores for AUTO (default: the prompt)."""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    """Set from any thread (the client went away); the scheduler drops the job at its next step."""

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 16
    """Rows decoded together at most."""
    max_queue: int = 64
    """Jobs waiting for a slot at most; beyond, `submit` raises QueueFull."""
    batching: str = "continuous"
    prefill_tokens: int = 4096
    """Padded prompt tokens one prefill may take (a single longer prompt is still admitted alone)."""
    router: str = "classifier"
    """How AUTO picks a memory (`koff.serve.routing`): "classifier", or "loss"."""
    router_tokens: int = 128
    """Prompt tokens the router scores."""

    def __post_init__(self):
        if self.router not in router.ROUTERS:
            raise ServeError(f"router: expected one of {router.ROUTERS}, got {self.router!r}")
        if self.batching not in BATCHING:
            raise ServeError(f"batching: expected one of {BATCHING}, got {self.batching!r}")
        if self.max_batch < 1 or self.max_queue < 1:
            raise ServeError("max_batch and max_queue must be at least 1")


@dataclass(eq=False)
class _Row:
    job: Job
    memory: str | None
    text: TextStream
    generator: torch.Generator | None
    started: float
    generated: int = 0
    finish: str | None = None


@dataclass
class _Batch:
    rows: list[_Row]
    cache: Any
    """The rows' transformers cache (a DynamicCache; Any: its layers' API is transformers')."""
    mask: torch.Tensor
    """[B, C] bool: real slots of each row's cache (prefix, prompt, generated)."""
    pos: torch.Tensor
    """[B]: position of the token each row feeds next."""
    last: torch.Tensor
    """[B]: the token each row feeds next."""
    call: Call


class Engine:
    """Continuous batching of generation jobs over one KoffModel (see the module docstring)."""

    def __init__(self, km: KoffModel, tokenizer, config: EngineConfig = EngineConfig(), metrics: Metrics | None = None):
        self.km = km
        self.config = config
        self.metrics = metrics
        self._tok = copy.deepcopy(tokenizer)  # decoding here never shares a tokenizer with request threads
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or 0)
        self.device = next(km.model.parameters()).device
        self.mergeable = _mergeable_cache(km)
        if config.batching == "continuous" and not self.mergeable:
            log.warning("this model has sliding-window cache layers: batching statically")
        self._keep_kwarg = "logits_to_keep" in _forward_params(km.model)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[Job] = deque()
        self._commands: deque[tuple[Callable, Future]] = deque()
        self._memories: dict[str, dict] = {}
        self._draining: set[str] = set()
        self._inflight: Counter = Counter()
        self._counts: dict[str, torch.Tensor] = {}  # training-text token counts per memory, for the classifier
        self._classifier: router.TokenClassifier | None = None
        self._batch: _Batch | None = None
        self._running = 0
        self._job_seconds = 5.0  # running mean of a job's time in the batch, for Retry-After
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.max_rows_seen = 0

    # -- any thread --------------------------------------------------------------------------------
    def memory_names(self) -> list[str]:
        with self._lock:
            return sorted(self._memories)

    def memories(self) -> dict[str, dict]:
        """name -> what is known about each nameable memory (with the requests using it)."""
        with self._lock:
            return {n: {**info, "requests": self._inflight.get(n, 0)} for n, info in sorted(self._memories.items())}

    def prefix_tokens(self, name: str | None) -> int:
        """KV prefix length of a memory (for AUTO: the longest; for None and unknown names: 0)."""
        with self._lock:
            if name == AUTO:
                return max((i.get("kv_tokens", 0) for i in self._memories.values()), default=0)
            return self._memories.get(name, {}).get("kv_tokens", 0) if name else 0

    def router_method(self) -> str:
        """What AUTO uses now: the classifier while at least one nameable memory has training text
        (it then chooses among those memories only), else the loss router."""
        with self._lock:
            names = set(self._memories)
        if self.config.router == "classifier" and names & set(self._counts):
            return "classifier"
        return "loss"

    def queue_depth(self) -> int:
        with self._lock:
            return len(self._waiting)

    def running(self) -> int:
        return self._running

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs (all or none). Raises UnknownMemory or QueueFull."""
        with self._lock:
            if self._stop:
                raise QueueFull("the server is shutting down", retry_after=5)
            for job in jobs:
                if job.memory == AUTO:
                    if not self._memories:
                        raise UnknownMemory(AUTO, [])
                elif job.memory is not None and job.memory not in self._memories:
                    raise UnknownMemory(job.memory, sorted(self._memories))
            if len(self._waiting) + len(jobs) > self.config.max_queue:
                wait = self._job_seconds * (len(self._waiting) + len(jobs)) / self.config.max_batch
                raise QueueFull(f"the queue is full ({len(self._waiting)} requests waiting, at most "
                                f"{self.config.max_queue}); retry later", retry_after=max(1, math.ceil(wait)))
            for job in jobs:
                if job.memory not in (None, AUTO):
                    self._inflight[job.memory] += 1
            self._waiting.extend(jobs)
            self._wake.notify()

    def install(self, stored: StoredMemory) -> Future:
        """Add a memory between two steps; the future gives its info (or raises MemoryConflict,
        or the validation error of its tensors)."""
        return self._schedule(lambda: self._install(stored))

    def unload(self, name: str) -> dict:
        """Stop accepting requests for `name`; it is removed once its accepted requests finish."""
        with self._lock:
            if name not in self._memories:
                raise UnknownMemory(name, sorted(self._memories))
            del self._memories[name]
            self._draining.add(name)
            pending = self._inflight.get(name, 0)
            self._wake.notify()
        return {"name": name, "status": "unloading" if pending else "unloaded", "requests": pending}

    def start(self, memories: Sequence[StoredMemory] = ()) -> Engine:
        for stored in memories:
            self._install(stored)
        self._thread = threading.Thread(target=self._loop, name="koff-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the scheduler; jobs not finished get an error event (status 503)."""
        with self._lock:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the scheduler thread ----------------------------------------------------------------------
    def _schedule(self, fn: Callable) -> Future:
        fut: Future = Future()
        with self._lock:
            if self._stop:
                fut.set_exception(ServeError("the server is shutting down"))
                return fut
            self._commands.append((fn, fut))
            self._wake.notify()
        return fut

    def _install(self, stored: StoredMemory) -> dict:
        name = stored.name
        with self._lock:
            busy = name in self._memories or name in self._draining
        if busy or name in self.km.memory_names:
            state = "still finishing requests" if name in self._draining else "loaded"
            raise MemoryConflict(f"a memory named {name!r} is {state}; unload it first or load under another name")
        self.km.install_memory(name, stored.states)
        info = {"name": name, "source": stored.source, "loaded_at": int(time.time()), **stored.info,
                "router_text": list(stored.train_files) if stored.token_counts is not None else None}
        with self._lock:
            self._memories[name] = info
            if stored.token_counts is not None:
                self._counts[name] = stored.token_counts
            self._classifier = None
        return info

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stop or self._commands or self._waiting or self._batch is not None
                           or self._drained()):
                    self._wake.wait()
                if self._stop:
                    break
                commands = list(self._commands)
                self._commands.clear()
            for fn, fut in commands:
                try:
                    fut.set_result(fn())
                except Exception as e:  # reported to whoever asked
                    fut.set_exception(e)
            try:
                self._remove_drained()
            except Exception:  # keeps serving; the memory stays installed but unnameable
                log.exception("removing an unloaded memory failed")
            self._admit()
            batch = self._batch
            if batch is not None:
                try:
                    self._step(batch)
                except Exception as e:  # a bug or out of memory: fail the rows it hit, keep serving
                    log.exception("decoding step failed")
                    self._fail(batch.rows, f"internal error while decoding: {type(e).__name__}: {e}")
                    self._batch = None
                    self._running = 0
        self._shutdown()

    def _drained(self) -> list[str]:
        return [n for n in self._draining if self._inflight.get(n, 0) == 0]

    def _remove_drained(self) -> None:
        with self._lock:
            names = self._drained()
            self._draining.difference_update(names)
            for n in names:
                self._counts.pop(n, None)
                self._classifier = None
        for n in names:
            self.km.remove_memory(n)

    def _release(self, memory: str | None) -> None:
        if memory in (None, AUTO):
            return
        with self._lock:
            self._inflight[memory] -= 1
            if self._inflight[memory] <= 0:
                del self._inflight[memory]

    def _take(self) -> list[Job]:
        batch = self._batch
        if batch is not None and (self.config.batching == "static" or not self.mergeable):
            return []
        free = self.config.max_batch - (len(batch.rows) if batch else 0)
        take: list[Job] = []
        dropped: list[Job] = []
        with self._lock:
            width = 0
            while self._waiting and len(take) < free:
                job = self._waiting[0]
                if job.cancelled:
                    dropped.append(self._waiting.popleft())
                    continue
                w = max(width, len(job.prompt))
                if take and w * (len(take) + 1) > self.config.prefill_tokens:
                    break
                if take and not self.mergeable and (job.memory == AUTO or (job.memory, len(job.prompt))
                                                    != (take[0].memory, len(take[0].prompt))):
                    # A sliding window counts padded cache slots as positions, so a padded row would
                    # see fewer real tokens than alone: rows of such a model share a batch only when
                    # nothing needs padding (same memory, hence same prefix, and same prompt length).
                    break
                width = w
                take.append(self._waiting.popleft())
        for job in dropped:
            self._release(job.memory)
        return take

    def _admit(self) -> None:
        jobs = self._take()
        if not jobs:
            return
        names: list = [j.memory for j in jobs]  # AUTO entries become the router's choice
        try:
            self._resolve(jobs, names)
            now = time.monotonic()
            rows: list[_Row] = []
            for job, name in zip(jobs, names):
                if name is False:
                    continue
                s = job.sampling
                gen = None
                if s.temperature > 0:
                    gen = torch.Generator(device="cpu").manual_seed(
                        (s.seed if s.seed is not None else secrets.randbits(63)) % (1 << 64))
                rows.append(_Row(job, name, TextStream(self._tok, s.stop), gen, now))
                job.emit(Event("start", memory=name))
            if not rows:
                return
            new = self._prefill(rows)
            self._batch = new if self._batch is None else self._merge(self._batch, new)
            self._running = len(self._batch.rows)
        except Exception as e:  # a bug or out of memory: fail these jobs, keep the running batch
            log.exception("admitting requests failed")
            for job, name in zip(jobs, names):
                if name is not False:
                    job.emit(Event("error", text=f"internal error while admitting the request: "
                                                 f"{type(e).__name__}: {e}", status=500))
                    self._release(name)
            return
        if self._batch is not None:
            self._finish_rows(self._batch)

    def _resolve(self, jobs: list[Job], names: list) -> None:
        """Replace each AUTO in `names` by the router's choice (False: no memory left to choose)."""
        auto = [i for i, j in enumerate(jobs) if j.memory == AUTO]
        if not auto:
            return
        with self._lock:
            candidates = sorted(self._memories)
        if not candidates:
            for i in auto:
                jobs[i].emit(Event("error", text="no memory is loaded for model 'auto' to choose from", status=404))
                names[i] = False
            return
        prompts = [jobs[i].route_prompt or jobs[i].prompt for i in auto]
        if self.router_method() == "classifier":
            # a memory loaded without readable training text is not a candidate: falling back to the
            # loss router for every memory would cost the ones the classifier knows (100 % -> 47 %
            # on English in a probe); name such a memory explicitly instead
            with self._lock:
                counts = {n: self._counts[n] for n in candidates if n in self._counts}
            if self._classifier is None or self._classifier.names != sorted(counts):
                self._classifier = router.TokenClassifier.fit(counts)
            choices = [self._classifier.choose(p, self.config.router_tokens) for p in prompts]
        else:
            losses = router.token_losses(self.km, prompts, candidates, self.config.router_tokens)
            choices = [router.choose(loss, candidates) for loss in losses]
        for i, choice in zip(auto, choices):
            with self._lock:
                self._inflight[choice] += 1
            names[i] = choice
            if self.metrics:
                self.metrics.inc("auto_routed_total", memory=choice)

    def _forward(self, ids: torch.Tensor, call: Call, cache, attention: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        kwargs = {cache_kwarg(self.km.model): cache}
        if self._keep_kwarg:
            kwargs["logits_to_keep"] = 1
        with torch.no_grad(), routed(call):
            out = self.km.model(input_ids=ids, attention_mask=attention.long(), position_ids=positions,
                                use_cache=True, **kwargs)
        return out.logits[:, -1].float()

    def _prefill(self, rows: list[_Row]) -> _Batch:
        km, dev = self.km, self.device
        call = km.route([r.memory for r in rows], len(rows))
        prompts = [r.job.prompt for r in rows]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad] * (width - len(p)) + list(p) for p in prompts], device=dev)
        tmask = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts], device=dev)
        cache = km.prefix_cache(call.prefix)
        if call.prefix is not None:
            attention = torch.cat([call.prefix.mask.to(dev), tmask], dim=1)
            plen = call.prefix.lengths.to(dev)
        else:
            attention, plen = tmask, torch.zeros(len(rows), dtype=torch.long, device=dev)
        positions = plen[:, None] + (tmask.long().cumsum(-1) - 1).clamp(min=0)
        logits = self._forward(ids, call, cache, attention, positions)
        lengths = torch.tensor([len(p) for p in prompts], device=dev)
        batch = _Batch(rows, cache, attention, plen + lengths, torch.zeros(len(rows), dtype=torch.long, device=dev),
                       call)
        if self.metrics:
            self.metrics.observe("prefill_rows", len(rows))
            for r in rows:
                self.metrics.inc("prompt_tokens_total", len(r.job.prompt), memory=r.memory or "none")
        self._accept(batch, self._sample(logits, rows))
        return batch

    def _step(self, b: _Batch) -> None:
        attention = torch.cat([b.mask, torch.ones(len(b.rows), 1, dtype=torch.bool, device=self.device)], dim=1)
        logits = self._forward(b.last[:, None], b.call, b.cache, attention, b.pos[:, None])
        b.mask, b.pos = attention, b.pos + 1
        self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, len(b.rows))
        if self.metrics:
            self.metrics.observe("batch_rows", len(b.rows))
            self.metrics.inc("decode_steps_total")
        self._accept(b, self._sample(logits, b.rows))
        self._finish_rows(b)

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        out = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            s = row.job.sampling
            if s.temperature <= 0:
                continue
            probs = torch.softmax(logits[i] / s.temperature, dim=-1).cpu()
            if s.top_p < 1:
                p, order = probs.sort(descending=True)
                p[(p.cumsum(0) - p) >= s.top_p] = 0  # keep the smallest head whose mass reaches top_p
                probs = torch.zeros_like(probs).scatter_(0, order, p)
            out[i] = int(torch.multinomial(probs, 1, generator=row.generator))
        return out

    def _accept(self, batch: _Batch, tokens: list[int]) -> None:
        for row, t in zip(batch.rows, tokens):
            row.generated += 1
            if row.generated == 1 and self.metrics:
                self.metrics.observe("time_to_first_token_seconds", time.monotonic() - row.job.created)
            if self.eos is not None and t == self.eos:
                row.finish = "stop"
                continue
            piece = row.text.push(t)
            if piece:
                row.job.emit(Event("text", text=piece))
            if row.text.stopped:
                row.finish = "stop"
            elif row.generated >= row.job.sampling.max_tokens:
                row.finish = "length"
        batch.last = torch.tensor(tokens, device=self.device)

    def _finish_rows(self, b: _Batch) -> None:
        done = [i for i, r in enumerate(b.rows) if r.finish or r.job.cancelled]
        if not done:
            return
        now = time.monotonic()
        for i in done:
            row = b.rows[i]
            if not row.job.cancelled:
                tail = row.text.finish()
                if tail:
                    row.job.emit(Event("text", text=tail))
                row.job.emit(Event("end", memory=row.memory, finish_reason=row.finish,
                                   prompt_tokens=len(row.job.prompt), completion_tokens=row.generated))
            if self.metrics:
                self.metrics.inc("completion_tokens_total", row.generated, memory=row.memory or "none")
            self._job_seconds = 0.9 * self._job_seconds + 0.1 * (now - row.started)
            self._release(row.memory)
        gone = set(done)
        keep = [i for i in range(len(b.rows)) if i not in gone]
        if not keep:
            self._batch = None
            self._running = 0
            return
        idx = torch.tensor(keep, device=self.device)
        b.cache.batch_select_indices(idx)
        b.rows = [b.rows[i] for i in keep]
        b.mask, b.pos, b.last = b.mask[idx], b.pos[idx], b.last[idx]
        if self.mergeable:
            first = int(b.mask.any(0).long().argmax())  # columns every remaining row masks out
            if first > 0:
                for layer in b.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
                b.mask = b.mask[:, first:]
        b.call = self.km.route([r.memory for r in b.rows], len(b.rows))
        self._running = len(b.rows)

    def _merge(self, a: _Batch, b: _Batch) -> _Batch:
        from transformers import DynamicCache

        width = max(a.mask.shape[1], b.mask.shape[1])

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            n = width - t.shape[dim]
            if n == 0:
                return t
            shape = list(t.shape)
            shape[dim] = n
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        data = [(torch.cat([pad(la.keys, 2), pad(lb.keys, 2)]), torch.cat([pad(la.values, 2), pad(lb.values, 2)]))
                for la, lb in zip(a.cache.layers, b.cache.layers)]
        rows = a.rows + b.rows
        return _Batch(rows, DynamicCache(data, config=self.km.model.config),
                      torch.cat([pad(a.mask, 1), pad(b.mask, 1)]), torch.cat([a.pos, b.pos]),
                      torch.cat([a.last, b.last]), self.km.route([r.memory for r in rows], len(rows)))

    def _fail(self, rows: list[_Row], message: str, status: int = 500) -> None:
        for row in rows:
            try:
                row.job.emit(Event("error", text=message, status=status))
            finally:
                self._release(row.memory)

    def _shutdown(self) -> None:
        rows = self._batch.rows if self._batch is not None else []
        self._fail(rows, "the server is shutting down", status=503)
        self._batch = None
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
            commands = list(self._commands)
            self._commands.clear()
        for job in waiting:
            job.emit(Event("error", text="the server is shutting down", status=503))
            self._release(job.memory)
        for _, fut in commands:
            fut.set_exception(ServeError("the server is shutting down"))


def _mergeable_cache(km: KoffModel) -> bool:
    return is_plain_dynamic_cache(km.model.config)


def _forward_params(model) -> set[str]:
    import inspect

    return set(inspect.signature(type(model).forward).parameters)

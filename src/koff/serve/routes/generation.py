"""POST /v1/completions and /v1/chat/completions (OpenAI's; `stream` as server-sent events).

`model` names the memory. The handlers validate and tokenize on the event loop, hand one `Job` per
choice to the engine's thread, and read its events back from an asyncio queue; a client that
leaves, or a request past --request-timeout, frees its rows at once.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from koff.serve import api
from koff.serve.api import APIError, bad
from koff.serve.metrics import Metrics
from koff.serve.scheduler import AUTO, Engine, Event, Job, QueueFull, Sampling, UnknownMemory
from koff.serve.state import BACKBONE, CLIENT_CLOSED, ServeState, read_body, state, unknown_model

DISCONNECT_POLL_SECONDS = 0.25
"""How often a request waiting for its answer checks that its client is still there."""

router = APIRouter(prefix="/v1")


def memory_of(s: ServeState, name: str) -> str | None:
    """The memory a request's `model` names: None for the bare backbone, AUTO for the router."""
    if name == BACKBONE:
        return None
    if name == AUTO:
        if not s.engine.memory_names():
            raise APIError(404, "model 'auto' picks one of the loaded memories, and none is loaded",
                           param="model", code="model_not_found")
        return AUTO
    if name in s.engine.memory_names():
        return name
    raise unknown_model(name, s.engine)


def fit(s: ServeState, prompts: list[list[int]], memory: str | None, max_tokens: int | None, param: str) -> int:
    """max_tokens, checked against (or, when None, fitted to) the context left by each prompt."""
    context = s.context
    prefix = s.engine.prefix_tokens(memory)
    longest = max(len(p) for p in prompts)
    room = context - prefix - longest
    if room < 1:
        raise bad(f"{param}: {longest} tokens" + (f" after the memory's {prefix} prefix tokens" if prefix else "")
                  + f" leave no room in the context of {context} positions", param, code="context_length_exceeded")
    if max_tokens is None:
        return min(room, s.settings.max_tokens)
    if max_tokens > room:
        raise bad(f"{param}: {longest} tokens + {prefix} memory prefix tokens + max_tokens {max_tokens} = "
                  f"{longest + prefix + max_tokens} exceed the context of {context} positions; lower max_tokens",
                  "max_tokens", code="context_length_exceeded")
    return max_tokens


def sampling(req, max_tokens: int, stops: tuple[str, ...], choice: int) -> Sampling:
    """One choice's sampling settings (choice j of a seeded request gets seed + j)."""
    seed = None if req.seed is None else req.seed + choice
    return Sampling(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                    top_p=1.0 if req.top_p is None else req.top_p, seed=seed, stop=stops)


def _encode(s: ServeState, text: str) -> list[int]:
    return s.served.tokenizer(text, add_special_tokens=False)["input_ids"]


@router.post("/completions")
async def completions(request: Request):
    start = time.monotonic()
    s = state(request)
    req = api.validate(api.CompletionRequest, api.parse_body(await read_body(request, s.settings.max_body_bytes)))
    api.check_completion(req, s.limits)
    stops = api.stop_list(req.stop)
    prompts = api.prompt_list(req.prompt, s.limits)
    if len(prompts) * (req.n or 1) > s.limits.max_choices:
        raise bad(f"prompt x n: at most {s.limits.max_choices} completions per request, got "
                  f"{len(prompts) * (req.n or 1)}", "n")
    memory = memory_of(s, req.model)
    ids = [_encode(s, p) if isinstance(p, str) else list(p) for p in prompts]
    if any(not i for i in ids):
        raise bad("prompt: encodes to no tokens", "prompt")
    max_tokens = fit(s, ids, memory, req.max_tokens or s.settings.completion_default_tokens, "prompt")
    jobs = [Job(p, memory, sampling(req, max_tokens, stops, j), _noop) for p in ids for j in range(req.n or 1)]
    return await _respond(request, s.engine, s.metrics, jobs, req, "text_completion", start, s.settings.request_timeout)


@router.post("/chat/completions")
async def chat(request: Request):
    start = time.monotonic()
    s = state(request)
    tok = s.served.tokenizer
    req = api.validate(api.ChatRequest, api.parse_body(await read_body(request, s.settings.max_body_bytes)))
    max_tokens = api.check_chat(req, s.limits)
    stops = api.stop_list(req.stop)
    messages = api.chat_messages(req.messages)
    memory = memory_of(s, req.model)
    if not getattr(tok, "chat_template", None):
        raise bad("this model has no chat template; use /v1/completions", "messages", code="no_chat_template")
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # the template's own checks (e.g. roles must alternate)
        raise bad(f"messages: the chat template refused them ({type(e).__name__}: {e})", "messages") from None
    ids = _encode(s, text)
    if not ids:
        raise bad("messages: encode to no tokens", "messages")
    max_tokens = fit(s, [ids], memory, max_tokens, "messages")
    users = [m["content"] for m in messages if m["role"] == "user" and m["content"]]
    route = _encode(s, users[-1]) if users and memory == AUTO else None
    jobs = [Job(ids, memory, sampling(req, max_tokens, stops, j), _noop, route_prompt=route or None)
            for j in range(req.n or 1)]
    return await _respond(request, s.engine, s.metrics, jobs, req, "chat.completion", start, s.settings.request_timeout)


def _noop(event: Event) -> None:  # replaced by _respond before a job is submitted
    pass


async def _respond(request: Request, engine: Engine, metrics: Metrics, jobs: list[Job], req, kind: str,
                   start: float, timeout: float):
    """Submit the jobs (one per choice) and answer with their results, whole or streamed."""
    loop = asyncio.get_running_loop()
    deadline = start + timeout
    events: asyncio.Queue = asyncio.Queue()
    for i, job in enumerate(jobs):
        job.emit = _emitter(loop, events, i)
    try:
        engine.submit(jobs)
    except QueueFull as e:
        raise APIError(429, str(e), code="queue_full", type="rate_limit_error",
                       headers={"Retry-After": str(e.retry_after)}) from None
    except UnknownMemory as e:
        raise APIError(404, str(e), "model", code="model_not_found") from None
    ident = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        stream = _stream(jobs, events, kind, ident, created, req.model, req.n or 1, include_usage, metrics, start,
                         deadline)
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        results = await _collect_while_connected(request, jobs, events, deadline)
    finally:
        for job in jobs:
            job.cancel()  # no-op for finished jobs; frees the rows of a client gone or a request timed out
    memories = [r["memory"] for r in results]
    model = memories[0] if len(set(memories)) == 1 else req.model
    model = "none" if model is None else model
    choices = []
    for i, r in enumerate(results):
        choice = {"index": i, "finish_reason": r["finish_reason"], "logprobs": None}
        if kind == "chat.completion":
            choice["message"] = {"role": "assistant", "content": r["text"]}
        else:
            choice["text"] = r["text"]
        choices.append(choice)
    prompt_tokens = sum(r["prompt_tokens"] for r in _per_prompt(results, req))
    completion_tokens = sum(r["completion_tokens"] for r in results)
    metrics.observe("request_seconds", time.monotonic() - start)
    body = {"id": ident, "object": kind, "created": created, "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}
    return JSONResponse(body, headers={"X-Koff-Memory": ",".join("none" if m is None else m for m in memories)})


async def _collect_while_connected(request: Request, jobs: list[Job], events: asyncio.Queue,
                                   deadline: float) -> list[dict]:
    """The jobs' results; stops early (and the caller frees their rows) when the client disconnects
    or the deadline passes, since nobody would read the answer."""
    collect = asyncio.ensure_future(_collect(jobs, events))
    try:
        while True:
            done, _ = await asyncio.wait({collect}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return collect.result()
            if await request.is_disconnected():
                raise APIError(CLIENT_CLOSED, "the client closed the connection before the answer",
                               code="client_closed_request")
            if time.monotonic() > deadline:
                raise APIError(504, "the request ran past this server's time limit (--request-timeout)",
                               code="request_timeout")
    finally:
        collect.cancel()


def _per_prompt(results: list[dict], req) -> list[dict]:
    """One result per distinct prompt (the n choices of a prompt share its tokens)."""
    n = req.n or 1
    return results[::n]


def _emitter(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int):
    def emit(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, (index, event))
        except RuntimeError:  # the event loop is closed: the server is stopping
            pass

    return emit


async def _collect(jobs: list[Job], events: asyncio.Queue) -> list[dict]:
    results = [{"text": "", "memory": None, "finish_reason": None, "prompt_tokens": 0, "completion_tokens": 0}
               for _ in jobs]
    pending = len(jobs)
    while pending:
        i, ev = await events.get()
        r = results[i]
        if ev.kind == "start":
            r["memory"] = ev.memory
        elif ev.kind == "text":
            r["text"] += ev.text
        elif ev.kind == "end":
            r.update(finish_reason=ev.finish_reason, prompt_tokens=ev.prompt_tokens,
                     completion_tokens=ev.completion_tokens, memory=ev.memory)
            pending -= 1
        elif ev.kind == "error":
            raise APIError(ev.status or 500, ev.text, code="generation_failed" if ev.status >= 500 else None)
    return results


async def _stream(jobs: list[Job], events: asyncio.Queue, kind: str, ident: str, created: int, requested: str,
                  n_per_prompt: int, include_usage: bool, metrics: Metrics, start: float, deadline: float):
    chat = kind == "chat.completion"
    obj = "chat.completion.chunk" if chat else "text_completion"
    memory: dict[int, str] = {}
    usage = {"prompt_tokens": 0, "completion_tokens": 0}

    def chunk(i: int, delta: str | None, finish: str | None = None, role: bool = False) -> str:
        if chat:
            d = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
            choice = {"index": i, "delta": d, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": i, "text": delta or "", "finish_reason": finish, "logprobs": None}
        body = {"id": ident, "object": obj, "created": created, "model": memory.get(i, requested), "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"

    pending = len(jobs)
    try:
        while pending:
            try:
                if time.monotonic() > deadline:  # events may keep coming: check before waiting for one
                    raise TimeoutError
                i, ev = await asyncio.wait_for(events.get(), timeout=max(deadline - time.monotonic(), 0.001))
            except TimeoutError:
                err = APIError(504, "the request ran past this server's time limit (--request-timeout)",
                               code="request_timeout")
                yield f"data: {json.dumps(err.body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            if ev.kind == "start":
                memory[i] = "none" if ev.memory is None else ev.memory
                if chat:
                    yield chunk(i, None, role=True)
            elif ev.kind == "text":
                yield chunk(i, ev.text)
            elif ev.kind == "end":
                pending -= 1
                if i % n_per_prompt == 0:
                    usage["prompt_tokens"] += ev.prompt_tokens
                usage["completion_tokens"] += ev.completion_tokens
                yield chunk(i, None, finish=ev.finish_reason)
            elif ev.kind == "error":
                err = APIError(ev.status or 500, ev.text, code="generation_failed")
                yield f"data: {json.dumps(err.body())}\n\n"
                yield "data: [DONE]\n\n"  # the stream is over either way: clients wait for this
                return
        if include_usage:
            body = {"id": ident, "object": obj, "created": created, "model": memory.get(0, requested), "choices": [],
                    "usage": {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}}
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
        metrics.observe("request_seconds", time.monotonic() - start)
    finally:
        for job in jobs:
            job.cancel()  # the client went away (or the stream ended): free the rows

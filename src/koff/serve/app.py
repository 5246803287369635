"""The HTTP side of `koff serve`: an OpenAI-compatible FastAPI app in front of the engine.

    GET  /health                   liveness + what is loaded (no key needed)
    GET  /metrics                  Prometheus text format (no key needed)
    GET  /v1/models                one entry per memory, plus "none" (the bare backbone) and "auto"
    POST /v1/completions           OpenAI completions (stream: server-sent events)
    POST /v1/chat/completions      OpenAI chat completions, through the model's chat template
    GET  /v1/memories              the loaded memories, with their sources and running requests
    POST /v1/memories              {"path": FOLDER, "name"?: NAME}: load a memory folder
    DELETE /v1/memories/NAME       stop accepting NAME; removed once its requests finish

`model` names the memory. Handlers validate and tokenize on the event loop, hand `Job`s to the
engine's thread, and read its events back from an asyncio queue. No request can reach the model
with an invalid field, and no input yields a 5xx: every mistake is a 4xx with OpenAI's error
object.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from koff.core.errors import KoffError
from koff.core.fields import short
from koff.serve import api
from koff.serve.api import APIError, bad
from koff.serve.loading import Served, fit_router, read_memory_folder
from koff.serve.metrics import Metrics
from koff.serve.scheduler import AUTO, Engine, Event, Job, MemoryConflict, QueueFull, Sampling, UnknownMemory

BACKBONE = "none"
"""The model name of the bare backbone (no memory)."""
log = logging.getLogger("koff.serve")


SWAP_PAGE = (resources.files("koff.serve") / "static" / "index.html").read_text(encoding="utf-8")
"""GET /: a prompt, the loaded memories as checkboxes, each chosen memory's completion streamed side
by side (plain HTML + JS, no external assets)."""
CLIENT_CLOSED = 499
"""The status logged and counted for a request whose client left before the answer (nginx's code;
nobody receives it)."""
DISCONNECT_POLL_SECONDS = 0.25
"""How often a request waiting for its answer checks that its client is still there."""


@dataclass(frozen=True)
class AppSettings:
    api_key: str | None = None
    max_tokens: int = 1024
    """The most tokens one request may generate."""
    max_context: int | None = None
    """Cap on prompt + prefix + generated positions (default: the model's)."""
    max_body_bytes: int = 1 << 20
    memory_dirs: tuple[Path, ...] = ()
    """Memory folders may be loaded only from below these (empty: from anywhere)."""
    completion_default_tokens: int = 16
    """max_tokens of a completion that gives none (OpenAI's default)."""
    request_timeout: float = 600.0
    """Seconds a request may run, queueing included: then it is stopped and answered 504 (a stream
    gets an error event)."""


def create_app(engine: Engine, served: Served, settings: AppSettings, metrics: Metrics) -> FastAPI:
    """The FastAPI app serving `engine` (already started)."""
    tok = served.tokenizer
    context = min(served.context, settings.max_context or served.context)
    vocab = served.km.model.get_input_embeddings().num_embeddings
    limits = api.Limits(max_tokens=settings.max_tokens, context=context, vocab=vocab,
                        max_choices=max(1, min(16, engine.config.max_queue)))
    created = int(time.time())
    app = FastAPI(title="koff serve", docs_url=None, redoc_url=None, openapi_url=None)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_auth(settings.api_key))])

    # -- errors: always OpenAI's shape ---------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        err = APIError(e.status_code, message.get(e.status_code, str(e.detail)), code=code)
        return JSONResponse(err.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": ("body",), "msg": "invalid request"}
        err = bad(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}")
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):  # a bug, never the client's input
        log.exception("unhandled error on %s", request.url.path)
        err = APIError(500, f"internal server error ({type(e).__name__})", code="internal_error")
        return JSONResponse(err.body(), status_code=500)

    app.add_middleware(_CountRequests, metrics=metrics)

    # -- plain endpoints ---------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    async def swap_page():
        # the page holds no data and no key: it calls /v1 from the browser like any other client
        return HTMLResponse(SWAP_PAGE)

    @app.get("/health")
    async def health():
        body = {"status": "ok" if engine.alive else "stopped", "backbone": served.backbone.kind,
                "memories": engine.memory_names(), "running": engine.running(), "queued": engine.queue_depth()}
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_entries() -> list[dict]:
        entries = [{"id": name, "object": "model", "created": info["loaded_at"], "owned_by": "koff",
                    "koff": {"kind": "memory", **{k: v for k, v in info.items() if k != "name"}}}
                   for name, info in engine.memories().items()]
        entries.append({"id": BACKBONE, "object": "model", "created": created, "owned_by": "koff",
                        "koff": {"kind": "backbone", "source": str(served.backbone.path)}})
        if entries[:-1]:
            entries.append({"id": AUTO, "object": "model", "created": created, "owned_by": "koff",
                            "koff": {"kind": "router", "method": engine.router_method()}})
        return entries

    @v1.get("/models")
    async def list_models():
        return {"object": "list", "data": model_entries()}

    @v1.get("/models/{name}")
    async def get_model(name: str):
        for entry in model_entries():
            if entry["id"] == name:
                return entry
        raise _unknown_model(name, engine)

    # -- generation --------------------------------------------------------------------------------
    def memory_of(name: str) -> str | None:
        if name == BACKBONE:
            return None
        if name == AUTO:
            if not engine.memory_names():
                raise APIError(404, "model 'auto' picks one of the loaded memories, and none is loaded",
                               param="model", code="model_not_found")
            return AUTO
        if name in engine.memory_names():
            return name
        raise _unknown_model(name, engine)

    def fit(prompts: list[list[int]], memory: str | None, max_tokens: int | None, param: str) -> int:
        """max_tokens, checked against (or, when None, fitted to) the context left by each prompt."""
        prefix = engine.prefix_tokens(memory)
        longest = max(len(p) for p in prompts)
        room = context - prefix - longest
        if room < 1:
            raise bad(f"{param}: {longest} tokens" + (f" after the memory's {prefix} prefix tokens" if prefix else "")
                      + f" leave no room in the context of {context} positions", param, code="context_length_exceeded")
        if max_tokens is None:
            return min(room, settings.max_tokens)
        if max_tokens > room:
            raise bad(f"{param}: {longest} tokens + {prefix} memory prefix tokens + max_tokens {max_tokens} = "
                      f"{longest + prefix + max_tokens} exceed the context of {context} positions; lower max_tokens",
                      "max_tokens", code="context_length_exceeded")
        return max_tokens

    def sampling(req, max_tokens: int, stops: tuple[str, ...], choice: int) -> Sampling:
        seed = None if req.seed is None else req.seed + choice
        return Sampling(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                        top_p=1.0 if req.top_p is None else req.top_p, seed=seed, stop=stops)

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    @v1.post("/completions")
    async def completions(request: Request):
        start = time.monotonic()
        req = api.validate(api.CompletionRequest, api.parse_body(await _read_body(request, settings.max_body_bytes)))
        api.check_completion(req, limits)
        stops = api.stop_list(req.stop)
        prompts = api.prompt_list(req.prompt, limits)
        if len(prompts) * (req.n or 1) > limits.max_choices:
            raise bad(f"prompt x n: at most {limits.max_choices} completions per request, got "
                      f"{len(prompts) * (req.n or 1)}", "n")
        memory = memory_of(req.model)
        ids = [encode(p) if isinstance(p, str) else list(p) for p in prompts]
        if any(not i for i in ids):
            raise bad("prompt: encodes to no tokens", "prompt")
        max_tokens = fit(ids, memory, req.max_tokens or settings.completion_default_tokens, "prompt")
        jobs = [Job(p, memory, sampling(req, max_tokens, stops, j), _noop)
                for p in ids for j in range(req.n or 1)]
        return await _respond(request, engine, metrics, jobs, req, "text_completion", start,
                              settings.request_timeout)

    @v1.post("/chat/completions")
    async def chat(request: Request):
        start = time.monotonic()
        req = api.validate(api.ChatRequest, api.parse_body(await _read_body(request, settings.max_body_bytes)))
        max_tokens = api.check_chat(req, limits)
        stops = api.stop_list(req.stop)
        messages = api.chat_messages(req.messages)
        memory = memory_of(req.model)
        if not getattr(tok, "chat_template", None):
            raise bad("this model has no chat template; use /v1/completions", "messages", code="no_chat_template")
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # the template's own checks (e.g. roles must alternate)
            raise bad(f"messages: the chat template refused them ({type(e).__name__}: {e})", "messages") from None
        ids = encode(text)
        if not ids:
            raise bad("messages: encode to no tokens", "messages")
        max_tokens = fit([ids], memory, max_tokens, "messages")
        users = [m["content"] for m in messages if m["role"] == "user" and m["content"]]
        route = encode(users[-1]) if users and memory == AUTO else None
        jobs = [Job(ids, memory, sampling(req, max_tokens, stops, j), _noop, route_prompt=route or None)
                for j in range(req.n or 1)]
        return await _respond(request, engine, metrics, jobs, req, "chat.completion", start,
                              settings.request_timeout)

    # -- memories ----------------------------------------------------------------------------------
    @v1.get("/memories")
    async def list_memories():
        return {"object": "list", "data": list(engine.memories().values())}

    @v1.post("/memories")
    async def load_memory(request: Request):
        req = api.validate(api.LoadRequest, api.parse_body(await _read_body(request, settings.max_body_bytes)))
        if not req.path:
            raise bad("path: must name a memory folder", "path")
        folder = Path(req.path).expanduser()
        if not folder.is_absolute():
            raise bad(f"path: must be absolute (the server's working directory is not the client's), got "
                      f"{req.path!r}", "path")
        if settings.memory_dirs:
            real = folder.resolve()
            if not any(real.is_relative_to(d.resolve()) for d in settings.memory_dirs):
                raise APIError(403, f"path: {req.path!r} is outside the directories this server loads memories from "
                                    f"({', '.join(str(d) for d in settings.memory_dirs)})", "path",
                               code="forbidden_path", type="permission_error")
        def read():
            stored = read_memory_folder(folder, served.backbone, req.name)
            if engine.config.router == "classifier":
                fit_router(stored, copy.deepcopy(tok), vocab)  # its own tokenizer: this runs beside requests
            return stored

        try:
            stored = await asyncio.to_thread(read)
            info = await asyncio.wrap_future(engine.install(stored))
        except MemoryConflict as e:
            metrics.inc("memory_loads_total", result="conflict")
            raise APIError(409, str(e), "name", code="memory_exists") from None
        except (KoffError, ValueError, KeyError, OSError) as e:
            metrics.inc("memory_loads_total", result="invalid")
            raise bad(f"cannot load {req.path}: {e}", "path", code="invalid_memory") from None
        metrics.inc("memory_loads_total", result="loaded")
        return JSONResponse(info, status_code=201)

    @v1.delete("/memories/{name}")
    async def unload_memory(name: str):
        try:
            return engine.unload(name)
        except UnknownMemory as e:
            raise APIError(404, str(e), "name", code="memory_not_found") from None

    app.include_router(v1)
    return app


class _CountRequests:
    """Counts responses by route and status (a plain ASGI wrapper: streamed bodies pass through
    untouched, and a client that goes away still cancels its stream)."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            endpoint = getattr(scope.get("route"), "path", None) or "other"
            self.metrics.inc("requests_total", endpoint=endpoint, status=str(status["code"]))


def _noop(event: Event) -> None:  # replaced by _respond before a job is submitted
    pass


def _auth(key: str | None):
    async def check(request: Request) -> None:
        if not key:
            return
        header = request.headers.get("authorization")
        if not header:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return check


def _unknown_model(name: str, engine: Engine) -> APIError:
    have = engine.memory_names()
    models = have + [BACKBONE] + ([AUTO] if have else [])
    return APIError(404, f"the model {short(name)} does not exist; available: {', '.join(models)}", "model",
                    code="model_not_found")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body has {declared} bytes; this server takes at most {limit}",
                       code="request_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the request body is over {limit} bytes, the most this server takes",
                               code="request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:  # the client left mid-body: nobody to answer, and not a server error
        raise APIError(CLIENT_CLOSED, "the client closed the connection while sending the request body",
                       code="client_closed_request") from None
    return b"".join(chunks)


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

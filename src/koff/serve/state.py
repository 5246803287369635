"""What every endpoint of `koff serve` reads: the app's settings and state, the API-key check, the
request body reader and the errors they share. The routers (`koff.serve.routes`) get the state
through `state(request)`; nothing here is mutable per request (the engine owns all that is)."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from starlette.requests import ClientDisconnect

from koff.core.fields import short
from koff.serve import api
from koff.serve.api import APIError
from koff.serve.loading import Served
from koff.serve.metrics import Metrics
from koff.serve.scheduler import AUTO, Engine

BACKBONE = "none"
"""The model name of the bare backbone (no memory)."""
CLIENT_CLOSED = 499
"""The status logged and counted for a request whose client left before the answer (nginx's code;
nobody receives it)."""


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


@dataclass(frozen=True)
class ServeState:
    """The engine and what the handlers derive from it once, at start."""

    engine: Engine
    served: Served
    settings: AppSettings
    metrics: Metrics
    context: int
    """Positions a request may use: the model's context, capped by settings.max_context."""
    vocab: int
    limits: api.Limits
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def build(cls, engine: Engine, served: Served, settings: AppSettings, metrics: Metrics) -> ServeState:
        context = min(served.context, settings.max_context or served.context)
        vocab = served.km.model.get_input_embeddings().num_embeddings
        limits = api.Limits(max_tokens=settings.max_tokens, context=context, vocab=vocab,
                            max_choices=max(1, min(16, engine.config.max_queue)))
        return cls(engine, served, settings, metrics, context, vocab, limits)


def state(request: Request) -> ServeState:
    """The app's state (set by `create_app`)."""
    return request.app.state.koff


def auth(key: str | None):
    """A dependency that refuses requests without `Authorization: Bearer KEY` (none when `key` is empty)."""

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


def unknown_model(name: str, engine: Engine) -> APIError:
    """404 for a model name that is no memory, naming the ones there are."""
    have = engine.memory_names()
    models = have + [BACKBONE] + ([AUTO] if have else [])
    return APIError(404, f"the model {short(name)} does not exist; available: {', '.join(models)}", "model",
                    code="model_not_found")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes (before reading it, when declared)."""
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


__all__ = ["AppSettings", "BACKBONE", "CLIENT_CLOSED", "ServeState", "auth", "read_body", "state", "unknown_model"]

"""The HTTP side of `koff serve`: an OpenAI-compatible FastAPI app in front of the engine.

    GET  /health                   liveness + what is loaded (no key needed)
    GET  /metrics                  Prometheus text format (no key needed)
    GET  /v1/models                one entry per memory, plus "none" (the bare backbone) and "auto"
    POST /v1/completions           OpenAI completions (stream: server-sent events)
    POST /v1/chat/completions      OpenAI chat completions, through the model's chat template
    GET  /v1/memories              the loaded memories, with their sources and running requests
    POST /v1/memories              {"path": FOLDER, "name"?: NAME}: load a memory folder
    DELETE /v1/memories/NAME       stop accepting NAME; removed once its requests finish

Each group of endpoints is a router of its own in `koff.serve.routes`; this module puts them
together with the error handlers and the request counter. No request can reach the model with an
invalid field, and no input yields a 5xx: every mistake is a 4xx with OpenAI's error object.
"""

from __future__ import annotations

import logging

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from koff.serve import routes
from koff.serve.api import APIError, bad
from koff.serve.loading import Served
from koff.serve.metrics import Metrics
from koff.serve.scheduler import Engine
from koff.serve.state import BACKBONE, AppSettings, ServeState, auth

log = logging.getLogger("koff.serve")


def create_app(engine: Engine, served: Served, settings: AppSettings, metrics: Metrics) -> FastAPI:
    """The FastAPI app serving `engine` (already started)."""
    app = FastAPI(title="koff serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.koff = ServeState.build(engine, served, settings, metrics)
    _add_error_handlers(app)
    app.add_middleware(_CountRequests, metrics=metrics)
    app.include_router(routes.plain.router)
    for group in routes.V1:
        app.include_router(group.router, dependencies=[Depends(auth(settings.api_key))])
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape."""

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


__all__ = ["AppSettings", "BACKBONE", "create_app"]

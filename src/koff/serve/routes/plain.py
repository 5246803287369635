"""GET / (the swap page), /health and /metrics: no API key, no model input."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

from koff.serve.state import state

SWAP_PAGE = (resources.files("koff.serve") / "static" / "index.html").read_text(encoding="utf-8")
"""GET /: a prompt, the loaded memories as checkboxes, each chosen memory's completion streamed side
by side (plain HTML + JS, no external assets)."""

router = APIRouter()


@router.get("/", response_class=HTMLResponse)
async def swap_page():
    # the page holds no data and no key: it calls /v1 from the browser like any other client
    return HTMLResponse(SWAP_PAGE)


@router.get("/health")
async def health(request: Request):
    s = state(request)
    engine = s.engine
    body = {"status": "ok" if engine.alive else "stopped", "backbone": s.served.backbone.kind,
            "memories": engine.memory_names(), "running": engine.running(), "queued": engine.queue_depth()}
    return JSONResponse(body, status_code=200 if engine.alive else 503)


@router.get("/metrics")
async def prometheus(request: Request):
    return PlainTextResponse(state(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

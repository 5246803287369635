"""GET /v1/models and /v1/models/NAME: one entry per memory, plus "none" (the bare backbone) and "auto"."""

from __future__ import annotations

from fastapi import APIRouter, Request

from koff.serve.scheduler import AUTO
from koff.serve.state import BACKBONE, ServeState, state, unknown_model

router = APIRouter(prefix="/v1")


def model_entries(s: ServeState) -> list[dict]:
    """The OpenAI model list: the memories, the backbone, and the router when there is a memory to route to."""
    entries = [{"id": name, "object": "model", "created": info["loaded_at"], "owned_by": "koff",
                "koff": {"kind": "memory", **{k: v for k, v in info.items() if k != "name"}}}
               for name, info in s.engine.memories().items()]
    entries.append({"id": BACKBONE, "object": "model", "created": s.created, "owned_by": "koff",
                    "koff": {"kind": "backbone", "source": str(s.served.backbone.path)}})
    if entries[:-1]:
        entries.append({"id": AUTO, "object": "model", "created": s.created, "owned_by": "koff",
                        "koff": {"kind": "router", "method": s.engine.router_method()}})
    return entries


@router.get("/models")
async def list_models(request: Request):
    return {"object": "list", "data": model_entries(state(request))}


@router.get("/models/{name}")
async def get_model(name: str, request: Request):
    s = state(request)
    for entry in model_entries(s):
        if entry["id"] == name:
            return entry
    raise unknown_model(name, s.engine)

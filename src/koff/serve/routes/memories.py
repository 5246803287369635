"""GET /v1/memories, POST /v1/memories ({"path": FOLDER, "name"?: NAME}) and DELETE /v1/memories/NAME."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from koff.core.errors import KoffError
from koff.serve import api
from koff.serve.api import APIError, bad
from koff.serve.loading import fit_router, read_memory_folder
from koff.serve.scheduler import MemoryConflict, UnknownMemory
from koff.serve.state import ServeState, read_body, state

router = APIRouter(prefix="/v1")


@router.get("/memories")
async def list_memories(request: Request):
    return {"object": "list", "data": list(state(request).engine.memories().values())}


def _folder(s: ServeState, path: str | None) -> Path:
    """The memory folder a load request names, refused unless absolute and inside --memory-dir."""
    if not path:
        raise bad("path: must name a memory folder", "path")
    folder = Path(path).expanduser()
    if not folder.is_absolute():
        raise bad(f"path: must be absolute (the server's working directory is not the client's), got {path!r}", "path")
    dirs = s.settings.memory_dirs
    if dirs and not any(folder.resolve().is_relative_to(d.resolve()) for d in dirs):
        raise APIError(403, f"path: {path!r} is outside the directories this server loads memories from "
                            f"({', '.join(str(d) for d in dirs)})", "path", code="forbidden_path", type="permission_error")
    return folder


@router.post("/memories")
async def load_memory(request: Request):
    s = state(request)
    req = api.validate(api.LoadRequest, api.parse_body(await read_body(request, s.settings.max_body_bytes)))
    folder = _folder(s, req.path)

    def read():
        stored = read_memory_folder(folder, s.served.backbone, req.name)
        if s.engine.config.router == "classifier":
            fit_router(stored, copy.deepcopy(s.served.tokenizer), s.vocab)  # its own tokenizer: this runs beside requests
        return stored

    try:
        stored = await asyncio.to_thread(read)
        info = await asyncio.wrap_future(s.engine.install(stored))
    except MemoryConflict as e:
        s.metrics.inc("memory_loads_total", result="conflict")
        raise APIError(409, str(e), "name", code="memory_exists") from None
    except (KoffError, ValueError, KeyError, OSError) as e:
        s.metrics.inc("memory_loads_total", result="invalid")
        raise bad(f"cannot load {req.path}: {e}", "path", code="invalid_memory") from None
    s.metrics.inc("memory_loads_total", result="loaded")
    return JSONResponse(info, status_code=201)


@router.delete("/memories/{name}")
async def unload_memory(name: str, request: Request):
    try:
        return state(request).engine.unload(name)
    except UnknownMemory as e:
        raise APIError(404, str(e), "name", code="memory_not_found") from None

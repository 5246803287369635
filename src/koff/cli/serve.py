"""`koff serve`: an OpenAI-compatible HTTP server, one backbone, a memory chosen per request."""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

from koff.cli.args import add_runtime_args, count, new_tokens, positive_float, positive_int, runtime
from koff.core.errors import ServeError
from koff.serve.routing import ROUTERS
from koff.serve.scheduler import BATCHING

NAME = "serve"
HELP = "OpenAI-compatible HTTP server: one backbone, a memory chosen per request"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="a run directory (koff decompose) or an exported backbone (koff export)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=count, default=8000, help="port (default 8000; 0: any free port, printed)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: $KOFF_API_KEY, else none)")
    p.add_argument("--max-batch", type=positive_int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="requests waiting for a batch slot; beyond, 429 with Retry-After (default 64)")
    p.add_argument("--batching", choices=BATCHING, default="continuous",
                   help="continuous: admit requests at every token (default); static: a new batch once the last ends")
    p.add_argument("--router", choices=ROUTERS, default="classifier",
                   help="how model 'auto' picks a memory: a token classifier fitted on each memory's training text "
                        "(default; the loss is used while a memory has no readable training text), or the lowest "
                        "loss on the prompt")
    p.add_argument("--max-tokens", type=new_tokens, default=1024, help="most tokens one request may generate")
    p.add_argument("--max-context", type=positive_int, help="cap on prompt + memory prefix + generated tokens "
                                                            "(default: the model's)")
    p.add_argument("--memory-dir", type=Path, action="append", default=[],
                   help="allow loading memories only from below this folder (repeatable; default: anywhere)")
    p.add_argument("--request-timeout", type=positive_float, default=600.0,
                   help="seconds a request may run, queueing included, before it is stopped with 504 (default 600)")
    p.add_argument("--log-level", default="warning", choices=LOG_LEVELS)
    add_runtime_args(p)


def run(args: argparse.Namespace) -> int:
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:  # the serve extra is optional: say what to install instead of an ImportError
        raise ServeError(f"koff serve needs {' and '.join(missing)}: pip install 'koff[serve]'")
    from koff.serve.scheduler import EngineConfig
    from koff.serve.server import serve
    from koff.serve.state import AppSettings  # fastapi and uvicorn: the serve extra

    key = args.api_key if args.api_key is not None else os.environ.get("KOFF_API_KEY") or None
    engine = EngineConfig(max_batch=args.max_batch, max_queue=args.max_queue, batching=args.batching,
                          router=args.router)
    settings = AppSettings(api_key=key, max_tokens=args.max_tokens, max_context=args.max_context,
                           memory_dirs=tuple(d.resolve() for d in args.memory_dir),
                           request_timeout=args.request_timeout)
    return serve(args.path, runtime(args), engine, settings, host=args.host, port=args.port,
                 log_level=args.log_level)

"""Start `koff serve`: load the backbone and its memories, start the engine, run uvicorn."""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from koff.core.errors import ServeError
from koff.serve.app import AppSettings, create_app
from koff.serve.loading import fit_router, load_served
from koff.serve.metrics import server_metrics
from koff.serve.scheduler import Engine, EngineConfig


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: an ephemeral one, read back with getsockname)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()

        raise ServeError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    sock.listen(2048)  # accept queues from here on, before uvicorn starts serving
    return sock


def _uvicorn_server(on_exit: Callable[[], None]):
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # stop accepting, and end every running request at once with an explicit error (a stream
            # gets an error event and [DONE]) instead of letting the grace period cut it off
            super().handle_exit(sig, frame)
            on_exit()

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn's graceful shutdown on SIGINT / SIGTERM, without re-raising the signal once it is
            # done: a server stopped on purpose exits with status 0
            signals = (signal.SIGINT, signal.SIGTERM)
            previous = {s: signal.signal(s, self.handle_exit) for s in signals}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    return Server


def serve(path: Path, runtime, engine_config: EngineConfig, settings: AppSettings, host: str = "127.0.0.1",
          port: int = 8000, log_level: str = "warning") -> int:
    """Serve the run directory or exported backbone at `path` until interrupted."""
    import uvicorn

    served = load_served(path, runtime)
    if engine_config.router == "classifier":
        vocab = served.km.model.get_input_embeddings().num_embeddings
        for stored in served.memories:
            fit_router(stored, served.tokenizer, vocab)
    holder: dict = {}
    metrics = server_metrics(lambda: holder["engine"].queue_depth(), lambda: holder["engine"].running(),
                             lambda: holder["engine"].memory_names())
    engine = holder["engine"] = Engine(served.km, served.tokenizer, engine_config, metrics)
    sock = bind(host, port)
    try:
        engine.start(served.memories)
        app = create_app(engine, served, settings, metrics)
        bound = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        names = engine.memory_names()
        print(f"koff serve: {served.backbone.kind} {path} ({len(names)} memories: {', '.join(names) or 'none'}; "
              f"{runtime.device}, {engine_config.batching} batching up to {engine_config.max_batch} rows, auto: "
              f"{engine.router_method()}) "
              f"listening on http://{shown}:{bound}", flush=True)
        config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5,
                                lifespan="off")
        _uvicorn_server(lambda: engine.stop(timeout=0))(config).run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()
    print("koff serve: stopped", file=sys.stderr, flush=True)
    return 0

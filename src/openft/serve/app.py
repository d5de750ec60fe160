"""The HTTP server: the OpenAI-compatible API, plus a supervised worker process.

`create_app()` wires the per-resource routers (files, fine_tuning, models, chat)
over one store and one inference engine. With `run_worker=True` the app starts
`openft worker` as a child process and restarts it if it dies, so a training
crash never takes the API down and an interrupted job resumes from its last
checkpoint.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch
from fastapi import FastAPI

from openft import __version__, home
from openft.hardware import PRECISIONS
from openft.heap import training_env
from openft.jobs.store import Store
from openft.serve import errors
from openft.serve.auth import BrowserGuard, HostPolicy
from openft.serve.errors import envelope

log = logging.getLogger("openft.serve")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_mb: int = 512
    run_worker: bool = True
    max_batch_size: int = 8
    precision: str = "auto"  # the served weights' dtype: auto (bf16 where fast), fp32 or bf16
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides loopback ones (--allowed-host)


class WorkerSupervisor:
    """Keeps one `openft worker` child alive."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="worker-supervisor", daemon=True)
        self.restarts = 0

    def start(self) -> None:
        self._spawn()
        self._thread.start()

    def _spawn(self) -> None:
        cmd = [sys.executable, "-m", "openft.cli", "worker", "--parent-pid", str(os.getpid())]
        # Started under the training allocator directly, so it need not re-execute itself.
        self.proc = subprocess.Popen(cmd, env=training_env({**os.environ, "OPENFT_HOME": str(home.home())}))
        log.info("worker started (pid %s)", self.proc.pid)

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            if self.proc and self.proc.poll() is not None:
                log.warning("worker exited with %s; restarting it", self.proc.returncode)
                self.restarts += 1
                self._spawn()

    def stop(self) -> None:
        self._stop.set()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class UploadLimit:
    """ASGI middleware: refuse an upload beyond the limit while it streams in, so
    nothing larger than the limit is ever spooled to disk."""

    def __init__(self, app, limit_bytes_fn):
        self.app, self.limit = app, limit_bytes_fn

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].rstrip("/") != "/v1/files":
            return await self.app(scope, receive, send)
        limit = self.limit() + (1 << 20)  # allowance for multipart framing and form fields
        length = dict(scope["headers"]).get(b"content-length")
        too_big = envelope(
            413,
            f"file is larger than the {self.limit() >> 20} MB limit (--max-upload-mb)",
            param="file",
            code="file_too_large",
        )
        if length and int(length) > limit:
            return await too_big(scope, receive, send)
        seen, tripped = 0, False

        async def counted():
            nonlocal seen, tripped
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > limit:
                tripped = True
                raise _TooBig
            return msg

        async def guarded(message):
            # FastAPI turns an exception raised while it parses a form into its own
            # 400 ("There was an error parsing the body"), so _TooBig may never reach
            # us (a chunked upload has no Content-Length to refuse up front): once the
            # limit has tripped, drop whatever the app answers and send the 413 below.
            if not tripped:
                await send(message)

        try:
            await self.app(scope, counted, guarded)
        except _TooBig:
            pass
        if tripped:
            await too_big(scope, receive, send)


class _TooBig(Exception):
    pass


def create_app(config: ServeConfig | None = None) -> FastAPI:
    from openft.serve import chat, files, fine_tuning, insights, keys, models, schemas
    from openft.serve.engine import Engine
    from openft.serve.fine_tuning import validate_files

    config = config or ServeConfig()
    hosts = HostPolicy.for_server(config.host, config.allowed_hosts)  # a bad --allowed-host fails here, first
    supervisor = WorkerSupervisor() if config.run_worker else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for job in app.state.store.jobs_in("validating_files"):  # a restart mid-validation
            validate_files(app, job["id"])
        app.state.engine.start()
        if supervisor:
            supervisor.start()
        yield
        if supervisor:
            supervisor.stop()
        app.state.engine.stop()

    app = FastAPI(
        title="openft",
        version=__version__,
        lifespan=lifespan,
        description="OpenAI-compatible fine-tuning and inference on your own machine.",
    )
    app.state.store = Store(home.home() / "openft.db")
    app.state.files_dir = home.home() / "files"
    app.state.files_dir.mkdir(parents=True, exist_ok=True)
    app.state.max_upload_bytes = config.max_upload_mb << 20
    app.state.engine = Engine(max_batch_size=config.max_batch_size, dtype=serving_dtype(config.precision))
    app.state.supervisor = supervisor
    errors.install(app)
    app.add_middleware(UploadLimit, limit_bytes_fn=lambda: app.state.max_upload_bytes)
    app.add_middleware(BrowserGuard, policy=hosts)  # added last: the outermost, before anything reads a body
    for r in (insights.router, keys.router, files.router, fine_tuning.router, models.router, chat.router):
        app.include_router(r)

    @app.get("/health", tags=["meta"], responses=schemas.ok(schemas.Health))
    def health():
        proc = supervisor.proc if supervisor else None
        return {
            "status": "ok",
            "version": __version__,
            "worker_pid": proc.pid if proc and proc.poll() is None else None,
            "worker_restarts": supervisor.restarts if supervisor else 0,
            "precision": "bf16" if app.state.engine.dtype == torch.bfloat16 else "fp32",
        }

    from openft.console import mount as mount_console

    mount_console(app)  # the web console at / (static files; a client of the API above)
    app.openapi = lambda: schemas.document(app)
    return app


def serving_dtype(precision: str) -> torch.dtype | None:
    """The engine's dtype for a precision setting (None: the engine's own auto choice)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return {"fp32": torch.float32, "bf16": torch.bfloat16}.get(precision)


def serve(config: ServeConfig) -> None:
    import uvicorn

    from openft.serve.auth import is_loopback

    store = Store(home.home() / "openft.db")
    if not is_loopback(config.host) and not store.has_keys():
        raise SystemExit(
            f"refusing to listen on {config.host}: no API keys exist, so the server would be open to "
            "anyone on the network. Create one with 'openft keys create --owner NAME', or listen on 127.0.0.1."
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="info")

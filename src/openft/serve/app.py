"""The HTTP server: the OpenAI-compatible API, plus a supervised worker process.

`create_app()` wires the per-resource routers (files, fine_tuning, models, chat)
over one store and one inference engine. With `run_worker=True` the app starts
`openft worker` as a child process and restarts it if it dies, so a training
crash never takes the API down and an interrupted job resumes from its last
checkpoint. A worker that keeps dying is restarted ever more slowly, and one that
exits while the server stops is not restarted.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch
import uvicorn
from fastapi import FastAPI

from openft import __version__, home
from openft.autoprecision import PRECISIONS
from openft.heap import training_env
from openft.jobs import fleet
from openft.jobs.store import open_store
from openft.serve import errors
from openft.serve.auth import BrowserGuard, HostPolicy
from openft.serve.errors import envelope

log = logging.getLogger("openft.serve")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_mb: int = 512
    run_worker: bool = True  # False: an API replica only (`--workers 0`); workers run elsewhere
    workers: int = 1  # worker processes it starts and supervises (with run_worker)
    database_url: str | None = None  # the job store (None: OPENFT_DATABASE_URL, else SQLite under OPENFT_HOME)
    max_batch_size: int = 8
    precision: str = "auto"  # the served weights' dtype: auto (bf16 where measured faster), fp32 or bf16
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides loopback ones (--allowed-host)
    worker_args: tuple[str, ...] = ()  # flags for the worker it starts (--nproc-per-node 2)


@dataclass(frozen=True)
class RestartPolicy:
    """How long to wait before restarting a worker that exited. A worker that ran
    `healthy_s` or longer is restarted at once (it was doing its work; a job that
    killed it resumes from its checkpoint); after a short run the wait is
    `first_s`, doubling with each short run in a row, up to `cap_s`, so a worker
    that dies at start (a broken install) does not loop every second."""

    first_s: float = 1.0
    cap_s: float = 60.0
    healthy_s: float = 60.0

    def delay(self, runs: Sequence[float]) -> float:
        """`runs`: how long each worker ran before it exited, oldest first."""
        short = 0
        for lasted in reversed(runs):
            if lasted >= self.healthy_s:
                break
            short += 1
        if short == 0:
            return 0.0
        return min(self.cap_s, self.first_s * 2.0 ** min(short - 1, 64))


# The worker beside the API runs at a lower CPU priority (WORKER_NICE below the
# server's, at most 19): its training yields the
# cores to requests, and takes them all while the API idles. Its start-up alone
# (importing torch and transformers on 2 cores) had held the Qwen built-in's first
# answer at 7.5 s against 2.6 s without a worker (the request after it: 0.1 s).
WORKER_NICE = 10


def yield_to_api(pid: int) -> None:
    """Lower a just-started worker's priority (its later threads and ranks inherit it)."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, min(19, os.getpriority(os.PRIO_PROCESS, 0) + WORKER_NICE))
    except OSError as e:  # gone already, or not allowed: it runs at the server's priority
        log.warning("worker %s keeps the server's CPU priority: %s", pid, e)


class WorkerSupervisor:
    """Keeps one `openft worker` child alive; starts nothing once the server stops."""

    def __init__(self, policy: RestartPolicy | None = None, worker_args: tuple[str, ...] = ()):
        self.proc: subprocess.Popen | None = None
        self.worker_args = worker_args
        self.policy = policy or RestartPolicy()
        self.restarts = 0
        self._runs: deque[float] = deque(maxlen=64)  # how long each worker ran (enough history for the cap)
        self._started_at = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()  # a spawn and stop() never interleave
        self._thread = threading.Thread(target=self._loop, name="worker-supervisor", daemon=True)

    def start(self) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            self._spawn()
        self._thread.start()

    def _spawn(self) -> None:
        cmd = [sys.executable, "-m", "openft.cli", "worker", "--parent-pid", str(os.getpid()), *self.worker_args]
        # Started under the training allocator directly, so it need not re-execute itself.
        self.proc = subprocess.Popen(cmd, env=training_env({**os.environ, "OPENFT_HOME": str(home.home())}))
        yield_to_api(self.proc.pid)
        self._started_at = time.monotonic()
        log.info("worker started (pid %s)", self.proc.pid)

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            if self.proc and self.proc.poll() is not None:
                self._restart(self.proc.returncode, time.monotonic() - self._started_at)
        # Stopping: nothing starts any more. Record how the last worker ends (stop()
        # terminates it, unless the stop signal reached it first).
        with self._lock:
            proc = self.proc
        if proc:
            log.info("worker exited with %s; the server is stopping, so it stays down", proc.wait())

    def _restart(self, code: int, lasted: float) -> None:
        self._runs.append(lasted)
        delay = self.policy.delay(self._runs)
        log.warning("worker exited with %s after %.0f s; restarting it in %.0f s", code, lasted, delay)
        if self._stop.wait(delay):
            return
        with self._lock:
            if not self._stop.is_set():
                self._spawn()
                self.restarts += 1

    def stopping(self) -> None:
        """The server is stopping (a signal arrived): start nothing from now on. Safe
        in a signal handler: it takes no lock the interrupted thread could hold."""
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:  # a spawn under way finishes first; none begins after
            proc = self.proc
        if proc and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


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
    from openft.serve import chat, evals, files, fine_tuning, graders, insights, keys, models, schemas
    from openft.serve import fleet as fleet_api
    from openft.serve.engine import Engine
    from openft.serve.fine_tuning import validate_files

    config = config or ServeConfig()
    hosts = HostPolicy.for_server(config.host, config.allowed_hosts)  # a bad --allowed-host fails here, first
    n_workers = config.workers if config.run_worker else 0
    supervisors = [WorkerSupervisor(worker_args=config.worker_args) for _ in range(n_workers)]
    supervisor = supervisors[0] if supervisors else None
    store = open_store(config.database_url)
    fleet.check_home(store, home.home())  # before anything is written into a folder no one else sees

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for job in app.state.store.jobs_in("validating_files"):  # a restart mid-validation
            validate_files(app, job["id"])
        presence = fleet.Presence(store, fleet.replica(f"{config.host}:{config.port}"), fleet.HEARTBEAT_S).start()
        app.state.engine.start()
        for sup in supervisors:
            sup.start()
        yield
        for sup in supervisors:
            sup.stop()
        app.state.engine.stop()
        presence.stop()

    app = FastAPI(
        title="openft",
        version=__version__,
        lifespan=lifespan,
        description="OpenAI-compatible fine-tuning and inference on your own machine.",
    )
    app.state.store = store
    app.state.files_dir = home.home() / "files"
    app.state.files_dir.mkdir(parents=True, exist_ok=True)
    app.state.max_upload_bytes = config.max_upload_mb << 20
    app.state.engine = Engine(max_batch_size=config.max_batch_size, dtype=serving_dtype(config.precision))
    app.state.supervisor = supervisor
    errors.install(app)
    app.add_middleware(UploadLimit, limit_bytes_fn=lambda: app.state.max_upload_bytes)
    app.add_middleware(BrowserGuard, policy=hosts)  # added last: the outermost, before anything reads a body
    for r in (
        insights.router,
        keys.router,
        files.router,
        fine_tuning.router,
        models.router,
        chat.router,
        fleet_api.router,
        graders.router,
        evals.router,
    ):
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
    from openft.serve.auth import is_loopback

    if config.database_url:  # the workers it starts use the same store (in the environment: no password in ps)
        os.environ["OPENFT_DATABASE_URL"] = config.database_url
    store = open_store(config.database_url)
    if not is_loopback(config.host) and not store.has_keys():
        raise SystemExit(
            f"refusing to listen on {config.host}: no API keys exist, so the server would be open to "
            "anyone on the network. Create one with 'openft keys create --owner NAME', or listen on 127.0.0.1."
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(config)
    supervisor: WorkerSupervisor | None = app.state.supervisor
    server = StopAwareServer(
        uvicorn.Config(app, host=config.host, port=config.port, log_level="info"),
        on_signal=supervisor.stopping if supervisor else lambda: None,
    )
    store.close()
    server.run()
    if not server.started:  # as uvicorn.run: a port in use, a failed startup
        raise SystemExit(3)


class StopAwareServer(uvicorn.Server):
    """uvicorn's server, which says so the moment a stop signal arrives: uvicorn
    then waits for open requests before the app's shutdown runs, and a worker that
    exits meanwhile (a signal to the whole process group reaches it too) must not
    be restarted."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None]):
        super().__init__(config)
        self._on_signal = on_signal

    def handle_exit(self, sig, frame) -> None:
        self._on_signal()
        super().handle_exit(sig, frame)

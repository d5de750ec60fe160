"""The database under the job store: SQLite (the embedded default) or PostgreSQL.

One SQLAlchemy Core engine per store, chosen by URL (`OPENFT_DATABASE_URL`, else
SQLite under OPENFT_HOME). Every store call runs one short unit of work through
`Database.write` or `Database.read`; both retry, with backoff, when the server
cannot be reached (PostgreSQL restarting, a network blip), so a worker or an API
replica rides out a restart instead of failing its job. A unit of work is written
to be safe to run twice: a COMMIT whose answer was lost may have applied.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

T = TypeVar("T")
RETRY_S = 120.0  # how long a call waits for an unreachable database before giving up


class StoreUnavailable(RuntimeError):
    """The database could not be reached for OPENFT_DATABASE_RETRY_S seconds."""


def database_url(explicit: str | None = None, *, home: Path) -> str:
    """`explicit` (--database-url), else OPENFT_DATABASE_URL, else SQLite under `home`.
    `postgresql://` means psycopg 3 (SQLAlchemy would pick psycopg2 otherwise)."""
    url = explicit or os.environ.get("OPENFT_DATABASE_URL") or ""
    if not url:
        return f"sqlite:///{home / 'openft.db'}"
    if url.startswith("postgres://"):  # the spelling Heroku and others hand out
        url = "postgresql://" + url.removeprefix("postgres://")
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if not re.match(r"^(sqlite|postgresql\+psycopg)://", url):
        raise ValueError(f"OPENFT_DATABASE_URL must start with sqlite:// or postgresql://, not {redact(url)!r}")
    return url


def redact(url: str) -> str:
    """The URL without its password, for messages and the fleet view."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def _retry_s() -> float:
    try:
        return float(os.environ.get("OPENFT_DATABASE_RETRY_S") or RETRY_S)
    except ValueError:
        raise SystemExit("OPENFT_DATABASE_RETRY_S must be a number of seconds") from None


def _sqlite_engine(url: str) -> Engine:
    Path(sa.engine.make_url(url).database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=8)

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record) -> None:
        # Transactions are ours (BEGIN IMMEDIATE below), not the sqlite3 module's.
        dbapi_conn.isolation_level = None
        _enter_wal(dbapi_conn)
        dbapi_conn.execute("PRAGMA synchronous=NORMAL")
        dbapi_conn.execute("PRAGMA busy_timeout=30000")

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # A write takes the write lock up front: writers queue, never deadlock on an
        # upgrade from a read lock. A read runs without a transaction (WAL snapshots
        # each statement).
        if not conn.get_execution_options().get("openft_read"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _enter_wal(dbapi_conn, wait_s: float = 30.0) -> None:
    """Switch to WAL. A database still in rollback mode needs itself alone for a
    moment, and SQLite answers "database is locked" at once, without its busy
    timeout, while another process opens it too: so retry, with a short backoff."""
    import sqlite3

    deadline, pause = time.monotonic() + wait_s, 0.005
    while True:
        try:
            dbapi_conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.2)


def _postgres_engine(url: str) -> Engine:
    # pre_ping: a pooled connection from before a server restart is found dead at
    # checkout, not halfway through a unit of work. connect_timeout bounds each try.
    return sa.create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=16, connect_args={"connect_timeout": 5})


def _unreachable(e: BaseException) -> bool:
    """A failure to reach the server, worth retrying: the connection dropped or was
    refused, or the server is starting up or shutting down (SQLSTATE class 57,
    08). Never a failure of the statement itself (a constraint, a full disk)."""
    if isinstance(e, sa.exc.DBAPIError) and e.connection_invalidated:
        return True
    orig = getattr(e, "orig", None)
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return False
    if isinstance(orig, psycopg.OperationalError | psycopg.InterfaceError):
        state = getattr(orig, "sqlstate", None) or ""
        return state == "" or state[:2] in ("08", "57")
    return False


class Database:
    def __init__(self, url: str):
        self.url = url
        self.postgres = url.startswith("postgresql")
        self.engine = _postgres_engine(url) if self.postgres else _sqlite_engine(url)

    @property
    def dialect(self) -> str:
        return "postgresql" if self.postgres else "sqlite"

    def _retrying(self, work: Callable[[], T]) -> T:
        deadline, pause = time.monotonic() + _retry_s(), 0.1
        while True:
            try:
                return work()
            except sa.exc.DBAPIError as e:
                if not _unreachable(e):
                    raise
                if time.monotonic() > deadline:
                    raise StoreUnavailable(f"the job store at {redact(self.url)} is unreachable: {e.orig}") from e
                time.sleep(pause)
                pause = min(pause * 2, 2.0)

    def write(self, work: Callable[[Connection], T]) -> T:
        """Run `work` in one write transaction, again from the start if the server
        went away meanwhile."""

        def once() -> T:
            with self.engine.begin() as conn:
                return work(conn)

        return self._retrying(once)

    def read(self, work: Callable[[Connection], T]) -> T:
        def once() -> T:
            with self._reader() as conn:
                return work(conn)

        return self._retrying(once)

    @contextmanager
    def _reader(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            if self.postgres:
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            else:
                conn = conn.execution_options(openft_read=True)
            yield conn

    def json_int(self, column: str, key: str) -> str:
        """SQL for an integer field of a JSON text column."""
        if self.postgres:
            return f"CAST(CAST({column} AS jsonb) ->> '{key}' AS BIGINT)"
        return f"CAST(json_extract({column}, '$.{key}') AS INTEGER)"

    def skip_locked(self) -> str:
        """Row locks for a claim: a job another worker is claiming right now is
        skipped, not waited for (SQLite's BEGIN IMMEDIATE already serialises)."""
        return " FOR UPDATE SKIP LOCKED" if self.postgres else ""

    def lock_row(self) -> str:
        return " FOR UPDATE" if self.postgres else ""

    def dispose(self) -> None:
        self.engine.dispose()

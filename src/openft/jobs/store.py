"""The job store: files, jobs, events, checkpoints, models, keys, in SQLite (WAL).

One database file under OPENFT_HOME holds all state; the API process and the
worker process share it. Every write is a short transaction, so a crash of either
process leaves the store consistent, and WAL lets readers go on while the worker
writes. Objects carry an `owner`; every read takes the caller's owner, so another
owner's object is simply not found (the API answers 404 exactly as for a
missing one).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The tables as first released. Databases of that time carry no schema version
# (PRAGMA user_version 0); every later change is a step in MIGRATIONS below.
BASE_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
  id TEXT PRIMARY KEY, key_hash TEXT UNIQUE NOT NULL, owner TEXT NOT NULL, created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
  id TEXT PRIMARY KEY, owner TEXT NOT NULL, filename TEXT NOT NULL, bytes INTEGER NOT NULL,
  purpose TEXT NOT NULL, created_at INTEGER NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL,
  status TEXT NOT NULL, status_details TEXT, validation TEXT
);
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY, owner TEXT NOT NULL, model TEXT NOT NULL, status TEXT NOT NULL,
  created_at INTEGER NOT NULL, started_at INTEGER, finished_at INTEGER,
  training_file TEXT NOT NULL, validation_file TEXT, spec TEXT NOT NULL, hyperparameters TEXT NOT NULL,
  method TEXT NOT NULL, suffix TEXT, seed INTEGER NOT NULL, metadata TEXT, error TEXT,
  fine_tuned_model TEXT, trained_tokens INTEGER, result_files TEXT NOT NULL DEFAULT '[]',
  comparison TEXT, run_dir TEXT, control TEXT NOT NULL DEFAULT '', worker_pid INTEGER,
  heartbeat_at REAL, attempts INTEGER NOT NULL DEFAULT 0, estimated_finish INTEGER, extra TEXT
);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, created_at);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, created_at);
CREATE TABLE IF NOT EXISTS events (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL,
  created_at INTEGER NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL, type TEXT NOT NULL, data TEXT
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
  id TEXT PRIMARY KEY, job_id TEXT NOT NULL, step INTEGER NOT NULL, created_at INTEGER NOT NULL,
  metrics TEXT NOT NULL, model_name TEXT NOT NULL, path TEXT NOT NULL, UNIQUE(job_id, step)
);
CREATE TABLE IF NOT EXISTS models (
  id TEXT PRIMARY KEY, owner TEXT NOT NULL, base TEXT NOT NULL, job_id TEXT, created_at INTEGER NOT NULL,
  path TEXT NOT NULL, kind TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotency (
  owner TEXT NOT NULL, key TEXT NOT NULL, job_id TEXT NOT NULL, created_at INTEGER NOT NULL,
  PRIMARY KEY(owner, key)
);
"""

JSON_COLUMNS = {
    "validation",
    "spec",
    "hyperparameters",
    "metadata",
    "error",
    "result_files",
    "comparison",
    "data",
    "metrics",
    "extra",
}
TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class Migration:
    """One schema change; applying MIGRATIONS[n] takes a database from version n to n + 1."""

    description: str
    apply: Callable[[sqlite3.Connection], None]


def _create_base(db: sqlite3.Connection) -> None:
    # Statement by statement: executescript would commit the migration's transaction.
    for statement in BASE_SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)


def _add_stalls(db: sqlite3.Connection) -> None:
    # Databases from before schema versions gained this column without a version.
    if "stalls" not in {r[1] for r in db.execute("PRAGMA table_info(jobs)").fetchall()}:
        db.execute("ALTER TABLE jobs ADD COLUMN stalls INTEGER NOT NULL DEFAULT 0")


# Append only: a step once released is never edited (databases in the field have applied it).
MIGRATIONS: tuple[Migration, ...] = (
    Migration("the original tables", _create_base),
    # A worker that dies while making progress should not use up its job's retries.
    Migration("jobs.stalls: attempts in a row that ended without a new checkpoint", _add_stalls),
)
SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNew(RuntimeError):
    """The database was written by a newer openft."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def _row(cur: sqlite3.Cursor, row: tuple) -> dict:
    out = {}
    for (name, *_), value in zip(cur.description, row):
        out[name] = json.loads(value) if name in JSON_COLUMNS and value is not None else value
    return out


def _enter_wal(conn: sqlite3.Connection, wait_s: float = 30.0) -> None:
    """Switch the database to WAL. Switching a database that is still in rollback
    mode needs it to itself for a moment, and SQLite answers "database is locked"
    at once, without its busy timeout, while another process or thread opens it
    too (the API and the worker starting together on a database made by an older
    openft): so retry, with a short backoff, for as long as the busy timeout."""
    deadline, pause = time.monotonic() + wait_s, 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.2)


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self.applied_migrations = self._migrate()

    def _version(self, db: sqlite3.Connection) -> int:
        return db.execute("PRAGMA user_version").fetchone()[0]

    def _migrate(self) -> list[int]:
        """Bring the schema to SCHEMA_VERSION; returns the versions this call reached.
        Each step commits with its version number, under the write lock, and the
        version is read again under that lock: the API process and the worker may
        open one database at once, and each step still applies exactly once."""
        applied: list[int] = []
        version = self._version(self._conn())
        while version < SCHEMA_VERSION:
            with self.tx() as db:
                version = self._version(db)
                if version < SCHEMA_VERSION:
                    MIGRATIONS[version].apply(db)
                    version += 1
                    db.execute(f"PRAGMA user_version = {version}")
                    applied.append(version)
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"{self.path} has schema version {version}, newer than this openft's {SCHEMA_VERSION}: upgrade openft"
            )
        return applied

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            _enter_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: writers queue, never deadlock)."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")  # inside the try: a COMMIT that fails (disk full) is rolled back too
        except BaseException:
            self._end_failed(db)
            raise

    def _end_failed(self, db: sqlite3.Connection) -> None:
        """Leave the thread's connection outside any transaction, so its next one can
        begin. SQLite rolls some failures back itself (a full disk, an I/O error),
        leaving nothing to end; a connection that cannot even roll back is closed,
        and the thread's next call opens a fresh one."""
        if not db.in_transaction:
            return
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            db.close()
            self._local.conn = None

    def _one(self, sql: str, args: tuple = ()) -> dict | None:
        cur = self._conn().execute(sql, args)
        row = cur.fetchone()
        return _row(cur, row) if row else None

    def _all(self, sql: str, args: tuple = ()) -> list[dict]:
        cur = self._conn().execute(sql, args)
        return [_row(cur, r) for r in cur.fetchall()]

    @staticmethod
    def _enc(values: dict) -> dict:
        return {
            k: (json.dumps(v, ensure_ascii=False) if k in JSON_COLUMNS and v is not None else v)
            for k, v in values.items()
        }

    def _insert(self, db: sqlite3.Connection, table: str, values: dict) -> None:
        values = self._enc(values)
        cols = ", ".join(values)
        db.execute(f"INSERT INTO {table} ({cols}) VALUES ({', '.join('?' * len(values))})", tuple(values.values()))

    # ------------------------------------------------------------------ keys
    def create_key(self, owner: str) -> NewKey:
        new = NewKey(id=new_id("key"), owner=owner, created_at=now(), key="sk-oft-" + secrets.token_urlsafe(24))
        with self.tx() as db:
            self._insert(
                db, "keys", {"id": new.id, "key_hash": _hash(new.key), "owner": owner, "created_at": new.created_at}
            )
        return new

    def owner_for_key(self, key: str) -> str | None:
        row = self._one("SELECT owner FROM keys WHERE key_hash = ?", (_hash(key),))
        return row["owner"] if row else None

    def has_keys(self) -> bool:
        return self._one("SELECT 1 AS x FROM keys LIMIT 1") is not None

    def list_keys(self) -> list[dict]:
        return self._all("SELECT id, owner, created_at FROM keys ORDER BY created_at, rowid")

    def delete_key(self, owner: str, key_id: str) -> bool:
        with self.tx() as db:
            return db.execute("DELETE FROM keys WHERE id = ? AND owner = ?", (key_id, owner)).rowcount == 1

    # ----------------------------------------------------------------- files
    def add_file(self, **values: Any) -> dict:
        values.setdefault("id", new_id("file"))
        values.setdefault("created_at", now())
        with self.tx() as db:
            self._insert(db, "files", values)
        return self.get_file(values["owner"], values["id"])

    def get_file(self, owner: str, file_id: str) -> dict | None:
        return self._one("SELECT * FROM files WHERE id = ? AND owner = ?", (file_id, owner))

    def list_files(
        self, owner: str, purpose: str | None = None, limit: int = 10000, after: str | None = None, order: str = "desc"
    ) -> list[dict]:
        sql, args = "SELECT * FROM files WHERE owner = ?", [owner]
        if purpose:
            sql, args = sql + " AND purpose = ?", args + [purpose]
        if after:
            ref = self.get_file(owner, after)
            if ref:
                op = "<" if order == "desc" else ">"
                sql, args = sql + f" AND (created_at, id) {op} (?, ?)", args + [ref["created_at"], ref["id"]]
        direction = "DESC" if order == "desc" else "ASC"
        return self._all(sql + f" ORDER BY created_at {direction}, id {direction} LIMIT ?", tuple(args + [limit]))

    def delete_file(self, owner: str, file_id: str) -> dict | None:
        row = self.get_file(owner, file_id)
        if row:
            with self.tx() as db:
                db.execute("DELETE FROM files WHERE id = ? AND owner = ?", (file_id, owner))
        return row

    # ------------------------------------------------------------------ jobs
    def create_job(self, values: dict, idempotency_key: str | None = None) -> tuple[dict, bool]:
        """Insert a job; with an idempotency key seen before, return the first job
        instead (created=False). Both happen in one transaction, so two retries
        racing each other still create one job."""
        with self.tx() as db:
            if idempotency_key:
                cur = db.execute(
                    "SELECT job_id FROM idempotency WHERE owner = ? AND key = ?", (values["owner"], idempotency_key)
                )
                hit = cur.fetchone()
                if hit:
                    return self._one("SELECT * FROM jobs WHERE id = ?", (hit[0],)), False
                db.execute(
                    "INSERT INTO idempotency (owner, key, job_id, created_at) VALUES (?, ?, ?, ?)",
                    (values["owner"], idempotency_key, values["id"], now()),
                )
            self._insert(db, "jobs", values)
        return self._one("SELECT * FROM jobs WHERE id = ?", (values["id"],)), True

    def get_job(self, owner: str | None, job_id: str) -> dict | None:
        if owner is None:  # the worker: no owner filter
            return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return self._one("SELECT * FROM jobs WHERE id = ? AND owner = ?", (job_id, owner))

    def list_jobs(self, owner: str, after: str | None = None, limit: int = 20) -> list[dict]:
        sql, args = "SELECT * FROM jobs WHERE owner = ?", [owner]
        if after:
            ref = self.get_job(owner, after)
            if ref:
                sql, args = sql + " AND (created_at, id) < (?, ?)", args + [ref["created_at"], ref["id"]]
        return self._all(sql + " ORDER BY created_at DESC, id DESC LIMIT ?", tuple(args + [limit]))

    def update_job(
        self,
        job_id: str,
        *,
        expect_status: tuple[str, ...] | None = None,
        expect_worker: int | None = None,
        events: list[dict] | None = None,
        **values: Any,
    ) -> bool:
        """Update fields; with `expect_status`, only if the job is in one of those
        states (a compare-and-set: cancel vs. succeed races resolve cleanly); with
        `expect_worker`, only if that worker pid still owns it (a worker whose job
        was taken over writes nothing). `events` (add_event keyword dicts) are
        added in the same transaction, only if the update applied: a crash never
        leaves a status change without its event, or the reverse."""
        values = self._enc(values)
        sets = ", ".join(f"{k} = ?" for k in values)
        sql, args = f"UPDATE jobs SET {sets} WHERE id = ?", list(values.values()) + [job_id]
        if expect_status:
            sql += f" AND status IN ({', '.join('?' * len(expect_status))})"
            args += list(expect_status)
        if expect_worker is not None:
            sql, args = sql + " AND worker_pid = ?", args + [expect_worker]
        with self.tx() as db:
            ok = db.execute(sql, tuple(args)).rowcount == 1
            if ok:
                for ev in events or ():
                    self._insert(db, "events", self._event(job_id, **ev))
            return ok

    def claim_next_job(self, worker_pid: int) -> dict | None:
        """Atomically move the oldest queued job to running for this worker."""
        with self.tx() as db:
            cur = db.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY created_at, id LIMIT 1")
            row = cur.fetchone()
            if not row:
                return None
            db.execute(
                "UPDATE jobs SET status = 'running', worker_pid = ?, heartbeat_at = ?, attempts = attempts + 1, "
                "stalls = stalls + 1, started_at = COALESCE(started_at, ?) WHERE id = ?",
                (worker_pid, time.time(), now(), row[0]),
            )
        return self.get_job(None, row[0])

    def jobs_in(self, *statuses: str) -> list[dict]:
        return self._all(
            f"SELECT * FROM jobs WHERE status IN ({', '.join('?' * len(statuses))}) ORDER BY created_at",
            tuple(statuses),
        )

    # ---------------------------------------------------------------- events
    @staticmethod
    def _event(
        job_id: str, message: str, *, level: str = "info", type: str = "message", data: dict | None = None
    ) -> dict:
        return {
            "id": new_id("ftevent"),
            "job_id": job_id,
            "created_at": now(),
            "level": level,
            "message": message,
            "type": type,
            "data": data,
        }

    def add_event(
        self,
        job_id: str,
        message: str,
        *,
        level: str = "info",
        type: str = "message",
        data: dict | None = None,
        expect_worker: int | None = None,
    ) -> dict:
        """With `expect_worker`, raise NotOwner (and add nothing) unless that worker
        pid still owns the job."""
        values = self._event(job_id, message, level=level, type=type, data=data)
        with self.tx() as db:
            self._check_owner(db, job_id, expect_worker)
            self._insert(db, "events", values)
        return values

    @staticmethod
    def _check_owner(db: sqlite3.Connection, job_id: str, worker_pid: int | None) -> None:
        if worker_pid is None:
            return
        row = db.execute("SELECT worker_pid FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or row[0] != worker_pid:
            raise NotOwner(job_id)

    def last_metrics_step(self, job_id: str) -> int:
        """The highest step with a metrics event (0 if none)."""
        row = self._one(
            "SELECT MAX(CAST(json_extract(data, '$.step') AS INTEGER)) AS s FROM events "
            "WHERE job_id = ? AND type = 'metrics'",
            (job_id,),
        )
        return int(row["s"] or 0) if row else 0

    def list_events(self, job_id: str, after: str | None = None, limit: int = 20, order: str = "desc") -> list[dict]:
        sql, args = "SELECT * FROM events WHERE job_id = ?", [job_id]
        if after:
            ref = self._one("SELECT seq FROM events WHERE id = ? AND job_id = ?", (after, job_id))
            if ref:
                sql, args = sql + (" AND seq < ?" if order == "desc" else " AND seq > ?"), args + [ref["seq"]]
        direction = "DESC" if order == "desc" else "ASC"
        return self._all(sql + f" ORDER BY seq {direction} LIMIT ?", tuple(args + [limit]))

    # ----------------------------------------------------------- checkpoints
    def add_checkpoint(
        self,
        job_id: str,
        step: int,
        metrics: dict,
        model_name: str,
        path: str,
        event: dict | None = None,
        expect_worker: int | None = None,
    ) -> bool:
        """Register a checkpoint, with its event (add_event keyword dicts) in the
        same transaction. Registering a step again (a resumed attempt that finds
        it on disk) updates it and adds no second event. A new checkpoint is
        progress: the job's stall count starts again. Returns True if new.
        `expect_worker`: as for add_event."""
        with self.tx() as db:
            self._check_owner(db, job_id, expect_worker)
            cur = db.execute(
                "UPDATE checkpoints SET metrics = ?, model_name = ?, path = ? WHERE job_id = ? AND step = ?",
                (json.dumps(metrics), model_name, path, job_id, step),
            )
            if cur.rowcount:
                return False
            self._insert(
                db,
                "checkpoints",
                {
                    "id": new_id("ftckpt"),
                    "job_id": job_id,
                    "step": step,
                    "created_at": now(),
                    "metrics": metrics,
                    "model_name": model_name,
                    "path": path,
                },
            )
            db.execute("UPDATE jobs SET stalls = 0 WHERE id = ?", (job_id,))
            if event:
                self._insert(db, "events", self._event(job_id, **event))
            return True

    def list_checkpoints(self, job_id: str, after: str | None = None, limit: int = 10) -> list[dict]:
        sql, args = "SELECT * FROM checkpoints WHERE job_id = ?", [job_id]
        if after:
            ref = self._one("SELECT step FROM checkpoints WHERE id = ? AND job_id = ?", (after, job_id))
            if ref:
                sql, args = sql + " AND step < ?", args + [ref["step"]]
        return self._all(sql + " ORDER BY step DESC LIMIT ?", tuple(args + [limit]))

    def delete_checkpoint(self, job_id: str, step: int) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM checkpoints WHERE job_id = ? AND step = ?", (job_id, step))

    def checkpoint_by_model(self, owner: str, model_name: str) -> dict | None:
        return self._one(
            "SELECT c.* FROM checkpoints c JOIN jobs j ON j.id = c.job_id WHERE c.model_name = ? AND j.owner = ?",
            (model_name, owner),
        )

    # ---------------------------------------------------------------- models
    def add_model(self, **values: Any) -> None:
        values.setdefault("created_at", now())
        with self.tx() as db:
            db.execute("DELETE FROM models WHERE id = ?", (values["id"],))
            self._insert(db, "models", values)

    def get_model(self, owner: str, model_id: str) -> dict | None:
        return self._one("SELECT * FROM models WHERE id = ? AND owner = ?", (model_id, owner))

    def list_models(self, owner: str) -> list[dict]:
        return self._all("SELECT * FROM models WHERE owner = ? ORDER BY created_at", (owner,))

    def delete_model(self, owner: str, model_id: str) -> bool:
        with self.tx() as db:
            n = db.execute("DELETE FROM models WHERE id = ? AND owner = ?", (model_id, owner)).rowcount
            db.execute(
                "DELETE FROM checkpoints WHERE job_id IN (SELECT id FROM jobs WHERE fine_tuned_model = ? AND owner = ?)",
                (model_id, owner),
            )
        return n == 1


@dataclass(frozen=True)
class NewKey:
    """A key just created: `key` is the secret, which only its hash is stored for."""

    id: str
    owner: str
    created_at: int
    key: str


class NotOwner(Exception):
    """The worker writing for a job no longer owns it (it was presumed dead and
    the job taken over)."""


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()

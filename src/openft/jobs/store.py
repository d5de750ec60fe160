"""The job store: files, jobs, events, checkpoints, models, keys, the fleet.

One store for all state, on SQLite under OPENFT_HOME (the embedded default) or on
PostgreSQL (`OPENFT_DATABASE_URL`), shared by every API replica and worker. Every
write is one short transaction (openft.jobs.db), so a crash of any process leaves
the store consistent, and each is safe to run again after a lost connection.
Objects carry an `owner`; every read takes the caller's owner, so another owner's
object is simply not found (the API answers 404 exactly as for a missing one).

A job being run is leased: `worker_id` names the worker that claimed it and
`attempts` counts the claims, and the pair is the fencing token (`Lease`) that
every write of that worker carries. A worker presumed dead whose job was taken
over finds its token stale and writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from openft.jobs import schema
from openft.jobs.db import Database, StoreUnavailable, redact
from openft.jobs.evalstore import EvalStore
from openft.jobs.schema import SchemaTooNew
from openft.jobs.sql import _all, _enc, _insert, _one, new_id, now

TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class Lease:
    """The fencing token of one claim of a job: writes carrying it apply only while
    the job is still held by that worker under that very claim."""

    worker: str
    attempt: int

    @classmethod
    def of(cls, job: dict) -> Lease:
        return cls(job["worker_id"], job["attempts"])


def _fence(lease: Lease | None) -> tuple[str, dict]:
    """The WHERE clause a fenced write adds."""
    if lease is None:
        return "", {}
    return " AND worker_id = :lease_worker AND attempts = :lease_attempt", {
        "lease_worker": lease.worker,
        "lease_attempt": lease.attempt,
    }


class Store(EvalStore):
    def __init__(self, url: str | Path):
        """`url`: a database URL, or the path of a SQLite file."""
        self.url = url if isinstance(url, str) and "://" in url else f"sqlite:///{Path(url)}"
        self.db = Database(self.url)
        self.applied_migrations = schema.migrate(self.db)

    @property
    def dialect(self) -> str:
        return self.db.dialect

    def describe(self) -> str:
        """The store's URL without a password."""
        return redact(self.url)

    def close(self) -> None:
        self.db.dispose()

    def _r1(self, sql: str, **args: Any) -> dict | None:
        return self.db.read(lambda c: _one(c, sql, **args))

    def _rall(self, sql: str, **args: Any) -> list[dict]:
        return self.db.read(lambda c: _all(c, sql, **args))

    def _w(self, sql: str, **args: Any) -> int:
        return self.db.write(lambda c: c.execute(sa.text(sql), args).rowcount)

    # -------------------------------------------------------------- settings
    def setting(self, key: str) -> str | None:
        row = self._r1("SELECT value FROM settings WHERE key = :k", k=key)
        return row["value"] if row else None

    def setting_or_set(self, key: str, value: str) -> str:
        """The stored value of `key`, storing `value` first if there is none (the
        first process to ask wins; every other gets the same answer)."""
        self.db.write(
            lambda c: _insert(c, "settings", {"key": key, "value": value}, on_conflict=" ON CONFLICT (key) DO NOTHING")
        )
        return self.setting(key)

    # ------------------------------------------------------------------ keys
    def create_key(self, owner: str) -> NewKey:
        new = NewKey(id=new_id("key"), owner=owner, created_at=now(), key="sk-oft-" + secrets.token_urlsafe(24))
        row = {"id": new.id, "key_hash": _hash(new.key), "owner": owner, "created_at": new.created_at}
        self.db.write(lambda c: _insert(c, "keys", row, on_conflict=" ON CONFLICT (id) DO NOTHING"))
        return new

    def owner_for_key(self, key: str) -> str | None:
        row = self._r1("SELECT owner FROM keys WHERE key_hash = :h", h=_hash(key))
        return row["owner"] if row else None

    def has_keys(self) -> bool:
        return self._r1("SELECT 1 AS x FROM keys LIMIT 1") is not None

    def list_keys(self) -> list[dict]:
        return self._rall("SELECT id, owner, created_at FROM keys ORDER BY created_at, id")

    def delete_key(self, owner: str, key_id: str) -> bool:
        return self._w("DELETE FROM keys WHERE id = :id AND owner = :o", id=key_id, o=owner) == 1

    # ----------------------------------------------------------------- files
    def add_file(self, **values: Any) -> dict:
        values.setdefault("id", new_id("file"))
        values.setdefault("created_at", now())
        self.db.write(lambda c: _insert(c, "files", values, on_conflict=" ON CONFLICT (id) DO NOTHING"))
        return self.get_file(values["owner"], values["id"])

    def get_file(self, owner: str, file_id: str) -> dict | None:
        return self._r1("SELECT * FROM files WHERE id = :id AND owner = :o", id=file_id, o=owner)

    def list_files(
        self, owner: str, purpose: str | None = None, limit: int = 10000, after: str | None = None, order: str = "desc"
    ) -> list[dict]:
        sql, args = "SELECT * FROM files WHERE owner = :o", {"o": owner, "lim": limit}
        if purpose:
            sql, args["p"] = sql + " AND purpose = :p", purpose
        if after and (ref := self.get_file(owner, after)):
            op = "<" if order == "desc" else ">"
            sql += f" AND (created_at, id) {op} (:rc, :rid)"
            args.update(rc=ref["created_at"], rid=ref["id"])
        direction = "DESC" if order == "desc" else "ASC"
        return self._rall(sql + f" ORDER BY created_at {direction}, id {direction} LIMIT :lim", **args)

    def delete_file(self, owner: str, file_id: str) -> dict | None:
        row = self.get_file(owner, file_id)
        if row:
            self._w("DELETE FROM files WHERE id = :id AND owner = :o", id=file_id, o=owner)
        return row

    # ------------------------------------------------------------------ jobs
    def create_job(self, values: dict, idempotency_key: str | None = None) -> tuple[dict, bool]:
        """Insert a job; with an idempotency key seen before, return the first job
        instead (created=False). Both happen in one transaction; two retries racing
        each other on two replicas still create one job (the loser's insert of the
        key conflicts, and it answers with the winner's job)."""
        owner, jid = values["owner"], values["id"]

        def create(c: Connection) -> tuple[str, bool]:
            if _one(c, "SELECT id FROM jobs WHERE id = :id", id=jid):  # this very call, retried after a lost COMMIT
                return jid, True
            if idempotency_key:
                row = {"owner": owner, "key": idempotency_key, "job_id": jid, "created_at": now()}
                if not _insert(c, "idempotency", row, on_conflict=" ON CONFLICT (owner, key) DO NOTHING"):
                    hit = _one(
                        c, "SELECT job_id FROM idempotency WHERE owner = :o AND key = :k", o=owner, k=idempotency_key
                    )
                    return hit["job_id"], False
            _insert(c, "jobs", values)
            return jid, True

        job_id, created = self.db.write(create)
        return self.get_job(None, job_id), created

    def get_job(self, owner: str | None, job_id: str) -> dict | None:
        if owner is None:  # a worker: no owner filter
            return self._r1("SELECT * FROM jobs WHERE id = :id", id=job_id)
        return self._r1("SELECT * FROM jobs WHERE id = :id AND owner = :o", id=job_id, o=owner)

    def list_jobs(self, owner: str, after: str | None = None, limit: int = 20) -> list[dict]:
        sql, args = "SELECT * FROM jobs WHERE owner = :o", {"o": owner, "lim": limit}
        if after and (ref := self.get_job(owner, after)):
            sql += " AND (created_at, id) < (:rc, :rid)"
            args.update(rc=ref["created_at"], rid=ref["id"])
        return self._rall(sql + " ORDER BY created_at DESC, id DESC LIMIT :lim", **args)

    def update_job(
        self,
        job_id: str,
        *,
        expect_status: tuple[str, ...] | None = None,
        expect_worker: Lease | None = None,
        events: list[dict] | None = None,
        **values: Any,
    ) -> bool:
        """Update fields; with `expect_status`, only if the job is in one of those
        states (a compare-and-set: cancel vs. succeed races resolve cleanly); with
        `expect_worker`, only if that lease still holds (a worker whose job was
        taken over writes nothing). `events` (add_event keyword dicts) are added in
        the same transaction, only if the update applied: a crash never leaves a
        status change without its event, or the reverse."""
        values = _enc(values)
        args = {f"v_{k}": v for k, v in values.items()} | {"jid": job_id}
        sql = f"UPDATE jobs SET {', '.join(f'{k} = :v_{k}' for k in values)} WHERE id = :jid"
        if expect_status:
            sql += f" AND status IN ({', '.join(f':s{i}' for i in range(len(expect_status)))})"
            args |= {f"s{i}": s for i, s in enumerate(expect_status)}
        fence, fargs = _fence(expect_worker)
        sql, args = sql + fence, args | fargs
        rows = [self._event(job_id, **ev) for ev in events or ()]  # ids fixed once: a retry adds no second copy

        def update(c: Connection) -> bool:
            if not c.execute(sa.text(sql), args).rowcount:
                return False
            for ev in rows:
                _insert(c, "events", ev, on_conflict=" ON CONFLICT (id) DO NOTHING")
            return True

        return self.db.write(update)

    def claim_next_job(self, worker: str, pid: int, *, max_ranks: int = 1, gpus: int = 0) -> dict | None:
        """Move the oldest queued job this worker can run (ranks and GPUs within its
        own) to running under a new lease. On PostgreSQL the row is locked with SKIP
        LOCKED, so workers claiming at once each get a different job without waiting.
        A job already running under this worker's id is handed back first: it is
        this worker's own claim whose COMMIT answer was lost to a dropped connection
        (a worker runs one job at a time, so it holds no other)."""

        def claim(c: Connection) -> str | None:
            mine = _one(c, "SELECT id FROM jobs WHERE status = 'running' AND worker_id = :w", w=worker)
            if mine:
                return mine["id"]
            row = _one(
                c,
                "SELECT id FROM jobs WHERE status = 'queued' AND ranks <= :r AND gpus <= :g "
                "ORDER BY created_at, id LIMIT 1" + self.db.skip_locked(),
                r=max_ranks,
                g=gpus,
            )
            if not row:
                return None
            taken = c.execute(
                sa.text(
                    "UPDATE jobs SET status = 'running', worker_id = :w, worker_pid = :pid, heartbeat_at = :hb, "
                    "attempts = attempts + 1, stalls = stalls + 1, started_at = COALESCE(started_at, :now) "
                    "WHERE id = :id AND status = 'queued'"
                ),
                {"w": worker, "pid": pid, "hb": time.time(), "now": now(), "id": row["id"]},
            ).rowcount
            return row["id"] if taken else None  # changed under us (cancelled): claim nothing this time

        job_id = self.db.write(claim)
        return self.get_job(None, job_id) if job_id else None

    def jobs_in(self, *statuses: str) -> list[dict]:
        names = ", ".join(f":s{i}" for i in range(len(statuses)))
        return self._rall(
            f"SELECT * FROM jobs WHERE status IN ({names}) ORDER BY created_at, id",
            **{f"s{i}": s for i, s in enumerate(statuses)},
        )

    def unfit_queued_jobs(self, max_ranks: int, gpus: int) -> list[dict]:
        """Queued jobs that need more ranks or GPUs than the given worker has."""
        return self._rall(
            "SELECT * FROM jobs WHERE status = 'queued' AND (ranks > :r OR gpus > :g) ORDER BY created_at, id",
            r=max_ranks,
            g=gpus,
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
        expect_worker: Lease | None = None,
    ) -> dict:
        """With `expect_worker`, raise NotOwner (and add nothing) unless that lease
        still holds. The job's row is locked first, so one job's events commit in
        the order of their sequence numbers (a reader paging by `after` misses none)."""
        values = self._event(job_id, message, level=level, type=type, data=data)

        def add(c: Connection) -> None:
            self._check_owner(c, job_id, expect_worker)
            _insert(c, "events", values, on_conflict=" ON CONFLICT (id) DO NOTHING")

        self.db.write(add)
        return values

    def _check_owner(self, c: Connection, job_id: str, lease: Lease | None) -> None:
        row = _one(c, "SELECT worker_id, attempts FROM jobs WHERE id = :id" + self.db.lock_row(), id=job_id)
        if lease is not None and (row is None or Lease(row["worker_id"], row["attempts"]) != lease):
            raise NotOwner(job_id)

    def last_metrics_step(self, job_id: str) -> int:
        """The highest step with a metrics event (0 if none)."""
        row = self._r1(
            f"SELECT MAX({self.db.json_int('data', 'step')}) AS s FROM events WHERE job_id = :id AND type = 'metrics'",
            id=job_id,
        )
        return int(row["s"] or 0) if row else 0

    def list_events(self, job_id: str, after: str | None = None, limit: int = 20, order: str = "desc") -> list[dict]:
        sql, args = "SELECT * FROM events WHERE job_id = :jid", {"jid": job_id, "lim": limit}
        if after:
            ref = self._r1("SELECT seq FROM events WHERE id = :id AND job_id = :jid", id=after, jid=job_id)
            if ref:
                sql, args["seq"] = sql + (" AND seq < :seq" if order == "desc" else " AND seq > :seq"), ref["seq"]
        direction = "DESC" if order == "desc" else "ASC"
        return self._rall(sql + f" ORDER BY seq {direction} LIMIT :lim", **args)

    # ----------------------------------------------------------- checkpoints
    def add_checkpoint(
        self,
        job_id: str,
        step: int,
        metrics: dict,
        model_name: str,
        path: str,
        event: dict | None = None,
        expect_worker: Lease | None = None,
    ) -> bool:
        """Register a checkpoint, with its event (add_event keyword dicts) in the
        same transaction. Registering a step again (a resumed attempt that finds
        it on disk) updates it and adds no second event. A new checkpoint is
        progress: the job's stall count starts again. Returns True if new.
        `expect_worker`: as for add_event."""
        row = {
            "id": new_id("ftckpt"),
            "job_id": job_id,
            "step": step,
            "created_at": now(),
            "metrics": metrics,
            "model_name": model_name,
            "path": path,
        }
        ev = self._event(job_id, **event) if event else None

        def add(c: Connection) -> bool:
            self._check_owner(c, job_id, expect_worker)
            updated = c.execute(
                sa.text(
                    "UPDATE checkpoints SET metrics = :m, model_name = :n, path = :p WHERE job_id = :j AND step = :s"
                ),
                {"m": json.dumps(metrics), "n": model_name, "p": path, "j": job_id, "s": step},
            ).rowcount
            if updated:
                return False
            _insert(c, "checkpoints", row)
            c.execute(sa.text("UPDATE jobs SET stalls = 0 WHERE id = :id"), {"id": job_id})
            if ev:
                _insert(c, "events", ev, on_conflict=" ON CONFLICT (id) DO NOTHING")
            return True

        return self.db.write(add)

    def list_checkpoints(self, job_id: str, after: str | None = None, limit: int = 10) -> list[dict]:
        sql, args = "SELECT * FROM checkpoints WHERE job_id = :jid", {"jid": job_id, "lim": limit}
        if after:
            ref = self._r1("SELECT step FROM checkpoints WHERE id = :id AND job_id = :jid", id=after, jid=job_id)
            if ref:
                sql, args["st"] = sql + " AND step < :st", ref["step"]
        return self._rall(sql + " ORDER BY step DESC LIMIT :lim", **args)

    def delete_checkpoint(self, job_id: str, step: int) -> None:
        self._w("DELETE FROM checkpoints WHERE job_id = :j AND step = :s", j=job_id, s=step)

    def checkpoint_by_model(self, owner: str, model_name: str) -> dict | None:
        return self._r1(
            "SELECT c.* FROM checkpoints c JOIN jobs j ON j.id = c.job_id WHERE c.model_name = :n AND j.owner = :o",
            n=model_name,
            o=owner,
        )

    # ---------------------------------------------------------------- models
    def add_model(self, **values: Any) -> None:
        values.setdefault("created_at", now())
        updates = ", ".join(f"{k} = excluded.{k}" for k in values if k != "id")
        self.db.write(lambda c: _insert(c, "models", values, on_conflict=f" ON CONFLICT (id) DO UPDATE SET {updates}"))

    def get_model(self, owner: str, model_id: str) -> dict | None:
        return self._r1("SELECT * FROM models WHERE id = :id AND owner = :o", id=model_id, o=owner)

    def list_models(self, owner: str) -> list[dict]:
        return self._rall("SELECT * FROM models WHERE owner = :o ORDER BY created_at, id", o=owner)

    def delete_model(self, owner: str, model_id: str) -> bool:
        def delete(c: Connection) -> bool:
            n = c.execute(sa.text("DELETE FROM models WHERE id = :id AND owner = :o"), {"id": model_id, "o": owner})
            c.execute(
                sa.text(
                    "DELETE FROM checkpoints WHERE job_id IN "
                    "(SELECT id FROM jobs WHERE fine_tuned_model = :id AND owner = :o)"
                ),
                {"id": model_id, "o": owner},
            )
            return n.rowcount == 1

        return self.db.write(delete)

    # ----------------------------------------------------------------- fleet
    def fleet_join(self, values: dict) -> None:
        """A worker or replica announces itself (fleet.Member.row())."""
        self.db.write(lambda c: _insert(c, "fleet", values, on_conflict=" ON CONFLICT (id) DO NOTHING"))

    def fleet_beat(self, member_id: str, **values: Any) -> bool:
        values = _enc({"heartbeat_at": time.time(), **values})
        sets = ", ".join(f"{k} = :{k}" for k in values)
        return self._w(f"UPDATE fleet SET {sets} WHERE id = :member", member=member_id, **values) == 1

    def fleet(self, since: float | None = None) -> list[dict]:
        """Members whose last heartbeat is after `since` (all if None), newest first."""
        if since is None:
            return self._rall("SELECT * FROM fleet ORDER BY kind, started_at DESC, id")
        return self._rall(
            "SELECT * FROM fleet WHERE heartbeat_at > :t AND stopped_at IS NULL ORDER BY kind, started_at DESC, id",
            t=since,
        )

    def fleet_member(self, member_id: str) -> dict | None:
        return self._r1("SELECT * FROM fleet WHERE id = :id", id=member_id)

    def fleet_prune(self, before: float) -> int:
        """Forget members silent since `before` (stopped or lost long ago)."""
        return self._w("DELETE FROM fleet WHERE heartbeat_at < :t", t=before)


@dataclass(frozen=True)
class NewKey:
    """A key just created: `key` is the secret, which only its hash is stored for."""

    id: str
    owner: str
    created_at: int
    key: str


class NotOwner(Exception):
    """The worker writing for a job no longer holds its lease (it was presumed dead
    and the job taken over)."""


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


__all__ = [
    "Store",
    "open_store",
    "Lease",
    "NotOwner",
    "NewKey",
    "SchemaTooNew",
    "StoreUnavailable",
    "TERMINAL",
    "new_id",
    "now",
]


def open_store(url: str | None = None) -> Store:
    """The store this process uses: `url` (--database-url), else OPENFT_DATABASE_URL,
    else SQLite under OPENFT_HOME."""
    from openft import home
    from openft.jobs.db import database_url

    return Store(database_url(url, home=home.home()))

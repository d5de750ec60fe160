"""Unit tier: the store's transactions and schema upgrades (Alembic), on real SQLite files.

The same store on PostgreSQL: tests/jobs/test_store_engines.py."""

from __future__ import annotations

import sqlite3
import threading

import pytest
import sqlalchemy as sa

from openft.jobs import schema
from openft.jobs.store import SchemaTooNew, Store

ALL = schema.revisions()  # oldest first

# The tables exactly as the first openft release created them (commit b78c163),
# written out here so that no later edit of the store's own constants can hide a
# database in the field that no longer upgrades.
ORIGINAL_SCHEMA = """
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


def _old_database(path) -> None:
    with sqlite3.connect(path) as conn:
        conn.executescript(ORIGINAL_SCHEMA)
        conn.execute(
            "INSERT INTO jobs (id, owner, model, status, created_at, training_file, spec, hyperparameters, "
            "method, seed) VALUES ('ftjob-1', 'o', 'm', 'queued', 1, 'f', '{}', '{}', 'supervised', 0)"
        )
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0


def _shape(path) -> dict:
    """Every table's columns (name, type, not-null, default, pk) and every index."""
    with sqlite3.connect(path) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        shape = {t: conn.execute(f"PRAGMA table_info({t})").fetchall() for t in tables}
        shape["indexes"] = conn.execute(
            "SELECT name, tbl_name FROM sqlite_master WHERE type = 'index' ORDER BY name"
        ).fetchall()
        return shape


def _revision(path) -> str:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT version_num FROM alembic_version").fetchone()[0]


def test_a_database_of_the_first_release_upgrades_in_place_once(tmp_path):
    old, fresh = tmp_path / "old.db", tmp_path / "fresh.db"
    _old_database(old)
    store = Store(old)
    assert store.applied_migrations == ALL[1:]  # stamped at the first release's revision, then every later step
    assert _revision(old) == schema.head()
    job = store.get_job(None, "ftjob-1")
    assert job["stalls"] == 0 and job["ranks"] == 1  # the old row kept, with the new columns' defaults
    assert Store(old).applied_migrations == []  # re-opening is a no-op
    assert Store(fresh).applied_migrations == ALL
    assert _shape(old) == _shape(fresh)  # upgraded and new databases end up alike


def test_a_database_that_gained_columns_before_versions_existed_upgrades(tmp_path):
    """The code before schema versions added `stalls` by looking for the column and
    left user_version at 0; that step must not add it a second time."""
    db = tmp_path / "openft.db"
    _old_database(db)
    with sqlite3.connect(db) as conn:
        conn.execute("ALTER TABLE jobs ADD COLUMN stalls INTEGER NOT NULL DEFAULT 0")
    assert Store(db).applied_migrations == ALL[2:]
    Store(tmp_path / "fresh.db")
    assert _shape(db) == _shape(tmp_path / "fresh.db")


def test_a_database_of_the_pre_alembic_releases_upgrades(tmp_path):
    """The releases before Alembic counted their steps in PRAGMA user_version (2 = stalls)."""
    db = tmp_path / "openft.db"
    _old_database(db)
    with sqlite3.connect(db) as conn:
        conn.execute("ALTER TABLE jobs ADD COLUMN stalls INTEGER NOT NULL DEFAULT 0")
        conn.execute("PRAGMA user_version = 2")
    assert Store(db).applied_migrations == ALL[2:]
    with sqlite3.connect(db) as conn:  # an openft of those releases reads this, and refuses the newer schema
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(ALL)


def test_stores_opened_at_once_apply_each_step_once(tmp_path):
    """Four stores opening one old database at once (the API and the worker start
    together): each step applies once and none fails. Repeated, since the race
    (switching a rollback-mode database to WAL) loses only now and then."""
    n = 4
    for round_ in range(60):
        db = tmp_path / f"openft-{round_}.db"
        _old_database(db)
        barrier, applied, errors = threading.Barrier(n), [], []

        def open_store(db=db, barrier=barrier, applied=applied, errors=errors):
            barrier.wait()
            try:
                applied.extend(Store(db).applied_migrations)
            except Exception as e:  # reported below: a thread's exception is otherwise lost
                errors.append(e)

        threads = [threading.Thread(target=open_store) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, f"round {round_}: {errors}"
        assert sorted(applied) == ALL[1:]


def test_a_database_from_a_newer_openft_is_refused(tmp_path):
    db = tmp_path / "openft.db"
    Store(db)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'f00d'")
    with pytest.raises(SchemaTooNew, match="revision f00d"):
        Store(db)


def test_a_pre_alembic_database_from_a_newer_openft_is_refused(tmp_path):
    db = tmp_path / "openft.db"
    _old_database(db)
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {len(ALL) + 1}")
    with pytest.raises(SchemaTooNew, match=f"schema version {len(ALL) + 1}"):
        Store(db)


def test_every_migration_says_what_it_changes():
    revisions = list(schema.script().walk_revisions())
    assert len(revisions) == len(ALL) and all((r.doc or "").strip() for r in revisions)


def test_a_failed_unit_of_work_is_rolled_back_whole(tmp_path):
    store = Store(tmp_path / "openft.db")

    def twice(c):
        c.exec_driver_sql("INSERT INTO keys (id, key_hash, owner, created_at) VALUES ('key-1', 'h', 'o', 1)")
        c.exec_driver_sql("INSERT INTO keys (id, key_hash, owner, created_at) VALUES ('key-1', 'h', 'o', 1)")

    with pytest.raises(sa.exc.IntegrityError, match="UNIQUE"):
        store.db.write(twice)
    assert store.list_keys() == []  # the first insert went with the second
    new = store.create_key("o")  # and the next write works
    assert store.owner_for_key(new.key) == "o"
    assert [k["id"] for k in store.list_keys()] == [new.id]


def test_a_full_disk_is_not_retried_as_an_unreachable_server(tmp_path):
    """Only a lost connection is waited out; a statement that fails fails at once."""
    from openft.jobs.db import _unreachable

    err = sa.exc.OperationalError("INSERT", {}, sqlite3.OperationalError("database or disk is full"))
    assert not _unreachable(err)


def test_create_key_returns_the_id_it_created(tmp_path):
    store = Store(tmp_path / "openft.db")
    a, b = store.create_key("o"), store.create_key("o")
    assert a.id != b.id and a.key != b.key
    assert {k["id"] for k in store.list_keys()} == {a.id, b.id}
    assert store.delete_key("o", a.id)
    assert store.owner_for_key(a.key) is None and store.owner_for_key(b.key) == "o"  # revoked: refused

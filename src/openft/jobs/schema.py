"""Bring a store's schema up to this openft's, with Alembic, on SQLite and PostgreSQL.

The migrations live in `openft/jobs/migrations/versions` (append only: a step once
released is never edited). Every process that opens the store runs `migrate`; it
holds the database's write lock (SQLite's BEGIN IMMEDIATE, a PostgreSQL advisory
lock) for the whole upgrade, so an API replica and workers starting together
apply each step exactly once. SQLite databases from before Alembic carry their
version in PRAGMA user_version and no alembic_version table: they are stamped by
what they hold, then upgraded in place.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from openft.jobs.db import Database, redact

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
LOCK_KEY = 0x0F7_5C4E  # the advisory lock every openft process takes to migrate


class SchemaTooNew(RuntimeError):
    """The database was written by a newer openft."""


def script() -> ScriptDirectory:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(cfg)


def revisions() -> list[str]:
    """Every revision, oldest first."""
    return [r.revision for r in reversed(list(script().walk_revisions()))]


def head() -> str:
    return script().get_current_head()


def current(conn: Connection) -> str | None:
    if not sa.inspect(conn).has_table("alembic_version"):
        return None
    return conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()


def _legacy_revision(conn: Connection) -> str | None:
    """The revision a pre-Alembic SQLite database is at (None: an empty database)."""
    inspector = sa.inspect(conn)
    if not inspector.has_table("jobs"):
        return None
    return "0002" if "stalls" in {c["name"] for c in inspector.get_columns("jobs")} else "0001"


def migrate(db: Database, target: str = "head") -> list[str]:
    """Upgrade to `target` (tests stop short of head to make an older database);
    returns the revisions this call applied (empty: it was current)."""
    scripts = script()
    known = set(revisions())
    applied: list[str] = []

    def upgrade(conn: Connection) -> None:
        if db.postgres:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": LOCK_KEY})
        at = current(conn)
        if at is not None and at not in known:
            raise SchemaTooNew(
                f"the job store at {redact(db.url)} is at schema revision {at}, newer than this openft's "
                f"{scripts.get_current_head()}: upgrade openft"
            )
        if at is None and not db.postgres:
            _refuse_newer_legacy(conn, db)
        with EnvironmentContext(
            Config(), scripts, fn=lambda rev, _ctx: scripts._upgrade_revs(target, rev), destination_rev=target
        ) as env:
            env.configure(
                connection=conn,
                on_version_apply=lambda step, **_: applied.append(step.up_revision_id),
            )
            if at is None and (legacy := _legacy_revision(conn)) is not None:
                env.get_context().stamp(scripts, legacy)
            env.run_migrations()
        if not db.postgres:
            # An openft from before Alembic reads only this: it refuses a newer database.
            reached = current(conn)
            conn.exec_driver_sql(f"PRAGMA user_version = {revisions().index(reached) + 1 if reached else 0}")

    db.write(upgrade)
    return [r for r in applied if r]


def _refuse_newer_legacy(conn: Connection, db: Database) -> None:
    version = conn.exec_driver_sql("PRAGMA user_version").scalar() or 0
    if version > len(revisions()):
        raise SchemaTooNew(
            f"the job store at {redact(db.url)} has schema version {version}, newer than this openft's "
            f"{len(revisions())}: upgrade openft"
        )

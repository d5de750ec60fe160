"""The tables as first released (SQLite only then; PostgreSQL gets the same shape).

Revision ID: 0001
Revises:
"""

import re

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen: the DDL of the first release. Databases of that time carry no Alembic
# version; openft.jobs.schema stamps them at 0001 or 0002 by what they hold.
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


def postgres_ddl(sql: str) -> str:
    """The same tables in PostgreSQL's words: 64-bit integers (epoch seconds, byte
    counts), double-precision heartbeats, a sequence for the event order."""
    sql = sql.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY")
    sql = re.sub(r"\bINTEGER\b", "BIGINT", sql)
    return re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)


def upgrade() -> None:
    bind = op.get_bind()
    sql = BASE_SCHEMA if bind.dialect.name == "sqlite" else postgres_ddl(BASE_SCHEMA)
    for statement in sql.split(";"):
        if statement.strip():
            op.execute(statement)


def downgrade() -> None:
    raise NotImplementedError("the job store is never downgraded")

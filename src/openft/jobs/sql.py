"""SQL helpers the store's parts share: ids, clocks, JSON columns, one-row and
many-row reads, inserts (text SQL over SQLAlchemy Core, the same on SQLite and
PostgreSQL)."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

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
    "capabilities",
    # the Evals API
    "data_source_config",
    "testing_criteria",
    "data_source",
    "result_counts",
    "per_testing_criteria_results",
    "per_model_usage",
    "datasource_item",
    "sample",
    "results",
}


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def _decode(row: sa.RowMapping) -> dict:
    return {k: (json.loads(v) if k in JSON_COLUMNS and v is not None else v) for k, v in row.items()}


def _enc(values: dict) -> dict:
    return {
        k: (json.dumps(v, ensure_ascii=False) if k in JSON_COLUMNS and v is not None else v) for k, v in values.items()
    }


def _one(conn: Connection, sql: str, **args: Any) -> dict | None:
    row = conn.execute(sa.text(sql), args).mappings().first()
    return _decode(row) if row else None


def _all(conn: Connection, sql: str, **args: Any) -> list[dict]:
    return [_decode(r) for r in conn.execute(sa.text(sql), args).mappings()]


def _insert(conn: Connection, table: str, values: dict, *, on_conflict: str = "") -> int:
    values = _enc(values)
    cols = ", ".join(values)
    params = ", ".join(f":{k}" for k in values)
    return conn.execute(sa.text(f"INSERT INTO {table} ({cols}) VALUES ({params}){on_conflict}"), values).rowcount

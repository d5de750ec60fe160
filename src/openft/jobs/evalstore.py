"""The Evals API's part of the store: evals, eval runs and their output items.

Mixed into `Store` (it uses the store's `db` and read/write helpers). Reads take
the caller's owner like every other object; a worker running an eval run passes
None. A run is claimed like a job: `worker_id` + `attempts` form its lease, and
every write the worker makes carries it, so a worker presumed dead writes nothing.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from openft.jobs.sql import _all, _enc, _insert, _one, new_id, now

RUN_TERMINAL = ("completed", "failed", "canceled")


def _page(table: str, where: str, args: dict, after: dict | None, order: str, limit: int) -> tuple[str, dict]:
    """SQL for one page in (created_at, id) order, starting after the row `after`."""
    sql = f"SELECT * FROM {table} WHERE {where}"
    if after:
        op = "<" if order == "desc" else ">"
        sql += f" AND (created_at, id) {op} (:after_c, :after_id)"
        args = args | {"after_c": after["created_at"], "after_id": after["id"]}
    direction = "DESC" if order == "desc" else "ASC"
    return sql + f" ORDER BY created_at {direction}, id {direction} LIMIT :limit", args | {"limit": limit}


class EvalStore:
    # ----------------------------------------------------------------- evals
    def create_eval(self, values: dict) -> dict:
        values = {"id": new_id("eval"), "created_at": now()} | values
        self.db.write(lambda c: _insert(c, "evals", values, on_conflict=" ON CONFLICT (id) DO NOTHING"))
        return self.get_eval(values["owner"], values["id"])

    def get_eval(self, owner: str | None, eval_id: str) -> dict | None:
        if owner is None:
            return self._r1("SELECT * FROM evals WHERE id = :id", id=eval_id)
        return self._r1("SELECT * FROM evals WHERE id = :id AND owner = :o", id=eval_id, o=owner)

    def list_evals(self, owner: str, after: str | None = None, limit: int = 20, order: str = "asc") -> list[dict]:
        ref = self.get_eval(owner, after) if after else None
        sql, args = _page("evals", "owner = :o", {"o": owner}, ref, order, limit)
        return self._rall(sql, **args)

    def update_eval(self, owner: str, eval_id: str, **values: Any) -> dict | None:
        values = _enc(values)
        if values:
            sets = ", ".join(f"{k} = :v_{k}" for k in values)
            args = {f"v_{k}": v for k, v in values.items()}
            self._w(f"UPDATE evals SET {sets} WHERE id = :id AND owner = :o", id=eval_id, o=owner, **args)
        return self.get_eval(owner, eval_id)

    def delete_eval(self, owner: str, eval_id: str) -> bool:
        """The eval with its runs and their output items, in one transaction."""

        def delete(c: Connection) -> bool:
            args = {"id": eval_id, "o": owner}
            if not c.execute(sa.text("DELETE FROM evals WHERE id = :id AND owner = :o"), args).rowcount:
                return False
            c.execute(sa.text("DELETE FROM eval_output_items WHERE eval_id = :id"), args)
            c.execute(sa.text("DELETE FROM eval_runs WHERE eval_id = :id AND owner = :o"), args)
            return True

        return self.db.write(delete)

    # ------------------------------------------------------------------ runs
    def create_eval_run(self, values: dict) -> dict:
        values = {"id": new_id("evalrun"), "created_at": now(), "status": "queued"} | values
        self.db.write(lambda c: _insert(c, "eval_runs", values, on_conflict=" ON CONFLICT (id) DO NOTHING"))
        return self.get_eval_run(values["owner"], values["eval_id"], values["id"])

    def add_finished_run(self, values: dict, rows: list[dict]) -> bool:
        """A run graded elsewhere (a checkpoint scored during training), with its
        items, in one transaction; a run of that id already there is kept as it was."""
        values = {"created_at": now(), "finished_at": now()} | values
        items = [
            {"id": new_id("outputitem"), "created_at": now(), "run_id": values["id"], "eval_id": values["eval_id"]} | r
            for r in rows
        ]

        def add(c: Connection) -> bool:
            if not _insert(c, "eval_runs", values, on_conflict=" ON CONFLICT (id) DO NOTHING"):
                return False
            for r in items:
                _insert(c, "eval_output_items", r, on_conflict=" ON CONFLICT (run_id, datasource_item_id) DO NOTHING")
            return True

        return self.db.write(add)

    def get_eval_run(self, owner: str | None, eval_id: str | None, run_id: str) -> dict | None:
        sql, args = "SELECT * FROM eval_runs WHERE id = :id", {"id": run_id}
        if owner is not None:
            sql, args = sql + " AND owner = :o AND eval_id = :e", args | {"o": owner, "e": eval_id}
        return self._r1(sql, **args)

    def list_eval_runs(
        self,
        owner: str,
        eval_id: str,
        after: str | None = None,
        limit: int = 20,
        order: str = "asc",
        status: str | None = None,
    ) -> list[dict]:
        where, args = "owner = :o AND eval_id = :e", {"o": owner, "e": eval_id}
        if status:
            where, args = where + " AND status = :s", args | {"s": status}
        ref = self.get_eval_run(owner, eval_id, after) if after else None
        sql, args = _page("eval_runs", where, args, ref, order, limit)
        return self._rall(sql, **args)

    def update_eval_run(
        self,
        run_id: str,
        *,
        expect_status: tuple[str, ...] | None = None,
        lease: tuple[str, int] | None = None,
        **values: Any,
    ) -> bool:
        """Compare-and-set: only from `expect_status`, only under `lease` (worker, attempt)."""
        values = _enc(values)
        args = {f"v_{k}": v for k, v in values.items()} | {"id": run_id}
        sql = f"UPDATE eval_runs SET {', '.join(f'{k} = :v_{k}' for k in values)} WHERE id = :id"
        if expect_status:
            sql += f" AND status IN ({', '.join(f':s{i}' for i in range(len(expect_status)))})"
            args |= {f"s{i}": s for i, s in enumerate(expect_status)}
        if lease:
            sql += " AND worker_id = :lw AND attempts = :la"
            args |= {"lw": lease[0], "la": lease[1]}
        return self._w(sql, **args) == 1

    def delete_eval_run(self, owner: str, eval_id: str, run_id: str) -> bool:
        def delete(c: Connection) -> bool:
            args = {"id": run_id, "o": owner, "e": eval_id}
            sql = "DELETE FROM eval_runs WHERE id = :id AND owner = :o AND eval_id = :e"
            if not c.execute(sa.text(sql), args).rowcount:
                return False
            c.execute(sa.text("DELETE FROM eval_output_items WHERE run_id = :id"), args)
            return True

        return self.db.write(delete)

    def claim_next_eval_run(self, worker: str) -> dict | None:
        """The oldest queued run, moved to in_progress under a new lease (SKIP LOCKED
        on PostgreSQL); a run this worker already holds is handed back first."""

        def claim(c: Connection) -> str | None:
            mine = _one(c, "SELECT id FROM eval_runs WHERE status = 'in_progress' AND worker_id = :w", w=worker)
            if mine:
                return mine["id"]
            row = _one(
                c,
                "SELECT id FROM eval_runs WHERE status = 'queued' ORDER BY created_at, id LIMIT 1"
                + self.db.skip_locked(),
            )
            if not row:
                return None
            taken = c.execute(
                sa.text(
                    "UPDATE eval_runs SET status = 'in_progress', worker_id = :w, attempts = attempts + 1, "
                    "heartbeat_at = :hb, started_at = COALESCE(started_at, :now) WHERE id = :id AND status = 'queued'"
                ),
                {"w": worker, "hb": time.time(), "now": now(), "id": row["id"]},
            ).rowcount
            return row["id"] if taken else None

        run_id = self.db.write(claim)
        return self.get_eval_run(None, None, run_id) if run_id else None

    def eval_runs_in(self, *statuses: str) -> list[dict]:
        names = ", ".join(f":s{i}" for i in range(len(statuses)))
        return self._rall(
            f"SELECT * FROM eval_runs WHERE status IN ({names})", **{f"s{i}": s for i, s in enumerate(statuses)}
        )

    # ----------------------------------------------------------- output items
    def add_output_items(self, rows: list[dict], lease: tuple[str, int]) -> bool:
        """Graded items of a run, all or none, only while the lease holds; an item
        already stored (a resumed run) is kept as it was."""
        run_id = rows[0]["run_id"] if rows else None
        rows = [{"id": new_id("outputitem"), "created_at": now()} | r for r in rows]

        def add(c: Connection) -> bool:
            held = _one(
                c,
                "SELECT id FROM eval_runs WHERE id = :id AND worker_id = :w AND attempts = :a AND status = 'in_progress'",
                id=run_id,
                w=lease[0],
                a=lease[1],
            )
            if not held:
                return False
            for r in rows:
                _insert(c, "eval_output_items", r, on_conflict=" ON CONFLICT (run_id, datasource_item_id) DO NOTHING")
            c.execute(
                sa.text("UPDATE eval_runs SET heartbeat_at = :hb WHERE id = :id"), {"hb": time.time(), "id": run_id}
            )
            return True

        return self.db.write(add) if rows else True

    def list_output_items(
        self, run_id: str, after: str | None = None, limit: int = 20, order: str = "asc", status: str | None = None
    ) -> list[dict]:
        """A page in the items' order in the data source (ids are random; the position is not)."""
        sql, args = "SELECT * FROM eval_output_items WHERE run_id = :r", {"r": run_id, "limit": limit}
        if status:
            sql, args = sql + " AND status = :s", args | {"s": status}
        ref = self.get_output_item(run_id, after) if after else None
        if ref:
            sql += f" AND datasource_item_id {'<' if order == 'desc' else '>'} :pos"
            args["pos"] = ref["datasource_item_id"]
        return self._rall(
            sql + f" ORDER BY datasource_item_id {'DESC' if order == 'desc' else 'ASC'} LIMIT :limit", **args
        )

    def get_output_item(self, run_id: str, item_id: str) -> dict | None:
        return self._r1("SELECT * FROM eval_output_items WHERE id = :id AND run_id = :r", id=item_id, r=run_id)

    def all_output_items(self, run_id: str) -> list[dict]:
        return self.db.read(
            lambda c: _all(c, "SELECT * FROM eval_output_items WHERE run_id = :r ORDER BY datasource_item_id", r=run_id)
        )

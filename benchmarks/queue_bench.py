"""The job queue under 8 worker processes: SQLite (the embedded default, the
baseline) vs PostgreSQL, side by side in one run.

Workers. 8 processes (multiprocessing, spawn), each with its own Store, started
once for the whole run and told which database to open before each phase (so
imports and engine start-up are outside every clock). In a round each worker
loops: claim the next job (`claim_next_job`; PostgreSQL: SELECT ... FOR UPDATE
SKIP LOCKED, SQLite: BEGIN IMMEDIATE), then mark it succeeded fenced by its
lease with one "done" event in the same write (as a real worker finishes a
job), until a claim finds the queue empty. The jobs are no-ops, so what is
measured is the store alone.

Phases:
1. Throughput and claim latency: --rounds rounds (3) of a queue of --jobs (400)
   pre-created jobs, on SQLite and then on PostgreSQL. jobs/min of a round = its
   jobs / (last finish - first claim started), over all workers; the table gives
   the median round and the range. Claim latency: the claim call (its write and
   the read of the claimed row) timed inside each worker under that contention,
   p50/p99 over every claim of every round.
2. A PostgreSQL restart (`pg_ctl stop -m fast`, then start) once a third of a
   fresh queue of --jobs is done, while the 8 workers claim. Reported: the stop,
   the start and the whole restart; recovery = from the stop to the first claim
   that returned after the server was down (so served by the restarted server),
   and from the server back up to that claim; the longest pause between two
   claims. SQLite has no server to restart: n/a.

Checked after every phase, from the store: every job succeeded, attempts == 1,
exactly one "done" event each (lost = not succeeded; doubled = claimed twice,
attempts != 1 or not one "done" event), and from the workers: every job claimed
by exactly one claim, no fenced finish refused. The exit status is 1 if any
job was lost or doubled.

The PostgreSQL server is a throwaway cluster from tests/pgserver.py (fsync
off), on the same machine as the workers: on a 2-core box the server, the 8
workers and this process share the cores.

    .venv/bin/python benchmarks/queue_bench.py [--jobs 400] [--rounds 3] [--workers 8] [--json]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

from figures import Report, add_json_flag

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


# ----------------------------------------------------------------- workers
def worker(n: int, commands, out) -> None:
    """One worker process: ("open", url) opens a store; ("go", tag) drains the
    queue and reports every claim; ("quit",) ends. Any exception is reported."""
    from openft.jobs.store import Lease, Store, now

    store = None
    while True:
        cmd = commands.get()
        try:
            if cmd[0] == "quit":
                return
            if cmd[0] == "open":
                if store is not None:
                    store.close()
                store = Store(cmd[1])
                out.put(("ready", n, None))
                continue
            claims, refused = [], []  # claims: (job id, claim started, claim returned)
            while True:
                t0 = time.time()
                job = store.claim_next_job(f"wrk-{n}", 10_000 + n)
                t1 = time.time()
                if job is None:
                    break
                claims.append((job["id"], t0, t1))
                ok = store.update_job(
                    job["id"],
                    expect_worker=Lease.of(job),
                    status="succeeded",
                    finished_at=now(),
                    events=[{"message": "done", "data": {"worker": n}}],
                )
                if not ok:
                    refused.append(job["id"])
            out.put(("done", n, {"claims": claims, "refused": refused, "last": time.time() if claims else None}))
        except BaseException:
            out.put(("error", n, traceback.format_exc()))
            return


class Pool:
    def __init__(self, workers: int):
        ctx = mp.get_context("spawn")
        self.out = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(workers)]
        self.procs = [
            ctx.Process(target=worker, args=(n, q, self.out), daemon=True) for n, q in enumerate(self.commands)
        ]
        for p in self.procs:
            p.start()

    def _collect(self, kind: str, timeout: float = 600) -> list:
        got, deadline = {}, time.monotonic() + timeout
        while len(got) < len(self.procs):
            try:
                what, n, value = self.out.get(timeout=1)
            except queue.Empty:
                dead = [n for n, p in enumerate(self.procs) if not p.is_alive() and n not in got]
                if dead or time.monotonic() > deadline:
                    raise SystemExit(f"worker(s) {dead or 'all'} gave no {kind!r} answer") from None
                continue
            if what == "error":
                raise SystemExit(f"worker {n} failed:\n{value}")
            got[n] = value
        return [got[n] for n in sorted(got)]

    def open(self, url: str) -> None:
        for q in self.commands:
            q.put(("open", url))
        self._collect("ready")

    def go(self) -> None:
        for q in self.commands:
            q.put(("go",))

    def results(self) -> list[dict]:
        return self._collect("done")

    def close(self) -> None:
        for q in self.commands:
            q.put(("quit",))
        for p in self.procs:
            p.join(10)


# ------------------------------------------------------------------ phases
def fill(store, tag: str, jobs: int) -> list[str]:
    from openft.jobs.store import now

    ids = [f"ftjob-{tag}-{i:05d}" for i in range(jobs)]
    for i, jid in enumerate(ids):
        store.create_job(
            {
                "id": jid,
                "owner": "bench",
                "model": "m",
                "status": "queued",
                "created_at": now() + i,  # a strict order: the queue is served oldest first
                "training_file": "file-x",
                "spec": {},
                "hyperparameters": {},
                "method": "supervised",
                "seed": 0,
            }
        )
    return ids


def succeeded_count(store) -> int:
    return store.db.read(lambda c: c.exec_driver_sql("SELECT COUNT(*) FROM jobs WHERE status = 'succeeded'").scalar())


def one_round(pool: Pool, store, tag: str, jobs: int, during=None) -> dict:
    ids = fill(store, tag, jobs)
    pool.go()
    extra = during(store) if during else {}
    results = pool.results()
    claims = [c for r in results for c in r["claims"]]
    start = min(t0 for _, t0, _ in claims)
    last = max(r["last"] for r in results if r["last"])
    return {
        "ids": ids,
        "claims": claims,
        "refused": [j for r in results for j in r["refused"]],
        "jobs_per_min": len(claims) / (last - start) * 60,
        "wall_s": last - start,
        **extra,
    }


def verify(store, ids: list[str], rounds: list[dict]) -> dict:
    """From the store and from the workers' own record of their claims."""
    rows = {j["id"]: j for j in store.jobs_in(*STATUSES)}
    claimed: dict[str, int] = {}
    for r in rounds:
        for jid, _, _ in r["claims"]:
            claimed[jid] = claimed.get(jid, 0) + 1
    lost = doubled = 0
    for jid in ids:
        job = rows.get(jid)
        if job is None or job["status"] != "succeeded":
            lost += 1
            continue
        done = sum(e["message"] == "done" for e in store.list_events(jid, limit=20))
        doubled += job["attempts"] != 1 or done != 1 or claimed.get(jid, 0) != 1
    return {
        "jobs": len(ids),
        "succeeded": sum(rows.get(j, {}).get("status") == "succeeded" for j in ids),
        "lost": lost,
        "doubled": doubled,
        "refused_finishes": sum(len(r["refused"]) for r in rounds),
        "unexpected_rows": len(set(rows) - set(ids)),
    }


def pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def throughput(pool: Pool, url: str, jobs: int, rounds: int) -> dict:
    from openft.jobs.store import Store

    store = Store(url)
    pool.open(url)
    done = [one_round(pool, store, f"r{k}", jobs) for k in range(rounds)]
    latencies = sorted(t1 - t0 for r in done for _, t0, t1 in r["claims"])
    rates = [r["jobs_per_min"] for r in done]
    figures = {
        "jobs_per_min": statistics.median(rates),
        "jobs_per_min_rounds": rates,
        "round_wall_s": [r["wall_s"] for r in done],
        "claim_p50_ms": statistics.median(latencies) * 1e3,
        "claim_p99_ms": pct(latencies, 0.99) * 1e3,
        "claims": len(latencies),
        **verify(store, [j for r in done for j in r["ids"]], done),
    }
    store.close()
    return figures


def restart(pool: Pool, pg, jobs: int) -> dict:
    from openft.jobs.store import Store

    url = pg.create_database("restart")
    store = Store(url)
    pool.open(url)

    def during(store) -> dict:
        while succeeded_count(store) < jobs // 3:
            time.sleep(0.005)
        t_stop = time.time()
        pg.stop("fast")
        t_down = time.time()
        pg.start()
        t_up = time.time()
        return {"t_stop": t_stop, "t_down": t_down, "t_up": t_up}

    r = one_round(pool, store, "restart", jobs, during)
    ends = sorted(t1 for _, _, t1 in r["claims"])
    after = [t for t in ends if t > r["t_down"]]
    first = after[0] if after else None
    window = [t for t in ends if t > r["t_stop"] - 1]
    latencies = sorted(t1 - t0 for _, t0, t1 in r["claims"])
    figures = {
        "stop_s": r["t_down"] - r["t_stop"],
        "start_s": r["t_up"] - r["t_down"],
        "restart_s": r["t_up"] - r["t_stop"],
        "recovery_from_stop_s": first - r["t_stop"] if first else None,
        "recovery_from_up_s": first - r["t_up"] if first else None,
        "done_before_stop": sum(t <= r["t_stop"] for t in ends),
        "done_after_down": len(after),
        "longest_claim_gap_s": max((b - a for a, b in zip(window, window[1:])), default=None),
        "claim_max_ms": latencies[-1] * 1e3,
        "jobs_per_min": r["jobs_per_min"],
        **verify(store, r["ids"], [r]),
    }
    store.close()
    return figures


# -------------------------------------------------------------------- main
def main() -> int:
    from pgserver import PgCluster, unavailable

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=400, help="jobs in each queue (400)")
    ap.add_argument("--rounds", type=int, default=3, help="queues drained per engine for throughput (3)")
    ap.add_argument("--workers", type=int, default=8, help="worker processes (8)")
    add_json_flag(ap)
    a = ap.parse_args()
    if why := unavailable():
        raise SystemExit(f"no PostgreSQL to compare with: {why}")
    report = Report(a.json, benchmark="queue_bench", jobs=a.jobs, rounds=a.rounds, workers=a.workers)
    m = report.figures["machine"]
    say = report.line
    say(
        f"{a.workers} worker processes, no-op jobs; {a.rounds} rounds of {a.jobs} jobs per engine; {m['cpu']}, {m['cores']} cores"
    )
    t_all = time.monotonic()
    pool = Pool(a.workers)
    try:
        with PgCluster() as pg, tempfile.TemporaryDirectory() as tmp:
            say(f"PostgreSQL: {pg.bin}, fsync off, port {pg.port}")
            lite = report.add("sqlite", throughput(pool, f"sqlite:///{Path(tmp) / 'openft.db'}", a.jobs, a.rounds))
            post = report.add("postgresql", throughput(pool, pg.create_database("queue"), a.jobs, a.rounds))
            rs = report.add("postgresql_restart", restart(pool, pg, a.jobs))
    finally:
        pool.close()
    report.add("bench_wall_s", time.monotonic() - t_all)

    say("")
    say(f"{'':34}{'SQLite':>12}{'PostgreSQL':>12}{'PG / SQLite':>13}")
    for key, label, fmt in (
        ("jobs_per_min", "jobs/min (median round)", ",.0f"),
        ("claim_p50_ms", "claim p50 ms", ".2f"),
        ("claim_p99_ms", "claim p99 ms", ".2f"),
    ):
        x, y = lite[key], post[key]
        say(f"{label:34}{x:>12{fmt}}{y:>12{fmt}}{y / x:>12.2f}x")
    for r, name in ((lite, "SQLite"), (post, "PostgreSQL")):
        lo, hi = min(r["jobs_per_min_rounds"]), max(r["jobs_per_min_rounds"])
        say(f"  {name} rounds: {lo:,.0f} .. {hi:,.0f} jobs/min, {r['claims']} claims timed")
    say(f"{'restart (stop + start) s':34}{'n/a':>12}{rs['restart_s']:>12.2f}")
    say(f"{'  stop / start s':34}{'n/a':>12}{rs['stop_s']:>6.2f} /{rs['start_s']:>5.2f}")
    rec, rec_up = rs["recovery_from_stop_s"], rs["recovery_from_up_s"]
    say(
        f"{'recovery: stop -> first claim s':34}{'n/a':>12}{rec:>12.2f}"
        if rec is not None
        else "no claim after restart"
    )
    if rec_up is not None:
        say(f"{'  server up -> first claim s':34}{'n/a':>12}{rec_up:>12.2f}")
    say(f"{'  longest pause between claims s':34}{'n/a':>12}{rs['longest_claim_gap_s']:>12.2f}")
    say(f"{'  slowest claim ms':34}{'n/a':>12}{rs['claim_max_ms']:>12.0f}")
    say(f"{'  jobs/min over the restart run':34}{'n/a':>12}{rs['jobs_per_min']:>12,.0f}")
    say(f"  {rs['done_before_stop']} jobs claimed before the stop, {rs['done_after_down']} after the restart")
    say("")
    ok = True
    for r, name in ((lite, "SQLite"), (post, "PostgreSQL"), (rs, "PostgreSQL, restart mid-run")):
        clean = r["lost"] == 0 and r["doubled"] == 0 and r["refused_finishes"] == 0 and r["unexpected_rows"] == 0
        ok &= clean
        say(
            f"{name:28} {r['succeeded']}/{r['jobs']} succeeded once: lost {r['lost']}, doubled {r['doubled']}, "
            f"fenced finishes refused {r['refused_finishes']}{'' if clean else '  <-- FAILED'}"
        )
    say(f"benchmark wall time {report.figures['bench_wall_s']:.0f} s")
    report.emit()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""The job queue under 8 workers: SQLite (the embedded default, the baseline) vs PostgreSQL.

8 worker processes, each with its own store, claim no-op jobs from one queue and
finish each as a real worker does (fenced by its lease, with its event), until the
queue is empty. Reported: jobs claimed and finished per minute, claim latency
p50/p99, jobs lost or done twice (0), and on PostgreSQL the recovery after a server
restart in the middle of a run (from the restart to the first claim after it).

    .venv/bin/python benchmarks/queue_bench.py [--jobs 400] [--workers 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from openft.hardware import device_name  # noqa: E402
from openft.jobs.store import Lease, Store, now  # noqa: E402


def fill(store: Store, n: int) -> None:
    for i in range(n):
        store.create_job(
            {
                "id": f"ftjob-{i:05d}",
                "owner": "bench",
                "model": "m",
                "status": "queued",
                "created_at": now(),
                "training_file": "file-x",
                "spec": {},
                "hyperparameters": {},
                "method": "supervised",
                "seed": 0,
            }
        )


def work(url: str, n: int, ready, go, out) -> None:
    """One worker: claim, finish, repeat; report (claim wall time, claim latency) per job."""
    store = Store(url)
    ready.put(n)
    go.wait()
    done = []
    while True:
        t0 = time.perf_counter()
        job = store.claim_next_job(f"wrk-{n}", 10_000 + n)
        latency = time.perf_counter() - t0
        if job is None:
            break
        store.update_job(
            job["id"],
            expect_worker=Lease.of(job),
            status="succeeded",
            finished_at=now(),
            events=[{"message": "done", "data": {"worker": n}}],
        )
        done.append((time.time(), latency))
    out.put(done)


def run_queue(url: str, jobs: int, workers: int, during=None) -> dict:
    """Fill the queue, run the workers; `during(store)` runs in this process while they work."""
    store = Store(url)
    fill(store, jobs)
    ctx = mp.get_context("spawn")
    ready, go, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=work, args=(url, n, ready, go, out)) for n in range(workers)]
    for p in procs:
        p.start()
    for _ in procs:  # every worker has opened its store (imports, schema check) before the clock starts
        ready.get(timeout=300)
    t0 = time.perf_counter()
    go.set()
    extra = during(store) if during else {}
    results = [out.get(timeout=600) for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    claims = [c for r in results for c in r]
    latencies = sorted(lat for _, lat in claims)
    return {
        "jobs_per_min": len(claims) / wall * 60,
        "wall_s": wall,
        "claim_p50_ms": statistics.median(latencies) * 1e3,
        "claim_p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1e3,
        **verify(store, jobs),
        **extra,
        "claim_times": [t for t, _ in claims],
    }


def verify(store: Store, jobs: int) -> dict:
    """Lost: a job not succeeded; doubled: claimed more than once, or more than one 'done' event."""
    rows = store.jobs_in("queued", "running", "succeeded", "failed")
    succeeded = [j for j in rows if j["status"] == "succeeded"]
    doubled = sum(
        j["attempts"] != 1 or sum(e["message"] == "done" for e in store.list_events(j["id"], limit=10)) != 1
        for j in succeeded
    )
    return {"lost": jobs - len(succeeded), "doubled": doubled}


def restart_midway(pg, jobs: int):
    def during(store: Store) -> dict:
        while len(store.jobs_in("succeeded")) < jobs // 3:
            time.sleep(0.01)
        t_stop = time.time()
        pg.stop("fast")
        t_down = time.time()
        pg.start()
        return {"restart_at": t_stop, "restart_s": time.time() - t_stop, "stop_s": t_down - t_stop}

    return during


def main() -> int:
    from pgserver import PgCluster

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=400)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    import os

    import torch

    machine = f"{device_name(torch.device('cpu'))}, {os.cpu_count()} cores"
    figures: dict = {"machine": machine, "jobs": args.jobs, "workers": args.workers}
    with PgCluster() as pg, tempfile.TemporaryDirectory() as tmp:
        sqlite = run_queue(f"sqlite:///{Path(tmp) / 'openft.db'}", args.jobs, args.workers)
        postgres = run_queue(pg.create_database("queue"), args.jobs, args.workers)
        restarted = run_queue(pg.create_database("restart"), args.jobs, args.workers, restart_midway(pg, args.jobs))
    times = sorted(restarted.pop("claim_times"))
    up_at = restarted["restart_at"] + restarted["restart_s"]
    after = [t for t in times if t > up_at]
    restarted["recovery_s"] = min(after) - up_at if after else None  # server ready -> first claim
    window = [t for t in times if t > restarted["restart_at"] - 1]
    restarted["claim_gap_s"] = max((b - a for a, b in zip(window, window[1:])), default=None)
    for r in (sqlite, postgres):
        r.pop("claim_times")
    figures.update(sqlite=sqlite, postgresql=postgres, postgresql_restart=restarted)
    say(f"{args.workers} workers, {args.jobs} no-op jobs each run; {figures['machine']}")
    say(f"{'':24}{'SQLite':>12}{'PostgreSQL':>12}{'PG / SQLite':>13}")
    for key, label in (
        ("jobs_per_min", "jobs/min"),
        ("claim_p50_ms", "claim p50 ms"),
        ("claim_p99_ms", "claim p99 ms"),
    ):
        a, b = sqlite[key], postgres[key]
        say(f"{label:24}{a:>12.1f}{b:>12.1f}{b / a:>12.2f}x")
    for r, name in ((sqlite, "SQLite"), (postgres, "PostgreSQL"), (restarted, "PostgreSQL, restarted")):
        say(f"{name:24} lost {r['lost']}, doubled {r['doubled']}")
    say(
        f"PostgreSQL restart mid-run: stop+start {restarted['restart_s']:.2f} s; first claim "
        f"{restarted['recovery_s']:.2f} s after the server was back; longest pause between claims "
        f"{restarted['claim_gap_s']:.2f} s; the run {restarted['jobs_per_min']:.0f} jobs/min"
    )
    if args.json:
        print(json.dumps(figures))
    return 0 if all(r["lost"] == 0 and r["doubled"] == 0 for r in (sqlite, postgres, restarted)) else 1


if __name__ == "__main__":
    sys.exit(main())

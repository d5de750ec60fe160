"""The SIGKILL campaign: real jobs on a real `openft serve --no-worker`, trained by
`openft worker` processes this harness starts and kills, one after another.

Each worker incarnation gets a fault plan from a seeded RNG: a named point and a
hit count (`OPENFT_FAULTS`, see openft.faults), or a kill from outside after a
random delay once it has claimed the job. After a death the next worker finds the
job orphaned (its worker pid is gone), queues it again and resumes it from its last
complete checkpoint. Every job is then checked against one uninterrupted run of
the same job (same file, same seed): status, metrics steps and values, checkpoint
events and folders, the store's checkpoints, and the final adapter's weights.

Used by tests/faults/test_kill_campaign.py and benchmarks/faults_run.py.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file

EXAMPLES = Path(__file__).resolve().parents[2] / "src" / "openft" / "examples"
TERMINAL = ("succeeded", "failed", "cancelled")
KINDS = ("step", "eval", "checkpoint.write", "checkpoint.commit", "checkpoint.prune", "register", "timed")
TRAIN_ROWS = 27  # 24 training and 3 validation examples: 24 steps, a checkpoint and an evaluation every 3
MAX_STALLS = 3  # openft.jobs.worker.MAX_ATTEMPTS


def rows(n: int = 40) -> list[dict]:
    lines = (EXAMPLES / "lumen_train.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines[:n]]


def jsonl(items) -> bytes:
    return ("\n".join(json.dumps(r, ensure_ascii=False) for r in items) + "\n").encode()


def wait_for(predicate, timeout: float = 300, every: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


@dataclass
class Kill:
    job: str
    how: str  # a fault point, or "timed" (SIGKILL from outside)
    plan: str
    pid: int


class Zygote:
    """Client of tests/faults/zygote.py: forks worker processes on request."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("zygote.py"))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        self._pids: queue.Queue[int] = queue.Queue()
        self.exits: dict[int, int] = {}
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(300):
            raise RuntimeError("the worker fork server did not start")

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            if "ready" in msg:
                self._ready.set()
            elif "pid" in msg:
                self._pids.put(msg["pid"])
            elif "exit" in msg:
                self.exits[msg["exit"]] = msg["code"]

    def fork(
        self,
        home: Path,
        plan: str = "",
        faults_dir: Path | None = None,
        env: dict | None = None,
        log: Path | None = None,
    ) -> int:
        """A new worker on OPENFT_HOME=`home` with fault plan `plan`; its output goes to `log`
        (home/workers.log by default)."""
        log = Path(log or Path(home) / "workers.log")
        req = {
            "plan": plan,
            "faults_dir": str(faults_dir or home),
            "log": str(log),
            "env": {**(env or {}), "OPENFT_HOME": str(home)},
        }
        with open(log, "a") as fh:
            fh.write(f"--- worker plan={plan!r}\n")
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        return self._pids.get(timeout=60)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


@dataclass
class Worker:
    """One forked `openft worker` process with an optional fault plan."""

    zygote: Zygote
    home: Path
    plan: str = ""
    faults_dir: Path | None = None
    env: dict | None = None
    log: Path | None = None
    pid: int = 0

    def start(self) -> Worker:
        self.pid = self.zygote.fork(self.home, self.plan, self.faults_dir, self.env, self.log)
        return self

    def poll(self) -> int | None:
        return self.zygote.exits.get(self.pid)

    def wait(self, timeout: float = 60) -> int:
        return wait_for(lambda: self.poll() is not None, timeout=timeout, every=0.02) and self.poll()

    def stop(self) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
                self.wait(60)
            except AssertionError:
                os.kill(self.pid, signal.SIGKILL)
                self.wait(60)


_STORES: dict[str, object] = {}


def store_of(where):
    """The store a campaign reads: `where` is a Store, or an OPENFT_HOME whose SQLite file it opens."""
    from openft.jobs.store import Store

    if isinstance(where, Store):
        return where
    key = str(Path(where) / "openft.db")
    if key not in _STORES:
        _STORES[key] = Store(Path(key))
    return _STORES[key]


def job_row(where, job_id: str) -> dict:
    return store_of(where).get_job(None, job_id)


def events(where, job_id: str) -> list[dict]:
    out = store_of(where).list_events(job_id, order="asc", limit=1_000_000)
    return [{**e, "data": e["data"] or {}} for e in out]


def store_checkpoints(where, job_id: str) -> dict[int, str]:
    return {r["step"]: r["path"] for r in store_of(where).list_checkpoints(job_id, limit=1_000_000)}


@dataclass
class JobRecord:
    id: str
    kills: list[Kill] = field(default_factory=list)
    attempts: int = 0


class Campaign:
    """Create jobs through the API and run them under killing workers until
    `kills` SIGKILLs have landed inside real jobs."""

    def __init__(
        self, server, zygote: Zygote, model: str, *, seed: int = 0, log=print, database_url: str | None = None
    ):
        """`database_url`: the store the server and its workers share (None: SQLite under the server's home)."""
        from openft.jobs.store import Store

        self.server, self.home, self.model = server, Path(server.home), model
        self.where = Store(database_url) if database_url else self.home
        self.env = {"OPENFT_DATABASE_URL": database_url} if database_url else {}
        self.zygote = zygote
        self.rng = random.Random(seed)
        self.log = log
        self.faults_dir = self.home / "faults"
        self.faults_dir.mkdir(exist_ok=True)
        c = server.client()
        self.file_id = c.files.create(file=("train.jsonl", jsonl(rows(TRAIN_ROWS))), purpose="fine-tune").id
        self.jobs: list[JobRecord] = []
        self.reference: str | None = None

    # ------------------------------------------------------------------ jobs
    def create_job(self) -> str:
        job = self.server.client().fine_tuning.jobs.create(
            model=self.model,
            training_file=self.file_id,
            seed=3,
            hyperparameters={"n_epochs": 1, "batch_size": 1},
        )
        wait_for(lambda: job_row(self.where, job.id)["status"] != "validating_files", timeout=60)
        return job.id

    def run_reference(self) -> str:
        """One uninterrupted run of the job every campaign job repeats."""
        jid = self.create_job()
        w = Worker(self.zygote, self.home, env=self.env).start()
        try:
            wait_for(lambda: job_row(self.where, jid)["status"] in TERMINAL, timeout=600)
        finally:
            w.stop()
        assert job_row(self.where, jid)["status"] == "succeeded", dict(job_row(self.where, jid))
        self.reference = jid
        return jid

    # ----------------------------------------------------------------- plans
    def _plan(self, jid: str) -> tuple[str, str]:
        """(kind, OPENFT_FAULTS) for the next worker running `jid`: kinds that have
        not landed yet come first (in a seeded random order), so every moment is
        covered; then any kind, with a random hit count."""
        if job_row(self.where, jid)["stalls"] >= MAX_STALLS - 1:
            return "none", ""  # a third attempt in a row without progress would (rightly) fail the job
        landed = {k.how for r in self.jobs for k in r.kills}
        pending = [k for k in KINDS if k not in landed]
        kind = self.rng.choice(pending or KINDS + ("timed",))
        total = self._total_steps()
        hit = {
            "step": lambda: self.rng.randint(1, total // 2),
            "eval": lambda: self.rng.randint(1, 3),
            "checkpoint.write": lambda: self.rng.randint(1, 3),
            "checkpoint.commit": lambda: self.rng.randint(1, 3),
            "checkpoint.prune": lambda: self.rng.randint(1, 2),
            "register": lambda: 1,
        }
        return (kind, f"{kind}:{hit[kind]()}") if kind in hit else (kind, "")

    def _total_steps(self) -> int:
        ev = events(self.where, self.reference) if self.reference else []
        started = [e for e in ev if e["message"].startswith("Fine-tuning started")]
        return started[-1]["data"]["total_steps"] if started else 24

    # -------------------------------------------------------------- campaign
    def run(self, kills: int, timeout: float = 1200) -> list[JobRecord]:
        if self.reference is None:
            self.run_reference()
        landed = 0
        deadline = time.time() + timeout
        while landed < kills:
            assert time.time() < deadline, f"campaign ran out of time after {landed} kills"
            rec = JobRecord(self.create_job())
            self.jobs.append(rec)
            landed += self._run_job(rec, kills - landed)
        return self.jobs

    def run_plans(self, plans: list[str]) -> JobRecord:
        """One job, its workers given these fault plans in turn (then none)."""
        rec = JobRecord(self.create_job())
        self.jobs.append(rec)
        for plan in plans + [""] * 5:
            if job_row(self.where, rec.id)["status"] in TERMINAL:
                break
            w = Worker(self.zygote, self.home, plan, self.faults_dir, self.env).start()
            rec.attempts += 1
            try:
                if self._watch(rec.id, w, timed=False):
                    rec.kills.append(Kill(rec.id, plan.split(":")[0], plan, w.pid))
            finally:
                w.stop()
        # The last death is only noticed by the next worker's sweep.
        if job_row(self.where, rec.id)["status"] not in TERMINAL:
            w = Worker(self.zygote, self.home, env=self.env).start()
            try:
                wait_for(lambda: job_row(self.where, rec.id)["status"] in TERMINAL, timeout=300)
            finally:
                w.stop()
        return rec

    def _run_job(self, rec: JobRecord, budget: int) -> int:
        landed = 0
        while True:
            status = job_row(self.where, rec.id)["status"]
            if status in TERMINAL:
                return landed
            kind, plan = self._plan(rec.id) if landed < budget else ("none", "")
            w = Worker(self.zygote, self.home, plan, self.faults_dir, self.env).start()
            rec.attempts += 1
            try:
                died = self._watch(rec.id, w, timed=kind == "timed")
            finally:
                w.stop()
            if died:
                how = kind if kind != "none" else "?"
                rec.kills.append(Kill(rec.id, how, plan or "timed", w.pid))
                landed += 1
                self.log(f"  kill {len(rec.kills)} of {rec.id}: {how} ({plan or 'timed'}) pid {w.pid}")

    def _watch(self, jid: str, w: Worker, *, timed: bool) -> bool:
        """Run until the job ends (False) or the worker dies inside it (True)."""
        claimed = wait_for(
            lambda: (
                w.poll() is not None
                or job_row(self.where, jid)["worker_pid"] == w.pid
                or job_row(self.where, jid)["status"] in TERMINAL
            ),
            timeout=300,
            every=0.05,
        )
        assert claimed
        if timed and w.poll() is None and job_row(self.where, jid)["worker_pid"] == w.pid:
            delay = self.rng.uniform(0.0, 3.0)
            end = time.time() + delay
            while time.time() < end and job_row(self.where, jid)["status"] not in TERMINAL:
                time.sleep(0.02)
            if job_row(self.where, jid)["status"] not in TERMINAL:
                os.kill(w.pid, signal.SIGKILL)
        wait_for(
            lambda: w.poll() is not None or job_row(self.where, jid)["status"] in TERMINAL, timeout=600, every=0.05
        )
        if w.poll() is None:
            return False
        rc = w.wait()
        assert rc == -signal.SIGKILL, f"worker {w.pid} exited with {rc} (see {self.home / 'workers.log'})"
        return True

    # ------------------------------------------------------- several workers
    # Fault points that come after progress: a worker killed there leaves a new
    # checkpoint behind, so a job never fails for lack of progress, however often its
    # workers die (kills before any progress are the single-worker campaign's part).
    PAIR_PLANS = ("checkpoint.commit:1", "checkpoint.commit:2", "checkpoint.prune:1", "register:1")

    def run_concurrent(self, n_jobs: int, kills: int, workers: int = 2, timeout: float = 1500) -> list[JobRecord]:
        """`n_jobs` jobs queued at once, run by `workers` workers side by side that die
        `kills` times in all: by fault plans, and by SIGKILL from outside once the
        job a worker runs has made progress in its attempt. Each dead worker is
        replaced at once; its job is taken over by whichever worker sweeps first."""
        if self.reference is None:
            self.run_reference()
        recs = [JobRecord(self.create_job()) for _ in range(n_jobs)]
        self.jobs.extend(recs)
        slots: list[Worker | None] = [None] * workers
        landed, deadline = 0, time.time() + timeout
        while not all(job_row(self.where, r.id)["status"] in TERMINAL for r in recs):
            assert time.time() < deadline, f"concurrent campaign ran out of time after {landed} kills"
            for i, w in enumerate(slots):
                if w is not None and w.poll() is None:
                    continue
                if w is not None:
                    assert w.poll() == -signal.SIGKILL, f"worker {w.pid} exited with {w.poll()}"
                    landed += 1
                plan = self.rng.choice(self.PAIR_PLANS) if landed < kills else ""
                slots[i] = Worker(self.zygote, self.home, plan, self.faults_dir, self.env).start()
            if landed < kills and self.rng.random() < 0.05:
                self._kill_one_that_progressed([w for w in slots if w is not None])
            time.sleep(0.1)
        for w in slots:
            if w is not None:
                w.stop()
        self.concurrent_kills = landed
        return recs

    def _kill_one_that_progressed(self, workers: list[Worker]) -> None:
        running = {j["worker_pid"]: j for j in store_of(self.where).jobs_in("running")}
        ready = [w for w in workers if w.poll() is None and running.get(w.pid, {}).get("stalls") == 0]
        if ready:
            victim = self.rng.choice(ready)
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait(60)

    # ---------------------------------------------------------------- checks
    def check(self, jid: str) -> dict:
        """Every promise of the campaign, for one job; returns a few figures."""
        ref = self.reference
        job = job_row(self.where, jid)
        assert job["status"] == "succeeded", (jid, job["status"], job["error"])
        ev, ref_ev = events(self.where, jid), events(self.where, ref)
        assert len({e["id"] for e in ev}) == len(ev)
        total = self._total_steps()
        steps = [e["data"]["step"] for e in ev if e["type"] == "metrics"]
        assert steps == list(range(1, total + 1)), f"{jid}: metrics steps {steps}"  # forward only, none twice or lost
        losses = [e["data"]["train_loss"] for e in ev if e["type"] == "metrics"]
        ref_losses = [e["data"]["train_loss"] for e in ref_ev if e["type"] == "metrics"]
        assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < 1e-4, (jid, losses, ref_losses)

        def ckpt_steps(evs):
            return [e["data"]["step"] for e in evs if e["message"].startswith("Checkpoint created at step")]

        assert ckpt_steps(ev) == ckpt_steps(ref_ev), (jid, ckpt_steps(ev), ckpt_steps(ref_ev))
        run_dir = self.home / "runs" / jid
        ref_dir = self.home / "runs" / ref
        on_disk = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        assert on_disk == sorted(p.name for p in (ref_dir / "checkpoints").iterdir()), (jid, on_disk)
        assert all(n.startswith("step-") for n in on_disk), on_disk  # no half-written or half-deleted folder
        stored = store_checkpoints(self.where, jid)
        assert sorted(stored) == [int(n.split("-")[1]) for n in on_disk], (stored, on_disk)
        assert all(Path(p).is_dir() for p in stored.values())
        rows_ = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows_] == list(range(1, total + 1))
        ours = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
        theirs = load_file(str(ref_dir / "adapter" / "adapter_model.safetensors"))
        assert ours.keys() == theirs.keys()
        diff = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
        assert diff < 1e-5, (jid, diff)
        assert job["fine_tuned_model"]
        assert store_of(self.where).get_model(job["owner"], job["fine_tuned_model"]) is not None
        finished = [e for e in ev if e["message"] == "The job has successfully completed"]
        assert len(finished) == 1
        return {"max_weight_diff": diff, "resumes": sum(e["message"].startswith("Resumed from") for e in ev)}

    def summary(self) -> dict:
        kills = [k for r in self.jobs for k in r.kills]
        return {
            "faults_injected": len(kills),
            "by_point": dict(Counter(k.how for k in kills)),
            "jobs": len(self.jobs),
            "worker_starts": sum(r.attempts for r in self.jobs),
        }

"""The fleet: the workers and API replicas sharing one store, and the folder they share.

Each process announces itself in the store's `fleet` table and stamps a heartbeat
there; `openft status` and the console read it. A worker's row also says what it
can run (cores, GPUs, ranks) and which job it runs now.

Every member must see the same OPENFT_HOME (uploaded files, runs, adapters live
there, and the store holds paths into it): the store carries an id, and the
folder a marker file with the same id. A process whose folder lacks the marker,
or carries another store's, refuses to start (`HomeMismatch`), rather than train
on files it cannot see or write adapters no replica can load.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from openft.jobs.store import Store, now

MARKER = ".openft-store-id"
HEARTBEAT_S = 5.0  # how often a member stamps its row
LOST_AFTER_S = 30.0  # a member silent this long is shown as lost
FORGET_AFTER_S = 24 * 3600.0  # and forgotten after this


class HomeMismatch(SystemExit):
    """This process's OPENFT_HOME is not the folder the store's files live in."""


def machine() -> str:
    """Where a pid means something: the host name and this boot of it (a pid of
    another machine, or of this one before a reboot, says nothing here)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "?"
    return f"{socket.gethostname()}/{boot}"


def check_home(store: Store, home: Path, wait_s: float = 5.0) -> str:
    """Make sure `home` is the store's folder; returns the store id. The process
    that names a new store (or one from before ids) marks its own folder."""
    marker = home / MARKER
    mine = _read_marker(marker)
    store_id = store.setting("store_id")
    named_it = False
    if store_id is None:
        proposed = mine or f"store-{secrets.token_hex(8)}"
        store_id = store.setting_or_set("store_id", proposed)
        named_it = store_id == proposed
    if mine is None and (named_it or _sqlite_inside(store, home)):
        _write_marker(marker, store_id)
        return store_id
    deadline = time.monotonic() + wait_s
    while mine is None and time.monotonic() < deadline:  # the process that just named the store is marking it
        time.sleep(0.1)
        mine = _read_marker(marker)
    if mine is None:
        raise HomeMismatch(
            f"OPENFT_HOME={home} is not the folder the job store's files live in: it has no {MARKER} "
            f"(the store {store.describe()} is {store_id}). Every worker and API replica must see the same "
            "OPENFT_HOME, on a shared filesystem such as NFS: mount it and point OPENFT_HOME at it."
        )
    if mine != store_id:
        raise HomeMismatch(
            f"OPENFT_HOME={home} belongs to another job store ({MARKER} says {mine}, the store "
            f"{store.describe()} is {store_id}): point OPENFT_HOME at the folder this store's files live in."
        )
    return store_id


def _read_marker(marker: Path) -> str | None:
    try:
        return marker.read_text().strip() or None
    except FileNotFoundError:
        return None


def _write_marker(marker: Path, store_id: str) -> None:
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(f"{MARKER}.{os.getpid()}.tmp")
    tmp.write_text(store_id + "\n")
    os.replace(tmp, marker)


def _sqlite_inside(store: Store, home: Path) -> bool:
    """A SQLite file in the folder itself: the folder is the store's by construction."""
    import sqlalchemy as sa

    if store.dialect != "sqlite":
        return False
    db_file = Path(sa.engine.make_url(store.url).database or "")
    return db_file.resolve().parent == home.resolve()


def capabilities(max_ranks: int | None = None) -> dict:
    """What a worker can run: its cores, its GPUs, and the most ranks it starts for
    one job (default: one per GPU, else one per core)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cpus = os.cpu_count() or 1
    return {"cpus": cpus, "gpus": gpus, "max_ranks": max_ranks or gpus or cpus}


@dataclass
class Member:
    kind: str  # worker | replica
    address: str | None = None
    capabilities: dict | None = None
    id: str = field(default_factory=lambda: f"wrk-{secrets.token_hex(8)}")
    host: str = field(default_factory=socket.gethostname)
    machine: str = field(default_factory=machine)
    pid: int = field(default_factory=os.getpid)
    started_at: int = field(default_factory=now)

    def row(self) -> dict:
        return {**asdict(self), "heartbeat_at": time.time(), "job_id": None, "stopped_at": None}


def replica(address: str) -> Member:
    return Member(kind="replica", address=address, id=f"api-{secrets.token_hex(8)}")


class Presence:
    """A thread that keeps a member's heartbeat fresh while the process lives, and
    marks it stopped when the process ends cleanly."""

    def __init__(self, store: Store, member: Member, every_s: float):
        self.store, self.member, self.every_s = store, member, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"{member.kind}-presence", daemon=True)

    def start(self) -> Presence:
        self.store.fleet_join(self.member.row())
        self.store.fleet_prune(time.time() - FORGET_AFTER_S)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.store.fleet_beat(self.member.id)
            except Exception:  # noqa: BLE001 - a database away for a while must not end the heartbeat
                pass

    def stop(self) -> None:
        self._stop.set()
        try:
            self.store.fleet_beat(self.member.id, stopped_at=now(), job_id=None)
        except Exception:  # noqa: BLE001 - stopping with the database gone: the heartbeat just ages
            pass


def view(store: Store) -> dict:
    """The fleet as `openft status` and the console show it."""
    t = time.time()
    members = []
    for m in store.fleet():
        age = t - m["heartbeat_at"]
        state = "stopped" if m["stopped_at"] else ("lost" if age > LOST_AFTER_S else "alive")
        members.append({**m, "state": state, "heartbeat_age_s": round(age, 1)})
    running = {j["id"]: j for j in store.jobs_in("running")}
    for m in members:
        job = running.get(m["job_id"]) if m["job_id"] else None
        m["job"] = {"id": job["id"], "model": job["model"], "ranks": job["ranks"]} if job else None
    queued = store.jobs_in("queued")
    return {
        "object": "openft.fleet",
        "store": {"dialect": store.dialect, "url": store.describe()},
        "replicas": [m for m in members if m["kind"] == "replica"],
        "workers": [m for m in members if m["kind"] == "worker"],
        "jobs": {"queued": len(queued), "running": len(running)},
    }


def render(view: dict) -> str:
    """`openft status` as text: one line per member."""
    lines = [
        f"store: {view['store']['url']} ({view['store']['dialect']}); "
        f"jobs queued {view['jobs']['queued']}, running {view['jobs']['running']}"
    ]
    for title, key in (("API replicas", "replicas"), ("workers", "workers")):
        members = view[key]
        lines.append(f"{title}: {sum(m['state'] == 'alive' for m in members)} alive of {len(members)}")
        for m in members:
            what = m["address"] if m["kind"] == "replica" else _caps(m["capabilities"] or {})
            job = m["job"]
            runs = f" running {job['id']} ({job['model']}, {job['ranks']} rank(s))" if job else ""
            lines.append(
                f"  {m['id']}  {m['state']:<7} {m['host']} pid {m['pid']}  {what}  "
                f"heartbeat {m['heartbeat_age_s']:.0f} s ago{runs}"
            )
    return "\n".join(lines)


def _caps(c: dict) -> str:
    return f"{c.get('cpus', '?')} cpus, {c.get('gpus', 0)} gpus, up to {c.get('max_ranks', '?')} ranks"

"""The job store on SQLite and on a real PostgreSQL server, the same tests on both:
claims under contention, leases and fencing, claims that fit a worker, idempotency
across replicas, events in order, the fleet and the shared-folder check."""

from __future__ import annotations

import threading
import time

import pytest

from openft.jobs import fleet
from openft.jobs.store import Lease, NotOwner, Store, now


def _job(store: Store, jid: str, *, ranks: int = 1, gpus: int = 0, created_at: int | None = None) -> dict:
    row, created = store.create_job(
        {
            "id": jid,
            "owner": "o",
            "model": "m",
            "status": "queued",
            "created_at": created_at if created_at is not None else now(),
            "training_file": "file-x",
            "spec": {},
            "hyperparameters": {},
            "method": "supervised",
            "seed": 0,
            "ranks": ranks,
            "gpus": gpus,
        }
    )
    assert created
    return row


def test_the_schema_is_created_once_and_reopening_changes_nothing(store_url):
    first = Store(store_url)
    assert first.applied_migrations[-1] == "0004"
    assert Store(store_url).applied_migrations == []


def test_a_database_of_an_older_openft_is_upgraded_in_place(store_url):
    from openft.jobs import schema
    from openft.jobs.db import Database

    old = Database(_url(store_url))
    assert schema.migrate(old, "0002") == ["0001", "0002"]  # as an openft of that release left it
    with old.engine.begin() as c:
        c.exec_driver_sql(
            "INSERT INTO jobs (id, owner, model, status, created_at, training_file, spec, hyperparameters, method, "
            "seed) VALUES ('ftjob-old', 'o', 'm', 'queued', 1, 'f', '{}', '{}', 'supervised', 0)"
        )
    store = Store(store_url)
    assert store.applied_migrations == ["0003", "0004"]
    job = store.get_job(None, "ftjob-old")
    assert job["ranks"] == 1 and job["gpus"] == 0 and job["worker_id"] is None  # kept, with the new defaults
    assert store.claim_next_job("wrk-new", 1)["id"] == "ftjob-old"


def _url(store_url: str) -> str:
    from openft.jobs.db import database_url

    return database_url(store_url, home=None)


def test_eight_workers_claiming_at_once_each_job_is_claimed_once(store_url):
    store = Store(store_url)
    for i in range(40):
        _job(store, f"ftjob-{i:02d}", created_at=1000 + i)
    claimed: dict[str, list[str]] = {}
    barrier, errors = threading.Barrier(8), []

    def worker(n: int) -> None:
        mine = Store(store_url)  # each worker its own engine and connections, as separate processes have
        barrier.wait()
        try:
            while (job := mine.claim_next_job(f"wrk-{n}", 1000 + n)) is not None:
                claimed.setdefault(job["id"], []).append(f"wrk-{n}")
                assert mine.update_job(job["id"], expect_worker=Lease.of(job), status="succeeded")
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(claimed) == [f"ftjob-{i:02d}" for i in range(40)]  # none lost
    assert all(len(w) == 1 for w in claimed.values()), claimed  # none twice
    assert len({w for ws in claimed.values() for w in ws}) > 1  # the work was shared


def test_a_worker_that_lost_its_lease_writes_nothing(store_url):
    store = Store(store_url)
    _job(store, "ftjob-1")
    first = store.claim_next_job("wrk-a", 11)
    old = Lease.of(first)
    # Presumed dead: the job is put back in the queue under its lease, and taken by another worker.
    assert store.update_job("ftjob-1", expect_worker=old, status="queued", worker_id=None)
    second = store.claim_next_job("wrk-b", 22)
    assert second["id"] == "ftjob-1" and second["attempts"] == 2
    assert not store.update_job("ftjob-1", expect_worker=old, status="failed")
    with pytest.raises(NotOwner):
        store.add_event("ftjob-1", "Step 3", type="metrics", data={"step": 3}, expect_worker=old)
    with pytest.raises(NotOwner):
        store.add_checkpoint("ftjob-1", 3, {}, "m:ckpt-step-3", "/x", expect_worker=old)
    # Even the same worker id with an older claim is stale: the attempt is part of the token.
    assert not store.update_job("ftjob-1", expect_worker=Lease("wrk-b", 1), trained_tokens=1)
    assert store.update_job("ftjob-1", expect_worker=Lease.of(second), trained_tokens=5)
    job = store.get_job(None, "ftjob-1")
    assert job["status"] == "running" and job["worker_id"] == "wrk-b" and job["trained_tokens"] == 5
    assert store.list_checkpoints("ftjob-1") == [] and store.list_events("ftjob-1") == []


def test_a_worker_claims_only_the_jobs_it_can_run(store_url):
    store = Store(store_url)
    _job(store, "ftjob-big", ranks=4, created_at=1)
    _job(store, "ftjob-gpu", gpus=1, created_at=2)
    _job(store, "ftjob-small", created_at=3)
    assert store.claim_next_job("wrk-cpu", 1, max_ranks=2, gpus=0)["id"] == "ftjob-small"
    assert store.claim_next_job("wrk-cpu2", 2, max_ranks=2, gpus=0) is None  # the other two do not fit
    assert {j["id"] for j in store.unfit_queued_jobs(2, 0)} == {"ftjob-big", "ftjob-gpu"}
    assert store.claim_next_job("wrk-gpu", 3, max_ranks=1, gpus=1)["id"] == "ftjob-gpu"
    assert store.claim_next_job("wrk-big", 4, max_ranks=8, gpus=0)["id"] == "ftjob-big"


def test_a_claim_whose_answer_was_lost_is_handed_back_not_doubled(store_url):
    store = Store(store_url)
    _job(store, "ftjob-1", created_at=1)
    _job(store, "ftjob-2", created_at=2)
    first = store.claim_next_job("wrk-a", 1)
    again = store.claim_next_job("wrk-a", 1)  # as a retry after a COMMIT whose answer never came
    assert again["id"] == first["id"] and again["attempts"] == first["attempts"] == 1
    assert store.get_job(None, "ftjob-2")["status"] == "queued"


def test_one_idempotency_key_makes_one_job_across_replicas(store_url):
    replicas = [Store(store_url) for _ in range(4)]
    barrier, results = threading.Barrier(4), []

    def create(n: int) -> None:
        barrier.wait()
        row, created = replicas[n].create_job(
            {
                "id": f"ftjob-{n}",
                "owner": "o",
                "model": "m",
                "status": "queued",
                "created_at": now(),
                "training_file": "f",
                "spec": {},
                "hyperparameters": {},
                "method": "supervised",
                "seed": 0,
            },
            idempotency_key="retry-me",
        )
        results.append((row["id"], created))

    threads = [threading.Thread(target=create, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({jid for jid, _ in results}) == 1  # every replica answered with the one job
    assert sum(created for _, created in results) == 1
    assert len(replicas[0].list_jobs("o")) == 1


def test_events_page_in_order_and_the_last_metrics_step_is_read_from_json(store_url):
    store = Store(store_url)
    _job(store, "ftjob-1")
    ids = [store.add_event("ftjob-1", f"Step {s}", type="metrics", data={"step": s})["id"] for s in (1, 2, 10)]
    store.add_event("ftjob-1", "a note")
    assert store.last_metrics_step("ftjob-1") == 10  # numerically, not as text ("10" < "2")
    asc = store.list_events("ftjob-1", order="asc", limit=100)
    assert [e["id"] for e in asc[:3]] == ids
    assert [e["message"] for e in store.list_events("ftjob-1", after=ids[0], order="asc")] == [
        "Step 2",
        "Step 10",
        "a note",
    ]
    assert asc[0]["data"] == {"step": 1}  # JSON comes back decoded


def test_deleting_a_model_on_one_replica_is_seen_by_another(store_url):
    a, b = Store(store_url), Store(store_url)
    a.add_model(id="ft:m:o::x", owner="o", base="m", job_id=None, path="/shared/x", kind="adapter")
    assert b.get_model("o", "ft:m:o::x")["path"] == "/shared/x"
    assert b.delete_model("o", "ft:m:o::x")
    assert a.get_model("o", "ft:m:o::x") is None and a.list_models("o") == []


def test_the_fleet_shows_members_their_heartbeats_and_jobs(store_url):
    store = Store(store_url)
    _job(store, "ftjob-1")
    worker = fleet.Member(kind="worker", capabilities={"cpus": 2, "gpus": 0, "max_ranks": 2})
    api = fleet.replica("127.0.0.1:8000")
    store.fleet_join(worker.row())
    store.fleet_join(api.row())
    job = store.claim_next_job(worker.id, worker.pid)
    assert store.fleet_beat(worker.id, job_id=job["id"])
    view = fleet.view(store)
    assert [m["id"] for m in view["workers"]] == [worker.id] and [m["id"] for m in view["replicas"]] == [api.id]
    w = view["workers"][0]
    assert w["state"] == "alive" and w["job"]["id"] == "ftjob-1" and w["capabilities"]["max_ranks"] == 2
    assert view["jobs"] == {"queued": 0, "running": 1}
    store.fleet_beat(api.id, stopped_at=now())
    text = fleet.render(fleet.view(store))
    assert "stopped" in text and "running ftjob-1" in text and "1 alive of 1" in text


def test_a_folder_that_is_not_the_stores_is_refused(store_url, tmp_path):
    store = Store(store_url)
    shared, other = tmp_path / "shared-home", tmp_path / "local-home"
    store_id = fleet.check_home(store, shared)  # the first process names the store and marks its folder
    assert (shared / fleet.MARKER).read_text().strip() == store_id
    assert fleet.check_home(Store(store_url), shared) == store_id  # the same folder: accepted
    if store.dialect == "sqlite":
        return  # a SQLite store lives in its own folder; a worker elsewhere opens another file
    with pytest.raises(fleet.HomeMismatch, match="shared filesystem"):
        fleet.check_home(Store(store_url), other, wait_s=0.2)
    (other / fleet.MARKER).parent.mkdir(parents=True)
    (other / fleet.MARKER).write_text("store-of-someone-else\n")
    with pytest.raises(fleet.HomeMismatch, match="belongs to another job store"):
        fleet.check_home(Store(store_url), other)


def test_a_restarted_postgresql_loses_and_doubles_nothing(pg_cluster):
    """Writes go on through a server restart: each waits it out and lands once."""
    store = Store(pg_cluster.create_database("restart_writes"))
    _job(store, "ftjob-1")
    written, errors, done = [], [], threading.Event()

    def writer() -> None:
        step = 0
        while not done.is_set() or step < 40:
            step += 1
            try:
                store.add_event("ftjob-1", f"Step {step}", type="metrics", data={"step": step})
                written.append(step)
            except Exception as e:  # reported below
                errors.append(e)
                return

    t = threading.Thread(target=writer)
    t.start()
    deadline = time.time() + 30
    while len(written) < 10 and time.time() < deadline:
        time.sleep(0.01)
    pg_cluster.restart()
    done.set()
    t.join(timeout=120)
    assert not errors, errors
    steps = [e["data"]["step"] for e in store.list_events("ftjob-1", order="asc", limit=100_000)]
    assert steps == written == list(range(1, len(written) + 1))  # every write once, in order


def test_a_database_down_for_longer_than_the_retry_budget_is_a_clean_error(tmp_path, monkeypatch):
    from pgserver import PgCluster, unavailable

    from openft.jobs.db import StoreUnavailable

    if unavailable():
        pytest.skip(unavailable())
    with PgCluster() as pg:  # its own server: this test stops it
        store = Store(pg.create_database("down"))
        pg.stop()
        monkeypatch.setenv("OPENFT_DATABASE_RETRY_S", "1")
        with pytest.raises(StoreUnavailable, match="unreachable") as e:
            store.get_job(None, "ftjob-1")
        assert pg.user in str(e.value) and "***" not in str(e.value)
        pg.start()
        assert store.get_job(None, "ftjob-1") is None  # back: the same store object works again


def test_urls_pick_psycopg_and_never_show_a_password(tmp_path, monkeypatch):
    from openft.jobs.db import database_url, redact

    monkeypatch.delenv("OPENFT_DATABASE_URL", raising=False)
    assert database_url(home=tmp_path) == f"sqlite:///{tmp_path / 'openft.db'}"
    assert database_url("postgres://u:pw@db/x", home=tmp_path) == "postgresql+psycopg://u:pw@db/x"
    monkeypatch.setenv("OPENFT_DATABASE_URL", "postgresql://u:pw@db:5432/x")
    assert database_url(home=tmp_path) == "postgresql+psycopg://u:pw@db:5432/x"
    assert redact("postgresql+psycopg://u:s3cret@db:5432/x") == "postgresql+psycopg://u:***@db:5432/x"
    with pytest.raises(ValueError, match="must start with sqlite:// or postgresql://"):
        database_url("mysql://u:s3cret@db/x", home=tmp_path)
    try:
        database_url("mysql://u:s3cret@db/x", home=tmp_path)
    except ValueError as e:
        assert "s3cret" not in str(e)


def test_a_job_no_live_worker_can_run_is_warned_about_once(store_url):
    from openft.jobs.worker import warn_unrunnable

    store = Store(store_url)
    _job(store, "ftjob-big", ranks=4)
    _job(store, "ftjob-ok", ranks=2)
    store.fleet_join(fleet.Member(kind="worker", capabilities={"cpus": 2, "gpus": 0, "max_ranks": 2}).row())
    assert warn_unrunnable(store) == ["ftjob-big"]
    assert warn_unrunnable(store) == []  # once
    (event,) = store.list_events("ftjob-big")
    assert (
        event["level"] == "warn" and "needs 4 rank(s)" in event["message"] and "at most 2 rank(s)" in event["message"]
    )
    assert store.get_job(None, "ftjob-big")["status"] == "queued"  # still waiting for a bigger worker
    assert store.list_events("ftjob-ok") == []

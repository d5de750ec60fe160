"""The SIGKILL campaign against PostgreSQL with two workers side by side: jobs
queued at once, workers killed at random moments after progress (fault points and
SIGKILL from outside), every dead worker replaced. Every job still succeeds, each
step is reported once, and each ends exactly as one uninterrupted run does. Then
the server itself is restarted under running jobs."""

from __future__ import annotations

import os
import threading

import pytest
from serve.conftest import TINY, Server

from .campaign import Campaign, Worker, events, job_row, wait_for
from .conftest import make_home

pytestmark = pytest.mark.integration

KILLS = int(os.environ.get("OPENFT_FAULT_KILLS_PG", "6"))


@pytest.fixture(scope="module")
def pg_server(tmp_path_factory, session_home, tiny_model_dir, pg_cluster):
    url = pg_cluster.create_database("campaign")
    s = Server(
        make_home(tmp_path_factory, session_home, "pg-faults-home"),
        "--no-worker",
        "--database-url",
        url,
        models={TINY: tiny_model_dir},
    )
    s.start()
    yield s, url
    s.stop()


@pytest.fixture(scope="module")
def campaign(pg_server, zygote):
    server, url = pg_server
    c = Campaign(server, zygote, TINY, seed=20261202, log=lambda *a: None, database_url=url)
    c.run_reference()
    return c


def test_two_workers_killed_at_random_every_job_succeeds_once(campaign):
    recs = campaign.run_concurrent(n_jobs=3, kills=KILLS, workers=2)
    assert campaign.concurrent_kills >= KILLS
    taken_over = 0
    for rec in recs:
        campaign.check(rec.id)  # succeeded; each step reported once; same checkpoints and adapter as uninterrupted
        taken_over += sum(
            e["message"].startswith("The worker running this job stopped") for e in events(campaign.where, rec.id)
        )
    assert taken_over >= KILLS  # every death was noticed and its job handed on


def test_a_postgresql_restart_under_running_jobs_loses_and_doubles_nothing(campaign, pg_cluster):
    """Both workers train while the server restarts: they wait it out (the store
    retries with backoff), no worker dies, and the jobs end as uninterrupted runs."""
    jobs = [campaign.create_job(), campaign.create_job()]
    workers = [Worker(campaign.zygote, campaign.home, env=campaign.env).start() for _ in range(2)]
    try:
        wait_for(lambda: all(job_row(campaign.where, j)["status"] == "running" for j in jobs), timeout=300)
        wait_for(lambda: all(len(events(campaign.where, j)) > 6 for j in jobs), timeout=300, every=0.1)
        restarted = threading.Event()

        def restart():
            pg_cluster.restart()
            restarted.set()

        threading.Thread(target=restart).start()
        assert restarted.wait(120)
        wait_for(lambda: all(job_row(campaign.where, j)["status"] == "succeeded" for j in jobs), timeout=600)
        assert all(w.poll() is None for w in workers)  # rode it out, nobody died
    finally:
        for w in workers:
            w.stop()
    for j in jobs:
        campaign.check(j)

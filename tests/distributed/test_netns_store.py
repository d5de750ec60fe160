"""Workers on other machines (issue 18): an `openft worker` in a network namespace of
its own (its own address and host name) reaches PostgreSQL on this machine over a
veth, with the shared OPENFT_HOME. It trains a job made through this machine's API
replica; killed mid-job, its job is taken over by a worker here once its heartbeat
stops (its pid means nothing on this machine), and succeeds with each step once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from pgserver import PgCluster, unavailable
from serve.conftest import TINY, Server, jsonl, wait_for
from serve.test_api_e2e import _rows

from distributed.netns import linked_host

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

FAST = {"OPENFT_WORKER_HEARTBEAT_S": "0.5", "OPENFT_WORKER_STALE_S": "5"}


def test_a_worker_on_another_host_trains_and_its_job_survives_its_death(tmp_path, session_home, tiny_model_dir):
    if unavailable():
        pytest.skip(unavailable())
    from openft.jobs.store import Store

    with linked_host() as link, PgCluster(listen=("127.0.0.1", link.root_ip)) as pg:
        url = pg.create_database("fleet")
        home = tmp_path / "home"
        home.mkdir()
        (home / "models").symlink_to(session_home / "models", target_is_directory=True)
        api = Server(home, "--workers", "0", "--database-url", url, models={TINY: tiny_model_dir}).start()
        far_env = {**os.environ, **FAST, "OPENFT_HOME": str(home), "OPENFT_DATABASE_URL": pg.url("fleet", link.root_ip)}
        log = open(home / "far-worker.log", "ab")
        far = link.host.popen([sys.executable, "-m", "openft.cli", "worker"], far_env, stdout=log, stderr=log)
        near = None
        try:
            c = api.client()
            train = c.files.create(file=("t.jsonl", jsonl(_rows(24))), purpose="fine-tune")
            job = c.fine_tuning.jobs.create(
                model=TINY, training_file=train.id, seed=3, hyperparameters={"n_epochs": 1, "batch_size": 1}
            )
            store = Store(url)
            member = wait_for(lambda: [w for w in store.fleet() if w["pid"] == far.pid and w["job_id"]], timeout=300)
            assert member[0]["host"] == link.host.name and member[0]["job_id"] == job.id  # the far host runs it
            wait_for(lambda: store.list_checkpoints(job.id), timeout=300, every=0.1)  # it made progress
            os.kill(far.pid, signal.SIGKILL)
            far.wait(30)
            near_env = {**os.environ, **FAST, "OPENFT_HOME": str(home), "OPENFT_DATABASE_URL": url}
            near = subprocess.Popen(
                [sys.executable, "-m", "openft.cli", "worker"], env=near_env, stdout=log, stderr=log
            )
            done = wait_for(lambda: (j := c.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed") and j)
            assert done.status == "succeeded", done.error
            events = store.list_events(job.id, order="asc", limit=100_000)
            steps = [e["data"]["step"] for e in events if e["type"] == "metrics"]
            assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 20  # each step once, none lost
            assert sum(e["message"].startswith("The worker running this job stopped") for e in events) == 1
            assert store.get_job(None, job.id)["attempts"] == 2
        finally:
            for p in (far, near):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait()
            api.stop()

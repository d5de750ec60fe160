"""Many API replicas and workers over one PostgreSQL store and one shared OPENFT_HOME:
`openft serve --workers 0` twice (two replicas) and an `openft worker` of its own,
driven with the official `openai` client. A job created on one replica is trained by
the worker and served by the other; an idempotency key holds across replicas; a
model deleted on one is gone on all; the fleet shows every member; a worker whose
OPENFT_HOME is another folder refuses to start."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import openai
import pytest

from .conftest import TINY, Server, jsonl, wait_for
from .test_api_e2e import _rows

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, session_home, tiny_model_dir, pg_cluster):
    from pathlib import Path

    url = pg_cluster.create_database("replicas")
    home = tmp_path_factory.mktemp("replicas-home")
    (home / "models").symlink_to(Path(session_home) / "models", target_is_directory=True)
    a = Server(home, "--workers", "0", "--database-url", url, models={TINY: tiny_model_dir}).start()
    b = Server(home, "--workers", "0", "--database-url", url).start()
    env = {**os.environ, "OPENFT_HOME": str(home), "OPENFT_DATABASE_URL": url}
    log = open(home / "worker.log", "ab")
    worker = subprocess.Popen([sys.executable, "-m", "openft.cli", "worker"], env=env, stdout=log, stderr=log)
    yield {"a": a, "b": b, "url": url, "home": home, "worker": worker}
    worker.terminate()
    worker.wait(30)
    a.stop()
    b.stop()


@pytest.fixture(scope="module")
def trained(fleet):
    a, b = fleet["a"].client(), fleet["b"].client()
    train = a.files.create(file=("train.jsonl", jsonl(_rows(16))), purpose="fine-tune")
    body = dict(model=TINY, training_file=train.id, suffix="rep", seed=5, hyperparameters={"n_epochs": 1})
    job = a.fine_tuning.jobs.create(**body, extra_headers={"Idempotency-Key": "one-job-please"})
    again = b.fine_tuning.jobs.create(**body, extra_headers={"Idempotency-Key": "one-job-please"})
    assert again.id == job.id  # the retry reached the other replica: still one job
    done = wait_for(lambda: (j := b.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed") and j)
    assert done.status == "succeeded", done.error
    return done


def test_a_job_made_on_one_replica_is_served_by_the_other(fleet, trained):
    b = fleet["b"].client()
    reply = b.chat.completions.create(
        model=trained.fine_tuned_model, messages=[{"role": "user", "content": "Who are you?"}], max_tokens=8
    )
    assert reply.choices[0].message.content is not None and reply.model == trained.fine_tuned_model
    events = [e.message for e in fleet["a"].client().fine_tuning.jobs.list_events(trained.id, limit=100).data]
    assert sum(m.startswith("Created fine-tuning job") for m in events) == 1  # the idempotent retry added nothing
    assert any(m.startswith("New fine-tuned model created") for m in events)


def test_the_fleet_shows_both_replicas_and_the_worker(fleet, trained):
    view = httpx.get(fleet["a"].url + "/v1/fleet", timeout=10).json()
    assert view["store"]["dialect"] == "postgresql"
    alive = {m["address"] for m in view["replicas"] if m["state"] == "alive"}
    assert {f"127.0.0.1:{fleet['a'].port}", f"127.0.0.1:{fleet['b'].port}"} <= alive
    workers = [w for w in view["workers"] if w["state"] == "alive"]
    assert [w["pid"] for w in workers] == [fleet["worker"].pid]
    assert workers[0]["capabilities"]["max_ranks"] >= 1
    out = subprocess.run(
        [sys.executable, "-m", "openft.cli", "status", "--json", "--database-url", fleet["url"]],
        capture_output=True,
        text=True,
        env={**os.environ, "OPENFT_HOME": str(fleet["home"])},
        check=True,
    )
    cli = json.loads(out.stdout)
    assert {m["id"] for m in cli["replicas"]} == {m["id"] for m in view["replicas"]}


def test_a_chat_stream_and_the_next_request_ride_out_a_postgresql_restart(fleet, trained, pg_cluster):
    b = fleet["b"].client()
    stream = b.chat.completions.create(
        model=trained.fine_tuned_model,
        messages=[{"role": "user", "content": "Tell me about lamps."}],
        max_tokens=64,
        stream=True,
    )
    chunks = iter(stream)
    first = next(chunks)
    pg_cluster.restart()  # while the stream is open
    rest = list(chunks)
    assert first.choices and rest and rest[-1].choices[0].finish_reason in ("stop", "length")
    # The next calls need the store: they wait for it and answer as usual.
    assert b.fine_tuning.jobs.retrieve(trained.id).status == "succeeded"
    assert trained.fine_tuned_model in [m.id for m in fleet["a"].client().models.list().data]


def test_a_store_down_past_the_retry_budget_answers_503_in_the_envelope(tmp_path, monkeypatch):
    from pgserver import PgCluster
    from starlette.testclient import TestClient

    from openft.serve.app import ServeConfig, create_app

    with PgCluster() as pg:
        monkeypatch.setenv("OPENFT_HOME", str(tmp_path))
        monkeypatch.setenv("OPENFT_DATABASE_URL", pg.create_database("down"))
        app = create_app(ServeConfig(run_worker=False))
        with TestClient(app, base_url="http://127.0.0.1", client=("127.0.0.1", 50000)) as client:
            assert client.get("/v1/fine_tuning/jobs").status_code == 200
            pg.stop()
            monkeypatch.setenv("OPENFT_DATABASE_RETRY_S", "1")
            r = client.get("/v1/fine_tuning/jobs")
            assert r.status_code == 503
            err = r.json()["error"]
            assert err["code"] == "store_unavailable" and "unavailable" in err["message"]
            pg.start()
            assert client.get("/v1/fine_tuning/jobs").status_code == 200  # back once the database is


def test_a_model_deleted_on_one_replica_is_gone_on_every_replica(fleet, trained):
    a, b = fleet["a"].client(), fleet["b"].client()
    name = trained.fine_tuned_model
    b.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)  # loaded on b
    assert a.models.delete(name).deleted
    assert name not in [m.id for m in b.models.list().data]
    with pytest.raises(openai.NotFoundError):
        b.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_a_worker_on_another_folder_refuses_to_start(fleet, tmp_path):
    env = {**os.environ, "OPENFT_HOME": str(tmp_path / "not-shared"), "OPENFT_DATABASE_URL": fleet["url"]}
    out = subprocess.run(
        [sys.executable, "-m", "openft.cli", "worker", "--once"], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0
    assert "is not the folder the job store's files live in" in out.stderr and "shared filesystem" in out.stderr
    assert f"127.0.0.1:{fleet['url'].rsplit(':', 1)[1].split('/')[0]}/replicas" in out.stderr  # names the store

"""The worker hands a job's `resources` over its own launch flags to
`finetune_with_comparison` as a `Launch` (issue 17), and fails a job whose
resources cannot run with `invalid_resources` instead of dying. The training
itself is replaced by a stand-in that records the launch it is given: the
distributed path behind it is tested with the recipe."""

from __future__ import annotations

import os

import pytest

from openft.config import JobSpec
from openft.jobs.store import Store, new_id, now
from openft.jobs.worker import run_one
from openft.serve.fine_tuning import job_object
from openft.train.distributed import Launch


class Stop(Exception):
    """Raised by the stand-in: training is not the point here."""


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENFT_HOME", str(tmp_path))
    return Store(tmp_path / "openft.db")


@pytest.fixture
def launches(monkeypatch):
    seen: list[Launch | None] = []

    def stand_in(spec, **kw):
        seen.append(kw.get("launch"))
        raise Stop

    monkeypatch.setattr("openft.pipeline.finetune_with_comparison", stand_in)
    return seen


def claimed_job(store: Store, tmp_path, extra: dict) -> dict:
    """A job as the API stores it, with `extra` as given, claimed by this process."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    f = store.add_file(
        owner="local",
        filename="train.jsonl",
        bytes=data.stat().st_size,
        purpose="fine-tune",
        path=str(data),
        sha256="0",
        status="processed",
    )
    spec = JobSpec(model="tiny-llama")
    store.create_job(
        {
            "id": new_id("ftjob"),
            "owner": "local",
            "model": "tiny-llama",
            "status": "queued",
            "created_at": now(),
            "training_file": f["id"],
            "spec": spec.to_dict(),
            "hyperparameters": {},
            "method": "supervised",
            "seed": 0,
            "extra": extra,
        }
    )
    return store.claim_next_job("wrk-test", os.getpid())


def test_the_jobs_resources_reach_the_training_as_a_launch(store, tmp_path, launches):
    job = claimed_job(store, tmp_path, {"questions_file": None, "resources": {"nproc_per_node": 2}})
    run_one(store, job)
    assert launches == [Launch(nproc_per_node=2)]


def test_the_workers_flags_fill_in_what_the_job_does_not_say(store, tmp_path, launches):
    worker = Launch(nproc_per_node=3, max_restarts=4)
    asked = claimed_job(store, tmp_path, {"resources": {"nproc_per_node": 2}})
    run_one(store, asked, launch=worker)
    silent = claimed_job(store, tmp_path, {"questions_file": None})
    run_one(store, silent, launch=worker)
    assert launches == [Launch(nproc_per_node=2, max_restarts=4), Launch(nproc_per_node=3, max_restarts=4)]
    # The job now shows the ranks it trained on, not the 1 it would show unstarted.
    assert job_object(store.get_job(None, silent["id"]))["resources"] == {"nproc_per_node": 3}
    assert store.get_job(None, silent["id"])["extra"]["questions_file"] is None  # the rest of extra is kept


@pytest.mark.parametrize("resources", [{"nproc_per_node": 0}, {"nproc_per_node": "two"}, [2], "2"])
def test_resources_that_cannot_run_fail_the_job_not_the_worker(store, tmp_path, launches, resources):
    bad = claimed_job(store, tmp_path, {"resources": resources})
    run_one(store, bad)  # returns: the worker goes on to its next job
    failed = store.get_job(None, bad["id"])
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "invalid_resources" and failed["error"]["param"] == "resources"
    assert "resources" in failed["error"]["message"] or "nproc_per_node" in failed["error"]["message"]
    assert launches == []  # refused before any training (or model merge) began
    assert job_object(failed)["error"]["code"] == "invalid_resources"  # and the API can still show it
    events = [e["message"] for e in store.list_events(bad["id"], limit=50)]
    assert any(m.startswith("Job failed: The job's resources cannot run") for m in events), events
    good = claimed_job(store, tmp_path, {"resources": {"nproc_per_node": 2}})
    run_one(store, good)
    assert launches == [Launch(nproc_per_node=2)]


def test_failed_ranks_requeue_the_job_until_attempts_without_progress_run_out(store, tmp_path, monkeypatch):
    from openft.jobs.worker import MAX_ATTEMPTS
    from openft.train.launch import RankFailure

    def ranks_fail(spec, **kw):
        raise RankFailure("rank 1 on host-b died (SIGKILL) and torchrun stopped the run")

    monkeypatch.setattr("openft.pipeline.finetune_with_comparison", ranks_fail)
    job = claimed_job(store, tmp_path, {"resources": {"nproc_per_node": 2}})
    for attempt in range(1, MAX_ATTEMPTS + 1):
        run_one(store, job)
        after = store.get_job(None, job["id"])
        if attempt < MAX_ATTEMPTS:  # queued again, to resume from its last checkpoint
            assert after["status"] == "queued" and after["worker_pid"] is None
            job = store.claim_next_job("wrk-test", os.getpid())
            assert job is not None and job["stalls"] == attempt + 1
    assert after["status"] == "failed" and after["error"]["code"] == "training_failed"
    assert "rank 1 on host-b died" in after["error"]["message"]
    messages = [e["message"] for e in store.list_events(job["id"], limit=100)]
    assert sum("queued again" in m for m in messages) == MAX_ATTEMPTS - 1

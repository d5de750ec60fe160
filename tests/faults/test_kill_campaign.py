"""SIGKILL the worker at random moments of real jobs (during a step, while a
checkpoint is written, committed or pruned, during evaluation, while the model is
registered, and at random times from outside): every job still succeeds, resumed
from its last complete checkpoint, and ends exactly as an uninterrupted run of the
same job does. `benchmarks/faults_run.py` runs the same campaign and reports it."""

from __future__ import annotations

import os

import pytest

from .campaign import MAX_STALLS, Campaign, events, job_row

pytestmark = pytest.mark.integration

KILLS = int(os.environ.get("OPENFT_FAULT_KILLS", "20"))
REQUIRED = {"step", "checkpoint.write", "eval", "register"}  # the moments the issue names


@pytest.fixture(scope="module")
def campaign(bare_server, zygote, tiny_model_dir):
    c = Campaign(bare_server, zygote, tiny_model_dir, seed=20261128, log=lambda *a: None)
    c.run_reference()
    return c


def test_twenty_sigkills_every_job_succeeds_as_if_never_interrupted(campaign):
    jobs = campaign.run(KILLS)
    summary = campaign.summary()
    assert summary["faults_injected"] >= KILLS, summary
    assert REQUIRED <= set(summary["by_point"]), summary
    resumed = 0
    for rec in jobs:
        figures = campaign.check(rec.id)  # succeeded; steps forward only; nothing lost or twice; same adapter
        resumed += figures["resumes"]
        ev = events(campaign.home, rec.id)
        requeued = [e for e in ev if e["message"].startswith("The worker running this job stopped")]
        assert len(requeued) == len(rec.kills), (rec.id, len(requeued), rec.kills)
    assert resumed >= KILLS // 2  # most deaths came after a checkpoint, and were resumed from one


def test_a_job_killed_more_often_than_max_attempts_succeeds_while_it_makes_progress(campaign):
    # Each worker writes one checkpoint, then dies writing the next: progress every time.
    plans = ["checkpoint.write:2"] * (MAX_STALLS + 1)
    rec = campaign.run_plans(plans)
    assert len(rec.kills) == MAX_STALLS + 1
    campaign.check(rec.id)


def test_a_job_whose_worker_dies_without_progress_fails_after_max_attempts(campaign):
    # The first worker reaches a checkpoint and dies; then every worker dies in its
    # first step after resuming, before any new checkpoint.
    rec = campaign.run_plans(["checkpoint.write:2"] + ["step:1"] * MAX_STALLS)
    job = job_row(campaign.home, rec.id)
    assert job["status"] == "failed", dict(job)
    error = __import__("json").loads(job["error"])
    assert error["code"] == "worker_lost"
    assert f"stopped {MAX_STALLS} times in a row without reaching a new checkpoint" in error["message"]
    ev = events(campaign.home, rec.id)
    assert ev[-1]["message"].startswith("Job failed: the worker running this job stopped") and ev[-1]["level"] == "error"
    assert len(rec.kills) == 1 + MAX_STALLS

"""SIGKILL the worker at random moments of real jobs (during a step, while a
checkpoint is written, committed or pruned, during evaluation, while the model is
registered, and at random times from outside): every job still succeeds, resumed
from its last complete checkpoint, and ends exactly as an uninterrupted run of the
same job does. `benchmarks/faults_run.py` runs the same campaign and reports it."""

from __future__ import annotations

import os
import signal

import pytest
from serve.conftest import TINY

from .campaign import MAX_STALLS, Campaign, Worker, events, job_row, wait_for

pytestmark = pytest.mark.integration

KILLS = int(os.environ.get("OPENFT_FAULT_KILLS", "20"))
REQUIRED = {"step", "checkpoint.write", "eval", "register"}  # the moments the issue names


@pytest.fixture(scope="module")
def campaign(bare_server, zygote, tiny_model_dir):
    c = Campaign(bare_server, zygote, TINY, seed=20261128, log=lambda *a: None)
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
    error = job["error"]
    assert error["code"] == "worker_lost"
    assert f"stopped {MAX_STALLS} times in a row without reaching a new checkpoint" in error["message"]
    ev = events(campaign.home, rec.id)
    assert (
        ev[-1]["message"].startswith("Job failed: the worker running this job stopped") and ev[-1]["level"] == "error"
    )
    assert len(rec.kills) == 1 + MAX_STALLS


def test_a_frozen_worker_is_found_by_its_heartbeat_and_its_job_taken_over(campaign):
    """A worker that stops without dying (SIGSTOP: its pid lives on) is noticed by
    its missing heartbeat; another worker takes the job over, and the first one,
    once it runs again, writes nothing more for that job."""
    c, d = campaign, campaign.faults_dir
    env = {"OPENFT_WORKER_HEARTBEAT_S": "0.5", "OPENFT_WORKER_STALE_S": "4"}
    jid = c.create_job()
    # Frozen just after renaming its second checkpoint into place, before the store knows of it.
    a = Worker(c.zygote, c.home, "checkpoint.commit:2:hold", d, env).start()
    b = None
    try:
        wait_for(lambda: (d / "checkpoint.commit.held").exists(), timeout=300, every=0.05)
        os.kill(a.pid, signal.SIGSTOP)
        (d / "checkpoint.commit.go").write_text("")
        b = Worker(c.zygote, c.home, "", d, env).start()
        wait_for(lambda: job_row(c.home, jid)["worker_pid"] == b.pid, timeout=300, every=0.1)
        os.kill(a.pid, signal.SIGCONT)
        wait_for(lambda: job_row(c.home, jid)["status"] in ("succeeded", "failed"), timeout=300)
        c.check(jid)  # nothing from the frozen worker doubled or lost
        assert a.poll() is None  # it was not killed: it found itself replaced and let go
        assert f"job {jid} was taken over by another worker" in (c.home / "workers.log").read_text()
        ev = events(c.home, jid)
        assert sum(e["message"].startswith("The worker running this job stopped") for e in ev) == 1
    finally:
        os.kill(a.pid, signal.SIGCONT)
        a.stop()
        if b:
            b.stop()
        for name in ("checkpoint.commit.held", "checkpoint.commit.go"):
            (d / name).unlink(missing_ok=True)


def test_a_death_after_the_last_checkpoint_is_written_still_keeps_only_the_last_three(campaign):
    """Found by the campaign: a worker killed between renaming the final checkpoint
    into place and pruning the old ones left a fourth checkpoint behind (the
    resumed attempt had no step left to train, so it never pruned)."""
    total = campaign._total_steps()
    rec = campaign.run_plans([f"checkpoint.commit:{total // 3}"])  # the final checkpoint (one every 3 steps)
    assert len(rec.kills) == 1
    campaign.check(rec.id)  # same checkpoint folders and store rows as the uninterrupted run

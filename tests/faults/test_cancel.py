"""Cancelling a running job: the worker stops within the step it is in, and gives
the job's memory back (its resident set returns near where it was before the job),
ready for the next one."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve.conftest import jsonl, register

from .campaign import TRAIN_ROWS, Worker, rows, wait_for

pytestmark = pytest.mark.integration

MB = 1 << 20


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def _events(c, job_id):
    return list(reversed(c.fine_tuning.jobs.list_events(job_id, limit=1000).data))


@pytest.fixture(scope="module")
def wider_model(tmp_path_factory, session_home) -> Path:
    """The tiny model, 8x wider: its job holds enough memory (100+ MB) to tell freed from kept."""
    from openft.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("wider-model"), hidden=512)


def test_cancel_stops_within_the_step_and_frees_the_memory(bare_server, zygote, tmp_path, wider_model):
    c = bare_server.client()
    register(bare_server.home, "wider-llama", wider_model)
    f = c.files.create(file=("train.jsonl", jsonl(rows(TRAIN_ROWS))), purpose="fine-tune")
    warmup_steps, hold_at = 4, 5

    def create(**extra):
        return c.fine_tuning.jobs.create(
            model="wider-llama",
            training_file=f.id,
            seed=3,
            hyperparameters={"n_epochs": 1, "batch_size": 1},
            extra_body=extra,
        )

    # Fault hits count per process: hold in the second job's step `hold_at`, after its backward pass.
    w = Worker(
        zygote, bare_server.home, f"step:{warmup_steps + hold_at}:hold", tmp_path, log=tmp_path / "w.log"
    ).start()
    try:
        warm = create(max_steps=warmup_steps)  # a first job loads every module the worker keeps
        wait_for(lambda: c.fine_tuning.jobs.retrieve(warm.id).status == "succeeded", timeout=300)
        # The job shows succeeded before the worker gives its memory back (then it
        # claims the next): idle is the lowest level seen until the next job holds.
        samples = [_status_kb(w.pid, "VmRSS")]
        job = create()

        def held() -> bool:
            samples.append(_status_kb(w.pid, "VmRSS"))
            return (tmp_path / "step.held").exists()

        wait_for(held, timeout=300, every=0.05)
        idle = min(samples)
        in_job = _status_kb(w.pid, "VmRSS")
        assert c.fine_tuning.jobs.cancel(job.id).status == "cancelled"
        (tmp_path / "step.go").write_text("")
        stopped = wait_for(
            lambda: [e for e in _events(c, job.id) if e.message.startswith("Job cancelled at step")], timeout=300
        )
        assert stopped[0].message == f"Job cancelled at step {hold_at}"  # it finished the step it was in, no more
        events = _events(c, job.id)
        assert max(e.data["step"] for e in events if e.type == "metrics") == hold_at
        assert [ck.step_number for ck in c.fine_tuning.jobs.checkpoints.list(job.id).data] == [3]
        final = c.fine_tuning.jobs.retrieve(job.id)
        assert final.status == "cancelled" and final.fine_tuned_model is None
        # Its memory goes back near its level before the cancelled job (a generous
        # wait for the worker to get there; the assertion is on the level).
        assert in_job - idle > 50 * MB  # the job did hold memory worth measuring
        try:
            after = wait_for(
                lambda: (rss := _status_kb(w.pid, "VmRSS")) < idle + (in_job - idle) / 4 and rss, timeout=120, every=0.5
            )
        except AssertionError:
            after = _status_kb(w.pid, "VmRSS")
        print(f"worker RSS: idle {idle / MB:.0f} MB, in the job {in_job / MB:.0f} MB, after {after / MB:.0f} MB")
        assert after - idle < (in_job - idle) / 4, (idle / MB, in_job / MB, after / MB)
        # The worker is free again: it takes and finishes the next job.
        probe = create(max_steps=1)
        wait_for(lambda: c.fine_tuning.jobs.retrieve(probe.id).status == "succeeded", timeout=300)
    finally:
        w.stop()

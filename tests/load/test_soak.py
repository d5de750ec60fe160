"""The soak test in short form (benchmarks/soak.py has the full one and the
figures): 32 concurrent streaming chat clients against fine-tuned models of the
tiny model, through the official `openai` client and a real `openft serve` on
loopback, while fine-tuning jobs train through the same API. Nothing may fail or
go missing, memory must stay bounded and every job must succeed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from soak import SoakConfig, run_soak  # noqa: E402  (the benchmark's own code, so both test the same thing)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def report(session_home, tmp_path_factory):
    cfg = SoakConfig(
        model="tiny",
        seconds=15,
        clients=32,
        adapters=3,
        min_tokens=4,
        max_tokens=10,
        job_steps=3,
        source_home=session_home,
        workdir=tmp_path_factory.mktemp("soak"),
    )
    return run_soak(cfg)


def test_every_request_completes_once_with_content(report):
    # Every client starts a request at once, so at least 32 ran; each one ended with
    # a finish_reason, non-empty text and usage, under one response id of its own.
    assert report.requests_started >= 32
    assert report.requests_failed == 0, report.failures
    assert report.requests_lost == 0
    assert report.requests_completed == report.requests_started
    assert report.duplicate_ids == 0
    assert report.completion_tokens >= report.requests_completed
    assert len(report.models_called) >= 3  # the registered adapters, mixed in one batch


def test_jobs_train_alongside_and_succeed(report):
    assert len(report.jobs) >= 2  # the warm-up job, and at least one during the window
    assert [j.status for j in report.jobs] == ["succeeded"] * len(report.jobs), [j.error for j in report.jobs]
    assert all(j.fine_tuned_model and j.trained_tokens for j in report.jobs)
    assert report.jobs[1].began_s <= report.seconds and report.job_overlap_s > 0
    assert report.worker_restarts == 0


def test_memory_is_bounded(report):
    for mem in (report.server_memory, report.worker_memory):
        assert mem.samples > 10 and mem.peak_mb > 0
        assert mem.bounded, mem


def test_no_traceback_and_nothing_else_broken(report):
    assert report.server_log_tracebacks == 0
    assert report.passed, report.problems

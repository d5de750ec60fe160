"""`openft jobs ...` as a client of a real `openft serve` on loopback: --limit
limits, and --follow asks each poll only for the events after the last one seen
(checked in the server's access log)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from serve.conftest import Server, jsonl, wait_for

pytestmark = pytest.mark.integration

ROWS = [
    {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(12)
]


@pytest.fixture(scope="module")
def idle_server(tmp_path_factory):
    # No worker: jobs stay queued until a test cancels them, so what they hold is known.
    s = Server(tmp_path_factory.mktemp("client-home"), "--no-worker").start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def jobs(idle_server):
    c = idle_server.client()
    f = c.files.create(file=("d.jsonl", jsonl(ROWS)), purpose="fine-tune")
    made = [c.fine_tuning.jobs.create(model="smollm2-135m-instruct", training_file=f.id) for _ in range(3)]
    wait_for(lambda: all(c.fine_tuning.jobs.retrieve(j.id).status == "queued" for j in made))
    return made


def openft_args(server: Server, *args: str) -> list[str]:
    return [sys.executable, "-m", "openft.cli", *args, "--base-url", server.url + "/v1", "--api-key", "local"]


def run(server: Server, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(openft_args(server, *args), capture_output=True, text=True, timeout=120, env=os.environ)
    assert proc.returncode == 0, proc.stderr
    return proc


def events_requests(server: Server, job_id: str) -> list[str]:
    """The query strings of the events requests for `job_id`, from the access log."""
    log = Path(server.log.name).read_text(errors="replace")
    return re.findall(rf'"GET /v1/fine_tuning/jobs/{job_id}/events\??(\S*) HTTP', log)


def test_jobs_list_limit_prints_that_many(idle_server, jobs):
    out = run(idle_server, "jobs", "list", "--limit", "2").stdout.splitlines()
    newest = [j.id for j in idle_server.client().fine_tuning.jobs.list(limit=2).data]
    assert [line.split()[0] for line in out] == newest and set(newest) < {j.id for j in jobs}
    assert len(run(idle_server, "jobs", "list").stdout.splitlines()) == 3


def test_jobs_events_limit_prints_the_newest(idle_server, jobs):
    out = run(idle_server, "jobs", "events", jobs[0].id, "--limit", "1").stdout.splitlines()
    assert len(out) == 1 and "Files validated" in out[0]
    everything = run(idle_server, "jobs", "events", jobs[0].id).stdout.splitlines()
    assert len(everything) == len(list(idle_server.client().fine_tuning.jobs.list_events(jobs[0].id))) >= 3
    assert "Created fine-tuning job" in everything[0] and everything[-1] == out[0]


def test_follow_asks_only_for_events_after_the_last_seen(idle_server, jobs):
    c, job = idle_server.client(), jobs[1]
    before = [e.id for e in c.fine_tuning.jobs.list_events(job.id)][::-1]  # oldest first
    follow = subprocess.Popen(
        openft_args(idle_server, "jobs", "events", job.id, "--follow"), stdout=subprocess.PIPE, text=True
    )
    try:
        printed = [follow.stdout.readline() for _ in before]  # what the job holds so far, then it polls
        c.fine_tuning.jobs.cancel(job.id)
        rest = follow.communicate(timeout=120)[0].splitlines()
    finally:
        follow.kill()
    assert follow.returncode == 1 and rest[-1] == "status: cancelled"
    lines = [line.split("] ", 1)[1].strip() for line in printed + rest[:-1]]
    after = list(c.fine_tuning.jobs.list_events(job.id))[::-1]
    assert lines == [e.message for e in after] and "Job cancelled by request" in lines[-1]  # each once, in order
    # The first poll asks for everything; every later one only for what follows the
    # newest event it had (the last before the cancel), not the whole list again.
    queries = events_requests(idle_server, job.id)
    follow_queries = [q for q in queries if "order=asc" in q]
    assert "after=" not in follow_queries[0]
    assert len(follow_queries) >= 2
    # (The poll that brought the cancel event may have read the status just before it.)
    cursors = [re.search(r"after=([^&]+)", q) for q in follow_queries[1:]]
    assert all(cursors) and {m.group(1) for m in cursors} <= {before[-1], after[-1].id}
    assert cursors[0].group(1) == before[-1]

"""The service under stress, through a real `openft serve`: oversized uploads,
pause/resume, cancel, a killed worker, a server restart mid-job, and malformed
requests. Jobs run on the tiny model; each takes a few seconds."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import TINY, Server, jsonl, wait_for

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "src" / "openft" / "examples"
TERMINAL = ("succeeded", "failed", "cancelled")
MB = 1 << 20


def _rows(n=40):
    lines = (EXAMPLES / "lumen_train.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines[:n]]


def _home(tmp_path_factory, session_home, name):
    home = tmp_path_factory.mktemp(name)
    (home / "models").symlink_to(Path(session_home) / "models", target_is_directory=True)
    return home


@pytest.fixture(scope="module")
def srv(tmp_path_factory, session_home, tiny_model_dir):
    home = _home(tmp_path_factory, session_home, "robust-home")
    s = Server(home, "--max-upload-mb", "1", models={TINY: tiny_model_dir}).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def train_file(srv):
    return srv.client().files.create(file=("train.jsonl", jsonl(_rows())), purpose="fine-tune")


def _long_job(c, model, file_id, epochs=2):
    # 36 training examples, 1 per step: 36 steps an epoch (tens of ms each), a
    # checkpoint about every 1/8 of the run.
    return c.fine_tuning.jobs.create(
        model=str(model), training_file=file_id, seed=3, hyperparameters={"n_epochs": epochs, "batch_size": 1}
    )


def _events(c, job_id) -> list:
    return list(reversed(c.fine_tuning.jobs.list_events(job_id, limit=1000).data))  # oldest first


def _steps(events) -> list[int]:
    return [e.data["step"] for e in events if e.type == "metrics"]


def _first_metrics(c, job_id, timeout=300):
    return wait_for(lambda: _steps(_events(c, job_id)), timeout=timeout, every=0.1)


def _finish(c, job_id, timeout=400):
    return wait_for(lambda: (j := c.fine_tuning.jobs.retrieve(job_id)).status in TERMINAL and j, timeout=timeout)


def _after_the_worker_moved_on(c, model, file_id):
    """A barrier instead of a timer: a one-step job queued now and run to the end.
    The server's one worker claims the oldest queued job first, so once this later
    job has finished the worker has looked at the queue again and is done with
    every earlier job; whatever it was going to do to them has happened."""
    later = c.fine_tuning.jobs.create(model=str(model), training_file=file_id, extra_body={"max_steps": 1})
    done = _finish(c, later.id)
    assert done.status == "succeeded", done.error
    return done


def _total_steps(events) -> int:
    return [e.data["total_steps"] for e in events if e.message.startswith("Fine-tuning started")][-1]


def _resumed(events) -> tuple[int, int]:
    """(index, step) of the last 'Resumed from the checkpoint at step N' event."""
    hits = [
        (i, e.data["step"]) for i, e in enumerate(events) if e.message.startswith("Resumed from the checkpoint at step")
    ]
    assert hits, [e.message for e in events]
    i, step = hits[-1]
    assert events[i].message == f"Resumed from the checkpoint at step {step}"
    return i, step


def _assert_continues_from(events, step: int) -> None:
    i, resumed = _resumed(events)
    assert resumed == step
    before, after = _steps(events[:i]), _steps(events[i:])
    total = _total_steps(events)
    # Steps an earlier attempt reported past its last checkpoint are trained again
    # (deterministically, to the same values) but not reported twice.
    start = max([step, *before]) + 1
    assert after == list(range(start, total + 1)), after  # no restart from 0, nothing skipped
    assert before + after == list(range(1, total + 1))  # every step reported exactly once


def _envelope(r: httpx.Response) -> dict:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


# ---------------------------------------------------------------- uploads


def _files_on_disk(home: Path) -> set[str]:
    return {str(p.relative_to(home / "files")) for p in (home / "files").rglob("*")}


def test_upload_size_limit_keeps_nothing(srv):
    c = srv.client()
    before_ids = {f.id for f in c.files.list().data}
    before_disk = _files_on_disk(srv.home)
    for size in (2 * MB, 3 * MB // 2):  # refused from its Content-Length / while it streams in
        with pytest.raises(openai.APIStatusError) as e:
            c.files.create(file=("big.jsonl", b"x" * size), purpose="user_data")
        assert e.value.status_code == 413, (size, e.value.body)
        assert e.value.body["code"] == "file_too_large" and e.value.body["param"] == "file"
        assert e.value.body["type"] == "invalid_request_error"
    # A chunked upload (no Content-Length) is cut off as it streams in.
    boundary = "openftboundary"

    def chunked():
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nuser_data\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        for _ in range(3 * 4):
            yield b"y" * (MB // 4)
        yield f"\r\n--{boundary}--\r\n".encode()

    r = httpx.post(
        srv.url + "/v1/files",
        content=chunked(),
        timeout=60,
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code == 413, r.text
    assert _envelope(r)["code"] == "file_too_large"
    assert {f.id for f in c.files.list().data} == before_ids
    assert _files_on_disk(srv.home) == before_disk
    # Half a megabyte is fine, and comes back byte for byte.
    rows, body = _rows(), b""
    while len(body) < MB // 2:
        body += jsonl(rows)
    ok = c.files.create(file=("half.jsonl", body), purpose="fine-tune")
    assert ok.bytes == len(body) and ok.status == "processed"
    assert c.files.content(ok.id).read() == body
    assert {f.id for f in c.files.list().data} == before_ids | {ok.id}


# ------------------------------------------------------ pause / resume / cancel


def test_pause_checkpoints_and_resume_continues_from_there(srv, train_file, tiny_model_dir):
    c = srv.client()
    job = _long_job(c, TINY, train_file.id)
    _first_metrics(c, job.id)
    asked = c.fine_tuning.jobs.pause(job.id)
    assert asked.status in ("running", "paused")
    paused = wait_for(lambda: (j := c.fine_tuning.jobs.retrieve(job.id)).status == "paused" and j, timeout=120)
    assert paused.finished_at is None
    events = _events(c, job.id)
    hit = [e for e in events if e.message.startswith("Job paused at step")]
    assert len(hit) == 1, [e.message for e in events]
    step = hit[0].data["step"]
    total = _total_steps(events)
    assert hit[0].message == f"Job paused at step {step}; resume continues from there"
    assert step >= 1 and step < total and max(_steps(events)) == step
    assert step in {ck.step_number for ck in c.fine_tuning.jobs.checkpoints.list(job.id, limit=100).data}
    # It stays paused: the worker does not pick it up again on its own.
    _after_the_worker_moved_on(c, TINY, train_file.id)
    assert c.fine_tuning.jobs.retrieve(job.id).status == "paused"
    assert max(_steps(_events(c, job.id))) == step
    assert c.fine_tuning.jobs.pause(job.id).status == "paused"  # pausing again changes nothing
    assert c.fine_tuning.jobs.resume(job.id).status == "queued"
    done = _finish(c, job.id)
    assert done.status == "succeeded", done.error
    events = _events(c, job.id)
    _assert_continues_from(events, step)
    assert _steps(events) == list(range(1, total + 1))  # each step trained exactly once
    assert events[-1].message == "The job has successfully completed"
    # A finished job cannot be paused, resumed or cancelled.
    for call, code in (
        (c.fine_tuning.jobs.pause, "job_not_pausable"),
        (c.fine_tuning.jobs.resume, "job_not_paused"),
        (c.fine_tuning.jobs.cancel, "job_not_cancellable"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            call(job.id)
        assert e.value.body["code"] == code and e.value.body["type"] == "invalid_request_error"


def _model_ids(c) -> set[str]:
    return {m.id for m in c.models.list().data}


def test_cancel_a_running_job_stops_it_and_creates_no_model(srv, train_file, tiny_model_dir):
    c = srv.client()
    models_before = _model_ids(c)
    job = _long_job(c, TINY, train_file.id)
    _first_metrics(c, job.id)
    cancelled = c.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    # The worker notices after its current step and stops.
    wait_for(lambda: any(e.message.startswith("Job cancelled at step") for e in _events(c, job.id)), timeout=120)
    seen = len(_steps(_events(c, job.id)))
    later = _after_the_worker_moved_on(c, TINY, train_file.id)
    events = _events(c, job.id)
    assert len(_steps(events)) == seen  # no more training
    assert seen < _total_steps(events)
    assert not any("successfully completed" in e.message or "fine-tuned model created" in e.message for e in events)
    final = c.fine_tuning.jobs.retrieve(job.id)
    assert final.status == "cancelled" and final.fine_tuned_model is None
    made = _model_ids(c) - models_before  # only the later job's model and its checkpoints
    assert later.fine_tuned_model in made, made
    assert all(m == later.fine_tuned_model or m.startswith(later.fine_tuned_model + ":ckpt-") for m in made), made
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.cancel(job.id)
    assert e.value.body["code"] == "job_not_cancellable"
    r = httpx.post(f"{srv.url}/v1/fine_tuning/jobs/{job.id}/cancel", timeout=30)
    assert r.status_code == 400 and _envelope(r)["code"] == "job_not_cancellable"


def test_cancel_during_the_last_step_creates_no_model(srv, train_file, tiny_model_dir):
    """A one-step job cancelled before its step ends: the trainer finishes (it was
    the last step), but the job stays cancelled and leaves no model behind."""
    c = srv.client()
    models_before = _model_ids(c)
    job = c.fine_tuning.jobs.create(model=TINY, training_file=train_file.id, extra_body={"max_steps": 1})
    wait_for(lambda: c.fine_tuning.jobs.retrieve(job.id).status == "running", timeout=300, every=0.05)
    assert c.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    # The worker runs jobs one at a time, oldest first: once the next job is done,
    # it has finished with the cancelled one.
    probe = c.fine_tuning.jobs.create(model=TINY, training_file=train_file.id, extra_body={"max_steps": 1})
    assert _finish(c, probe.id).status == "succeeded"
    final = c.fine_tuning.jobs.retrieve(job.id)
    assert final.status == "cancelled" and final.fine_tuned_model is None
    assert not any("successfully completed" in e.message for e in _events(c, job.id))
    ids = _model_ids(c)
    assert c.fine_tuning.jobs.retrieve(probe.id).fine_tuned_model in ids
    assert not any(job.id.removeprefix("ftjob-") in m for m in ids), ids
    assert models_before <= ids


# --------------------------------------------------------- crashes and restarts


def test_killed_worker_is_restarted_and_the_job_resumes(srv, train_file, tiny_model_dir):
    c = srv.client()
    health = srv.health()
    old_pid, restarts = health["worker_pid"], health["worker_restarts"]
    assert old_pid
    job = _long_job(c, TINY, train_file.id, epochs=2)
    first = wait_for(lambda: c.fine_tuning.jobs.checkpoints.list(job.id).data, timeout=300, every=0.1)
    os.kill(old_pid, signal.SIGKILL)
    h = wait_for(lambda: (x := srv.health())["worker_pid"] not in (None, old_pid) and x, timeout=60)
    assert h["worker_restarts"] >= restarts + 1
    done = _finish(c, job.id)
    assert done.status == "succeeded", done.error
    events = _events(c, job.id)
    assert any("The worker running this job stopped" in e.message for e in events)
    _, step = _resumed(events)
    assert first[0].step_number <= step < _total_steps(events)
    _assert_continues_from(events, step)
    assert done.fine_tuned_model in _model_ids(c)


def test_server_restart_mid_job_keeps_state_and_the_job_resumes(tmp_path_factory, session_home, tiny_model_dir):
    home = _home(tmp_path_factory, session_home, "restart-home")
    first = Server(home, models={TINY: tiny_model_dir}).start()
    try:
        c = first.client()
        f = c.files.create(file=("train.jsonl", jsonl(_rows())), purpose="fine-tune")
        job = _long_job(c, TINY, f.id, epochs=4)
        wait_for(lambda: c.fine_tuning.jobs.checkpoints.list(job.id).data, timeout=300, every=0.1)
        before = _events(c, job.id)
    finally:
        first.stop()
    assert first.proc.returncode is not None
    second = Server(home).start()
    try:
        c = second.client()
        assert f.id in {x.id for x in c.files.list().data}
        assert c.files.content(f.id).read() == jsonl(_rows())
        assert job.id in {j.id for j in c.fine_tuning.jobs.list().data}
        done = _finish(c, job.id)
        assert done.status == "succeeded", done.error
        events = _events(c, job.id)
        ids = [e.id for e in events]
        assert [e.id for e in before] == ids[: len(before)]  # the earlier events are all still there, in order
        assert events[0].message.startswith("Created fine-tuning job")
        _, step = _resumed(events)
        assert step >= 1
        _assert_continues_from(events, step)
        assert done.fine_tuned_model in _model_ids(c)
    finally:
        second.stop()


# ------------------------------------------------------------ bad requests


def test_malformed_requests_get_a_400_naming_the_field(srv, train_file, tiny_model_dir):
    chat = [{"role": "user", "content": "hi"}]
    job = {"model": TINY, "training_file": train_file.id}
    cases = [
        ("/v1/chat/completions", {"model": "m", "messages": chat, "max_tokens": -5}, "max_tokens"),
        ("/v1/chat/completions", {"model": "m", "messages": chat, "temperature": 1e9}, "temperature"),
        ("/v1/chat/completions", {"model": "m", "messages": chat, "top_p": 0}, "top_p"),
        ("/v1/chat/completions", {"model": "m", "messages": chat, "n": "two"}, "n"),
        ("/v1/chat/completions", {"model": "m", "messages": "hi"}, "messages"),
        ("/v1/chat/completions", {"model": 5, "messages": chat}, "model"),
        ("/v1/chat/completions", {"messages": chat}, "model"),
        ("/v1/chat/completions", {"model": "m", "messages": chat, "stop": 5}, "stop"),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ("/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"model": "m", "prompt": {"a": 1}}, "prompt"),
        ("/v1/fine_tuning/jobs", {**job, "hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        ("/v1/fine_tuning/jobs", {**job, "hyperparameters": {"n_epochs": "many"}}, "hyperparameters.n_epochs"),
        ("/v1/fine_tuning/jobs", {**job, "hyperparameters": {"batch_size": 1000}}, "hyperparameters.batch_size"),
        (
            "/v1/fine_tuning/jobs",
            {**job, "hyperparameters": {"learning_rate_multiplier": -1}},
            "hyperparameters.learning_rate_multiplier",
        ),
        ("/v1/fine_tuning/jobs", {**job, "hyperparameters": {"epochs": 3}}, "hyperparameters.epochs"),
        ("/v1/fine_tuning/jobs", {**job, "not_a_field": True}, "not_a_field"),
        ("/v1/fine_tuning/jobs", {**job, "training_file": 123}, "training_file"),
        ("/v1/fine_tuning/jobs", {**job, "seed": -1}, "seed"),
        ("/v1/fine_tuning/jobs", {**job, "suffix": "s" * 65}, "suffix"),
        ("/v1/fine_tuning/jobs", {**job, "max_steps": 0}, "max_steps"),
        ("/v1/fine_tuning/jobs", {"model": TINY}, "training_file"),
    ]
    jobs_before = {j["id"] for j in httpx.get(srv.url + "/v1/fine_tuning/jobs?limit=100", timeout=30).json()["data"]}
    for path, body, param in cases:
        r = httpx.post(srv.url + path, json=body, timeout=60)
        assert r.status_code == 400, (path, body, r.status_code, r.text)
        err = _envelope(r)
        assert err["type"] == "invalid_request_error" and err["param"] == param, (body, err)
        assert err["message"], body
    # Not JSON objects at all, and bad query parameters.
    for content in (b"[1, 2]", b"null", b'"text"', b"{bad json"):
        r = httpx.post(
            srv.url + "/v1/chat/completions", content=content, timeout=30, headers={"content-type": "application/json"}
        )
        assert r.status_code == 400, (content, r.text)
        _envelope(r)
    for path, param in (
        ("/v1/files?limit=0", "limit"),
        ("/v1/fine_tuning/jobs?limit=abc", "limit"),
        ("/v1/files?order=sideways", "order"),
    ):
        r = httpx.get(srv.url + path, timeout=30)
        assert r.status_code == 400 and _envelope(r)["param"] == param, (path, r.text)
    r = httpx.post(
        srv.url + "/v1/files", files={"file": ("x.jsonl", b"{}\n")}, data={"purpose": "nonsense"}, timeout=30
    )
    assert r.status_code == 400 and _envelope(r)["param"] == "purpose", r.text
    r = httpx.post(srv.url + "/v1/files", data={"purpose": "fine-tune"}, timeout=30)
    assert r.status_code == 400 and _envelope(r)["param"] == "file", r.text
    # None of the bad creates made a job.
    after = {j["id"] for j in httpx.get(srv.url + "/v1/fine_tuning/jobs?limit=100", timeout=30).json()["data"]}
    assert after == jobs_before

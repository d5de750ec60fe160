"""Owners cannot see or touch each other's objects: with API keys for owners A
and B, every call B makes on one of A's objects answers exactly as the same call
on an object that does not exist (status, error type, code, param; the message
differs only by the id), and A's objects are untouched afterwards."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import TINY, Server, jsonl, wait_for

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "src" / "openft" / "examples"
TERMINAL = ("succeeded", "failed", "cancelled")


def _rows(n=12):
    lines = (EXAMPLES / "lumen_train.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines[:n]]


def _create_key(home: Path, owner: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "openft.cli", "keys", "create", "--owner", owner],
        env={**os.environ, "OPENFT_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip().splitlines()[-1]
    assert key.startswith("sk-"), out.stdout
    return key


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, session_home, tiny_model_dir):
    home = tmp_path_factory.mktemp("isolation-home")
    (home / "models").symlink_to(Path(session_home) / "models", target_is_directory=True)
    keys = {"A": _create_key(home, "A")}  # one before the server starts ...
    s = Server(home, models={TINY: tiny_model_dir}).start()
    keys["B"] = _create_key(home, "B")  # ... and one while it runs (the store is shared)
    yield s, keys
    s.stop()


@pytest.fixture(scope="module")
def a_objects(keyed, tiny_model_dir):
    s, keys = keyed
    a = s.client(keys["A"])
    train = a.files.create(file=("a-train.jsonl", jsonl(_rows())), purpose="fine-tune")
    job = a.fine_tuning.jobs.create(
        model=TINY,
        training_file=train.id,
        suffix="alpha",
        extra_body={"max_steps": 2, "learning_rate": 1e-2},
        extra_headers={"Idempotency-Key": "shared-key-1"},
    )
    done = wait_for(lambda: (j := a.fine_tuning.jobs.retrieve(job.id)).status in TERMINAL and j, timeout=400)
    assert done.status == "succeeded", done.error
    ckpts = a.fine_tuning.jobs.checkpoints.list(job.id).data
    assert ckpts
    events = a.fine_tuning.jobs.list_events(job.id, limit=200).data
    return {
        "file": train,
        "job": done,
        "model": done.fine_tuned_model,
        "ckpt": ckpts[0].fine_tuned_model_checkpoint,
        "n_ckpts": len(ckpts),
        "n_events": len(events),
    }


def _error(call) -> tuple[int, dict]:
    """(status, error body) of a call that must fail with an API error."""
    try:
        result = call()
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        body = body.get("error", body)  # the client unwraps the envelope already
        return e.status_code, body
    if isinstance(result, httpx.Response):
        if result.status_code >= 400:
            return result.status_code, result.json()["error"]
        raise AssertionError(f"expected an error, got {result.status_code}: {result.text[:300]}")
    raise AssertionError(f"expected an error, got {result!r}"[:500])


def test_requests_without_a_valid_key_are_refused(keyed):
    s, keys = keyed
    for method, path in (
        ("GET", "/v1/files"),
        ("GET", "/v1/fine_tuning/jobs"),
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
    ):
        r = httpx.request(method, s.url + path, json={} if method == "POST" else None, timeout=30)
        assert r.status_code == 401, (path, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == "authentication_error" and err["code"] == "missing_api_key"
    with pytest.raises(openai.AuthenticationError) as e:
        s.client("sk-oft-not-a-real-key").files.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    # A key that is "local" (the no-keys mode's conventional value) is no key at all here.
    with pytest.raises(openai.AuthenticationError):
        s.client("local").models.list()
    # The right key works.
    assert s.client(keys["B"]).files.list().data == []


def test_another_owner_sees_nothing_and_can_change_nothing(keyed, a_objects, tiny_model_dir):
    s, keys = keyed
    a, b = s.client(keys["A"]), s.client(keys["B"])
    fid, jid, model, ckpt = a_objects["file"].id, a_objects["job"].id, a_objects["model"], a_objects["ckpt"]
    b_file = b.files.create(file=("b-train.jsonl", jsonl(_rows(10))), purpose="fine-tune")
    tiny = TINY
    missing_f = "file-" + secrets.token_hex(12)
    missing_j = "ftjob-" + secrets.token_hex(12)
    # The same shape of name, another job id: a fine-tuned model and a checkpoint that do not exist.
    missing_m = model.rsplit(":", 1)[0] + ":" + secrets.token_hex(12)
    missing_c = missing_m + ":" + ckpt.rsplit(":", 1)[1]
    bh = {"Authorization": f"Bearer {keys['B']}"}
    chat = [{"role": "user", "content": "Who are you?"}]

    # (name, call on A's object, the same call on a missing one, A's id, the missing id)
    checks = [
        ("retrieve file", lambda i: b.files.retrieve(i), fid, missing_f),
        ("download file", lambda i: b.files.content(i), fid, missing_f),
        ("delete file", lambda i: b.files.delete(i), fid, missing_f),
        ("job with training_file", lambda i: b.fine_tuning.jobs.create(model=tiny, training_file=i), fid, missing_f),
        (
            "job with validation_file",
            lambda i: b.fine_tuning.jobs.create(model=tiny, training_file=b_file.id, validation_file=i),
            fid,
            missing_f,
        ),
        (
            "job with questions_file",
            lambda i: b.fine_tuning.jobs.create(model=tiny, training_file=b_file.id, extra_body={"questions_file": i}),
            fid,
            missing_f,
        ),
        ("retrieve job", lambda i: b.fine_tuning.jobs.retrieve(i), jid, missing_j),
        ("cancel job", lambda i: b.fine_tuning.jobs.cancel(i), jid, missing_j),
        ("pause job", lambda i: b.fine_tuning.jobs.pause(i), jid, missing_j),
        ("resume job", lambda i: b.fine_tuning.jobs.resume(i), jid, missing_j),
        ("job events", lambda i: b.fine_tuning.jobs.list_events(i), jid, missing_j),
        ("job checkpoints", lambda i: b.fine_tuning.jobs.checkpoints.list(i), jid, missing_j),
        (
            "job comparison",
            lambda i: httpx.get(f"{s.url}/v1/fine_tuning/jobs/{i}/comparison", headers=bh, timeout=30),
            jid,
            missing_j,
        ),
        ("retrieve model", lambda i: b.models.retrieve(i), model, missing_m),
        ("retrieve checkpoint model", lambda i: b.models.retrieve(i), ckpt, missing_c),
        (
            "chat with model",
            lambda i: b.chat.completions.create(model=i, messages=chat, max_tokens=4),
            model,
            missing_m,
        ),
        (
            "chat with checkpoint",
            lambda i: b.chat.completions.create(model=i, messages=chat, max_tokens=4),
            ckpt,
            missing_c,
        ),
        ("completion with model", lambda i: b.completions.create(model=i, prompt="Hi", max_tokens=4), model, missing_m),
        ("train on model", lambda i: b.fine_tuning.jobs.create(model=i, training_file=b_file.id), model, missing_m),
        ("delete checkpoint model", lambda i: b.models.delete(i), ckpt, missing_c),
        ("delete model", lambda i: b.models.delete(i), model, missing_m),
    ]
    n = 0
    for name, call, real, missing in checks:
        got_status, got = _error(lambda: call(real))
        want_status, want = _error(lambda: call(missing))
        assert want_status == 404, (name, want_status, want)  # the baseline really is "not found"
        assert (got_status, got.get("type"), got.get("code"), got.get("param")) == (
            want_status,
            want.get("type"),
            want.get("code"),
            want.get("param"),
        ), (name, got, want)
        assert got["message"].replace(real, missing) == want["message"], (name, got["message"], want["message"])
        n += 1

    # Lists: none of A's objects appear in B's.
    assert fid not in {f.id for f in b.files.list().data}
    n += 1
    assert jid not in {j.id for j in b.fine_tuning.jobs.list(limit=100).data}
    n += 1
    b_models = {m.id for m in b.models.list().data}
    assert model not in b_models and ckpt not in b_models
    n += 1
    # The same Idempotency-Key as A's job makes B a new job of B's own, never A's.
    b_job = b.fine_tuning.jobs.create(
        model=tiny,
        training_file=b_file.id,
        extra_body={"max_steps": 1},
        extra_headers={"Idempotency-Key": "shared-key-1"},
    )
    assert b_job.id != jid and b_job.organization_id == "B" and b_job.training_file == b_file.id
    b.fine_tuning.jobs.cancel(b_job.id)
    n += 1
    print(f"\n{n} isolation checks passed")

    # A's objects are all intact.
    f = a.files.retrieve(fid)
    assert f.id == fid and f.status == "processed"
    assert a.files.content(fid).read() == jsonl(_rows())
    assert fid in {x.id for x in a.files.list().data}
    job = a.fine_tuning.jobs.retrieve(jid)
    assert job.status == "succeeded" and job.fine_tuned_model == model and job.organization_id == "A"
    assert len(a.fine_tuning.jobs.list_events(jid, limit=200).data) == a_objects["n_events"]
    assert len(a.fine_tuning.jobs.checkpoints.list(jid).data) == a_objects["n_ckpts"]
    assert jid in {j.id for j in a.fine_tuning.jobs.list(limit=100).data}
    assert b_job.id not in {j.id for j in a.fine_tuning.jobs.list(limit=100).data}
    a_models = {m.id for m in a.models.list().data}
    assert model in a_models and ckpt in a_models
    assert a.models.retrieve(ckpt).id == ckpt
    for m in (model, ckpt):
        r = a.chat.completions.create(model=m, messages=chat, max_tokens=4, temperature=0)
        assert r.model == m and r.usage.completion_tokens <= 4


# ------------------------------------------------------------ every route

# Fields through which a request names an object: any route taking one of these
# (in its path, query or body) must be in the walk below.
ID_FIELDS = {
    "file_id",
    "job_id",
    "model_id",
    "key_id",
    "model",
    "training_file",
    "validation_file",
    "questions_file",
    "before_model",
    "after_model",
    "after",
    "eval_id",
    "run_id",
    "output_item_id",
}

EVAL_SCHEMA = {
    "type": "object",
    "properties": {"q": {"type": "string"}, "a": {"type": "string"}},
    "required": ["q", "a"],
}
EXACT = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.a}}",
    "operation": "eq",
}


def _id_routes(doc: dict) -> dict[str, set[str]]:
    """'METHOD /path' -> the id-like fields it takes, from the app's own OpenAPI document."""
    schemas = doc["components"]["schemas"]

    def props(schema: dict) -> set[str]:
        if "$ref" in schema:
            schema = schemas[schema["$ref"].rsplit("/", 1)[1]]
        return set(schema.get("properties", {}))

    out = {}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            names = {p["name"] for p in op.get("parameters", [])}
            for media in op.get("requestBody", {}).get("content", {}).values():
                names |= props(media.get("schema", {}))
            if names & ID_FIELDS:
                out[f"{method.upper()} {path}"] = names & ID_FIELDS
    return out


def _same(name: str, got: httpx.Response, want: httpx.Response, real: str, missing: str) -> None:
    """B's call on A's object answers exactly as the call on a missing one."""
    assert got.status_code == want.status_code, (name, got.status_code, got.text[:300], want.text[:300])
    if want.status_code >= 400:
        g, w = got.json()["error"], want.json()["error"]
        assert set(g) == set(w) == {"message", "type", "param", "code"}, (name, g, w)
        assert (g["type"], g["code"], g["param"]) == (w["type"], w["code"], w["param"]), (name, g, w)
        assert g["message"].replace(real, missing) == w["message"], (name, g["message"], w["message"])
    else:  # a list with a cursor: the same page as with an unknown cursor
        assert got.json() == want.json(), (name, got.text[:300], want.text[:300])


def test_every_route_answers_for_another_owners_objects_as_for_missing_ones(keyed, a_objects, tiny_model_dir):
    s, keys = keyed
    a_h, b_h = ({"Authorization": f"Bearer {keys[o]}"} for o in ("A", "B"))
    doc = httpx.get(s.url + "/openapi.json", timeout=30).json()
    id_routes = _id_routes(doc)

    def up(headers, name, body):
        r = httpx.post(
            s.url + "/v1/files",
            headers=headers,
            files={"file": (name, body)},
            data={"purpose": "fine-tune"},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        return r.json()["id"]

    questions = (EXAMPLES / "lumen_questions.jsonl").read_bytes()
    a_questions = up(a_h, "a-questions.jsonl", questions)
    b_file, b_questions = up(b_h, "b-train.jsonl", jsonl(_rows(10))), up(b_h, "b-questions.jsonl", questions)
    fid, jid, model, ckpt = a_objects["file"].id, a_objects["job"].id, a_objects["model"], a_objects["ckpt"]
    a_key = httpx.get(s.url + "/v1/keys", headers=a_h, timeout=30).json()["data"][0]["id"]
    # A's earliest checkpoint: a cursor that leaked across jobs would hide B's own step-1 checkpoint.
    a_ckpt_id = httpx.get(f"{s.url}/v1/fine_tuning/jobs/{jid}/checkpoints", headers=a_h, timeout=30).json()["data"][-1][
        "id"
    ]
    a_event = httpx.get(f"{s.url}/v1/fine_tuning/jobs/{jid}/events", headers=a_h, timeout=30).json()["data"][0]["id"]
    b_job = httpx.post(
        s.url + "/v1/fine_tuning/jobs",
        headers=b_h,
        timeout=120,
        json={"model": TINY, "training_file": b_file, "max_steps": 1},
    ).json()["id"]
    b_done = wait_for(
        lambda: (
            (j := httpx.get(f"{s.url}/v1/fine_tuning/jobs/{b_job}", headers=b_h, timeout=30).json())["status"]
            in TERMINAL
            and j
        ),
        timeout=400,
    )
    assert b_done["status"] == "succeeded", b_done["error"]
    a_eval, a_run, a_item = _eval_with_run(s.url, a_h)
    b_eval, b_run, _ = _eval_with_run(s.url, b_h)
    tiny, builtin = TINY, "smollm2-135m-instruct"
    miss = {
        "file": "file-" + secrets.token_hex(12),
        "job": "ftjob-" + secrets.token_hex(12),
        "key": "key-" + secrets.token_hex(8),
        "event": "ftevent-" + secrets.token_hex(12),
        "ckpt_id": "ftckpt-" + secrets.token_hex(12),
        "eval": "eval-" + secrets.token_hex(12),
        "run": "evalrun-" + secrets.token_hex(12),
        "item": "outputitem-" + secrets.token_hex(12),
    }
    miss["model"] = model.rsplit(":", 1)[0] + ":" + secrets.token_hex(12)
    miss["ckpt"] = miss["model"] + ":" + ckpt.rsplit(":", 1)[1]
    chat = [{"role": "user", "content": "Who are you?"}]

    def call(method, path, **kw):
        return lambda i: httpx.request(
            method,
            s.url + path.format(i=i),
            headers=b_h,
            timeout=600,
            **{k: (v(i) if callable(v) else v) for k, v in kw.items()},
        )

    F, J, M, C, K, E = (
        (fid, miss["file"]),
        (jid, miss["job"]),
        (model, miss["model"]),
        (ckpt, miss["ckpt"]),
        (a_key, miss["key"]),
        (a_event, miss["event"]),
    )
    q = a_questions, miss["file"]
    EV, RUN, ITEM = (a_eval, miss["eval"]), (a_run, miss["run"]), (a_item, miss["item"])
    walk = [  # (route, what, call(id), (A's id, a missing id))
        ("GET /v1/files", "list after A's file", call("GET", "/v1/files", params=lambda i: {"after": i}), F),
        ("GET /v1/files/{file_id}", "retrieve file", call("GET", "/v1/files/{i}"), F),
        ("GET /v1/files/{file_id}/content", "download file", call("GET", "/v1/files/{i}/content"), F),
        ("DELETE /v1/files/{file_id}", "delete file", call("DELETE", "/v1/files/{i}"), F),
        ("GET /v1/files/{file_id}/stats", "file stats", call("GET", "/v1/files/{i}/stats"), F),
        (
            "GET /v1/files/{file_id}/stats",
            "stats with A's model",
            call("GET", f"/v1/files/{b_file}/stats", params=lambda i: {"model": i}),
            M,
        ),
        ("GET /v1/files/{file_id}/preview", "file preview", call("GET", "/v1/files/{i}/preview"), F),
        (
            "GET /v1/files/{file_id}/preview",
            "preview with A's checkpoint",
            call("GET", f"/v1/files/{b_file}/preview", params=lambda i: {"model": i}),
            C,
        ),
        (
            "GET /v1/fine_tuning/jobs",
            "list after A's job",
            call("GET", "/v1/fine_tuning/jobs", params=lambda i: {"after": i}),
            J,
        ),
        ("GET /v1/fine_tuning/jobs/{job_id}", "retrieve job", call("GET", "/v1/fine_tuning/jobs/{i}"), J),
        ("POST /v1/fine_tuning/jobs/{job_id}/cancel", "cancel job", call("POST", "/v1/fine_tuning/jobs/{i}/cancel"), J),
        ("POST /v1/fine_tuning/jobs/{job_id}/pause", "pause job", call("POST", "/v1/fine_tuning/jobs/{i}/pause"), J),
        ("POST /v1/fine_tuning/jobs/{job_id}/resume", "resume job", call("POST", "/v1/fine_tuning/jobs/{i}/resume"), J),
        ("GET /v1/fine_tuning/jobs/{job_id}/events", "job events", call("GET", "/v1/fine_tuning/jobs/{i}/events"), J),
        (
            "GET /v1/fine_tuning/jobs/{job_id}/events",
            "own events after A's event",
            call("GET", f"/v1/fine_tuning/jobs/{b_job}/events", params=lambda i: {"after": i}),
            E,
        ),
        (
            "GET /v1/fine_tuning/jobs/{job_id}/checkpoints",
            "job checkpoints",
            call("GET", "/v1/fine_tuning/jobs/{i}/checkpoints"),
            J,
        ),
        (
            "GET /v1/fine_tuning/jobs/{job_id}/checkpoints",
            "own checkpoints after A's checkpoint",
            call("GET", f"/v1/fine_tuning/jobs/{b_job}/checkpoints", params=lambda i: {"after": i}),
            (a_ckpt_id, miss["ckpt_id"]),
        ),
        (
            "GET /v1/fine_tuning/jobs/{job_id}/comparison",
            "job comparison",
            call("GET", "/v1/fine_tuning/jobs/{i}/comparison"),
            J,
        ),
        ("GET /v1/models/{model_id}", "retrieve model", call("GET", "/v1/models/{i}"), M),
        ("GET /v1/models/{model_id}", "retrieve checkpoint", call("GET", "/v1/models/{i}"), C),
        ("GET /v1/models/{model_id}/export", "export model", call("GET", "/v1/models/{i}/export"), M),
        ("GET /v1/models/{model_id}/export", "export checkpoint", call("GET", "/v1/models/{i}/export"), C),
        (
            "POST /v1/chat/completions",
            "chat with model",
            call("POST", "/v1/chat/completions", json=lambda i: {"model": i, "messages": chat, "max_tokens": 2}),
            M,
        ),
        (
            "POST /v1/chat/completions",
            "chat with checkpoint",
            call("POST", "/v1/chat/completions", json=lambda i: {"model": i, "messages": chat, "max_tokens": 2}),
            C,
        ),
        (
            "POST /v1/completions",
            "completion with model",
            call("POST", "/v1/completions", json=lambda i: {"model": i, "prompt": "Hi", "max_tokens": 2}),
            M,
        ),
        (
            "POST /v1/fine_tuning/jobs",
            "train on A's file",
            call("POST", "/v1/fine_tuning/jobs", json=lambda i: {"model": tiny, "training_file": i}),
            F,
        ),
        (
            "POST /v1/fine_tuning/jobs",
            "validate on A's file",
            call(
                "POST",
                "/v1/fine_tuning/jobs",
                json=lambda i: {"model": tiny, "training_file": b_file, "validation_file": i},
            ),
            F,
        ),
        (
            "POST /v1/fine_tuning/jobs",
            "A's questions file",
            call(
                "POST",
                "/v1/fine_tuning/jobs",
                json=lambda i: {"model": tiny, "training_file": b_file, "questions_file": i},
            ),
            q,
        ),
        (
            "POST /v1/fine_tuning/jobs",
            "train A's model further",
            call("POST", "/v1/fine_tuning/jobs", json=lambda i: {"model": i, "training_file": b_file}),
            M,
        ),
        (
            "POST /v1/fine_tuning/jobs",
            "train A's checkpoint further",
            call("POST", "/v1/fine_tuning/jobs", json=lambda i: {"model": i, "training_file": b_file}),
            C,
        ),
        (
            "POST /v1/fine_tuning/estimate",
            "estimate on A's file",
            call("POST", "/v1/fine_tuning/estimate", json=lambda i: {"model": tiny, "training_file": i}),
            F,
        ),
        (
            "POST /v1/fine_tuning/estimate",
            "estimate validating on A's file",
            call(
                "POST",
                "/v1/fine_tuning/estimate",
                json=lambda i: {"model": tiny, "training_file": b_file, "validation_file": i},
            ),
            F,
        ),
        (
            "POST /v1/fine_tuning/estimate",
            "estimate with A's questions",
            call(
                "POST",
                "/v1/fine_tuning/estimate",
                json=lambda i: {"model": tiny, "training_file": b_file, "questions_file": i},
            ),
            q,
        ),
        (
            "POST /v1/fine_tuning/estimate",
            "estimate on A's model",
            call("POST", "/v1/fine_tuning/estimate", json=lambda i: {"model": i, "training_file": b_file}),
            M,
        ),
        (
            "POST /v1/comparisons",
            "compare on A's questions",
            call(
                "POST",
                "/v1/comparisons",
                json=lambda i: {"before_model": builtin, "after_model": builtin, "questions_file": i},
            ),
            q,
        ),
        (
            "POST /v1/comparisons",
            "compare A's model (before)",
            call(
                "POST",
                "/v1/comparisons",
                json=lambda i: {"before_model": i, "after_model": builtin, "questions_file": b_questions},
            ),
            M,
        ),
        (
            "POST /v1/comparisons",
            "compare A's checkpoint (after)",
            call(
                "POST",
                "/v1/comparisons",
                json=lambda i: {"before_model": builtin, "after_model": i, "questions_file": b_questions},
            ),
            C,
        ),
        (
            "POST /v1/fine_tuning/jobs",
            "A's eval on a job",
            call(
                "POST",
                "/v1/fine_tuning/jobs",
                json=lambda i: {"model": tiny, "training_file": b_file, "questions_file": b_questions, "eval_id": i},
            ),
            EV,
        ),
        *_eval_walk(call, b_eval, b_run, a_run, EV, RUN, ITEM),
        ("DELETE /v1/keys/{key_id}", "delete A's key", call("DELETE", "/v1/keys/{i}"), K),
        ("DELETE /v1/models/{model_id}", "delete checkpoint", call("DELETE", "/v1/models/{i}"), C),
        ("DELETE /v1/models/{model_id}", "delete model", call("DELETE", "/v1/models/{i}"), M),
    ]
    covered, n = set(), 0
    for what, fn, (real, missing) in _nested_walk(call, b_eval, M):  # ids inside a body's objects
        _same(what, fn(real), fn(missing), real, missing)
        n += 1
    for route, what, fn, (real, missing) in walk:
        assert route in id_routes, (route, "not an id route of the app")
        got, want = fn(real), fn(missing)
        assert want.status_code in (200, 404), (what, want.status_code, want.text[:300])  # 200: a list page
        _same(what, got, want, real, missing)
        covered.add(route)
        n += 1
    uncovered = set(id_routes) - covered
    assert not uncovered, f"routes that take an id but are not walked: {sorted(uncovered)}"
    # Lists never show A's objects.
    for path, ids in (
        ("/v1/files", {fid, a_questions}),
        ("/v1/fine_tuning/jobs?limit=100", {jid}),
        ("/v1/models", {model, ckpt}),
        ("/v1/keys", {a_key}),
        ("/v1/evals?limit=100", {a_eval}),
        (f"/v1/evals/{b_eval}/runs?limit=100", {a_run}),
    ):
        seen = {x["id"] for x in httpx.get(s.url + path, headers=b_h, timeout=30).json()["data"]}
        assert not seen & ids, (path, seen & ids)
        n += 1
    print(
        f"\n{n} isolation checks over {len(covered)} id-taking routes "
        f"(of {sum(len(v) for v in doc['paths'].values())} operations)"
    )
    # A's objects are untouched, A's key still works.
    a = s.client(keys["A"])
    assert a.files.retrieve(fid).status == "processed" and a.files.retrieve(a_questions).id == a_questions
    assert a.fine_tuning.jobs.retrieve(jid).status == "succeeded"
    assert {model, ckpt} <= {m.id for m in a.models.list().data}
    assert httpx.get(f"{s.url}/v1/evals/{a_eval}/runs/{a_run}/output_items/{a_item}", headers=a_h).status_code == 200
    assert a_key in {k["id"] for k in httpx.get(s.url + "/v1/keys", headers=a_h, timeout=30).json()["data"]}


def _eval_with_run(url: str, headers: dict) -> tuple[str, str, str]:
    """An eval, a completed jsonl run of it and that run's output item."""
    ev = httpx.post(
        url + "/v1/evals",
        headers=headers,
        timeout=60,
        json={"data_source_config": {"type": "custom", "item_schema": EVAL_SCHEMA}, "testing_criteria": [EXACT]},
    )
    assert ev.status_code == 200, ev.text
    eval_id = ev.json()["id"]
    rows = [{"item": {"q": "2+2?", "a": "4"}, "sample": {"output_text": "4"}}]
    source = {"type": "jsonl", "source": {"type": "file_content", "content": rows}}
    run = httpx.post(f"{url}/v1/evals/{eval_id}/runs", headers=headers, timeout=60, json={"data_source": source})
    assert run.status_code == 200, run.text
    run_id = run.json()["id"]
    done = wait_for(
        lambda: (
            (r := httpx.get(f"{url}/v1/evals/{eval_id}/runs/{run_id}", headers=headers, timeout=30).json())["status"]
            in ("completed", "failed", "canceled")
            and r
        ),
        timeout=300,
    )
    assert done["status"] == "completed", done
    items = httpx.get(f"{url}/v1/evals/{eval_id}/runs/{run_id}/output_items", headers=headers, timeout=30).json()
    return eval_id, run_id, items["data"][0]["id"]


def _eval_walk(call, b_eval, b_run, a_run, EV, RUN, ITEM) -> list:
    """The eval routes: A's eval in the path, A's run under B's eval, A's item under
    B's run, and A's ids as B's cursors. Deletes last, so a leak would still be seen."""
    runs, run_path = f"/v1/evals/{b_eval}/runs", f"/v1/evals/{b_eval}/runs/{{i}}"
    items = f"/v1/evals/{b_eval}/runs/{b_run}/output_items"
    source = {"type": "jsonl", "source": {"type": "file_content", "content": [{"item": {"q": "x", "a": "y"}}]}}
    R, ER = "/v1/evals/{eval_id}/runs/{run_id}", "/v1/evals/{i}/runs/" + a_run
    return [
        ("GET /v1/evals", "list after A's eval", call("GET", "/v1/evals", params=lambda i: {"after": i}), EV),
        ("GET /v1/evals/{eval_id}", "retrieve eval", call("GET", "/v1/evals/{i}"), EV),
        ("POST /v1/evals/{eval_id}", "rename eval", call("POST", "/v1/evals/{i}", json={"name": "mine"}), EV),
        ("GET /v1/evals/{eval_id}/runs", "list runs of A's eval", call("GET", "/v1/evals/{i}/runs"), EV),
        ("GET /v1/evals/{eval_id}/runs", "runs after A's run", call("GET", runs, params=lambda i: {"after": i}), RUN),
        (
            "POST /v1/evals/{eval_id}/runs",
            "run A's eval",
            call("POST", "/v1/evals/{i}/runs", json={"data_source": source}),
            EV,
        ),
        ("GET " + R, "retrieve A's run in A's eval", call("GET", ER), EV),
        ("GET " + R, "retrieve A's run", call("GET", run_path), RUN),
        ("POST " + R, "cancel A's run", call("POST", run_path), RUN),
        ("POST " + R + "/cancel", "cancel A's run (SDK path)", call("POST", run_path + "/cancel"), RUN),
        ("POST " + R + "/cancel", "cancel in A's eval", call("POST", ER + "/cancel"), EV),
        ("GET " + R + "/output_items", "items of A's run", call("GET", run_path + "/output_items"), RUN),
        ("GET " + R + "/output_items", "items after A's item", call("GET", items, params=lambda i: {"after": i}), ITEM),
        ("GET " + R + "/output_items/{output_item_id}", "A's item", call("GET", items + "/{i}"), ITEM),
        ("DELETE " + R, "delete A's run", call("DELETE", run_path), RUN),
        ("DELETE /v1/evals/{eval_id}", "delete A's eval", call("DELETE", "/v1/evals/{i}"), EV),
    ]


def _nested_walk(call, b_eval, M) -> list:
    """Models named inside a body's objects: a judge, a run's model."""
    judge = lambda i: {"type": "score_model", "name": "j", "model": i, "input": [{"role": "user", "content": "?"}]}  # noqa: E731
    completions = lambda i: {  # noqa: E731
        "type": "completions",
        "model": i,
        "input_messages": {"type": "template", "template": [{"role": "user", "content": "{{item.q}}"}]},
        "source": {"type": "file_content", "content": [{"item": {"q": "x", "a": "y"}}]},
    }
    cfg = {"type": "custom", "item_schema": EVAL_SCHEMA}
    return [
        (
            "A's model as a grader's judge",
            call("POST", "/v1/fine_tuning/alpha/graders/run", json=lambda i: {"grader": judge(i), "model_sample": "x"}),
            M,
        ),  # fmt: skip
        (
            "A's model as an eval's judge",
            call("POST", "/v1/evals", json=lambda i: {"data_source_config": cfg, "testing_criteria": [judge(i)]}),
            M,
        ),  # fmt: skip
        (
            "A's model sampled by B's run",
            call("POST", f"/v1/evals/{b_eval}/runs", json=lambda i: {"data_source": completions(i)}),
            M,
        ),  # fmt: skip
    ]

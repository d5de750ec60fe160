"""The whole service through the official `openai` client against a real server
on loopback: upload -> job (tiny model) -> events -> checkpoints -> chat."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import TINY, jsonl, wait_for

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "src" / "openft" / "examples"


def _rows(n=40):
    lines = (EXAMPLES / "lumen_train.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines[:n]]


@pytest.fixture(scope="module")
def finished_job(server, tiny_model_dir):
    c = server.client()
    train = c.files.create(file=("train.jsonl", jsonl(_rows())), purpose="fine-tune")
    questions = c.files.create(
        file=(
            "q.jsonl",
            jsonl(
                [{"question": "Who are you?", "reference": "Pip"}, {"question": "你好，你是谁？", "reference": "Pip"}]
            ),
        ),
        purpose="evals",
    )
    job = c.fine_tuning.jobs.create(
        model=TINY,
        training_file=train.id,
        suffix="pip",
        seed=7,
        hyperparameters={"n_epochs": 2, "batch_size": 4},
        extra_body={"learning_rate": 1e-2, "questions_file": questions.id, "lora_rank": 8},
    )
    done = wait_for(
        lambda: (j := c.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed", "cancelled") and j
    )
    assert done.status == "succeeded", done.error
    return {"train": train, "job": done, "created": job}


def test_upload_reports_validation_and_matches_the_schema(server, openapi):
    c = server.client()
    f = c.files.create(file=("good.jsonl", jsonl(_rows(12))), purpose="fine-tune")
    openapi(f, "OpenAIFile")
    assert f.status == "processed" and f.validation["examples"] == 12 and f.validation["usable"]
    assert c.files.retrieve(f.id).id == f.id
    assert c.files.content(f.id).read() == jsonl(_rows(12))
    listed = c.files.list()
    openapi(listed, "ListFilesResponse")
    assert f.id in [x.id for x in listed.data]
    deleted = c.files.delete(f.id)
    openapi(deleted, "DeleteFileResponse")
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)


def test_bad_file_names_its_lines_and_fails_the_job_with_them(server, tiny_model_dir):
    c = server.client()
    rows = [json.dumps(r) for r in _rows(12)]
    rows[2] = '{"messages": [{"role": "user"'
    rows[5] = json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]})
    f = c.files.create(file=("bad.jsonl", ("\n".join(rows) + "\n").encode()), purpose="fine-tune")
    assert f.status == "error" and "line 3" in f.status_details
    assert {e["line"] for e in f.validation["errors"]} == {3, 6}
    job = c.fine_tuning.jobs.create(model=TINY, training_file=f.id)
    failed = wait_for(lambda: (j := c.fine_tuning.jobs.retrieve(job.id)).status == "failed" and j, timeout=30)
    assert failed.error.code == "invalid_training_file" and failed.error.param == "training_file"
    assert "line 3" in failed.error.message


def test_job_lifecycle_events_checkpoints_and_schema(server, finished_job, openapi):
    c = server.client()
    job = finished_job["job"]
    openapi(finished_job["created"], "FineTuningJob")
    assert finished_job["created"].status == "validating_files"
    openapi(job, "FineTuningJob")
    assert job.fine_tuned_model.startswith("ft:") and ":local:pip:" in job.fine_tuned_model
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at and job.seed == 7
    events = c.fine_tuning.jobs.list_events(job.id, limit=200)
    openapi(events, "ListFineTuningJobEventsResponse")
    messages = [e.message for e in events.data][::-1]
    assert messages[0].startswith("Created fine-tuning job")
    assert any("Files validated" in m for m in messages) and any("started" in m for m in messages)
    started = next(e for e in events.data if e.message.startswith("Fine-tuning started"))
    # the precision auto chose, and why (openft.autoprecision), in the line and its data
    assert "; precision " in started.message and started.data["precision"]["precision"] in ("fp32", "bf16")
    metrics = [e for e in events.data if e.type == "metrics"]
    assert metrics and {"step", "train_loss", "train_mean_token_accuracy"} <= set(metrics[0].data)
    assert any("valid_loss" in e.data for e in metrics)
    assert "successfully completed" in messages[-1]
    # Paging: after= walks backwards through the same events without overlap.
    page1 = c.fine_tuning.jobs.list_events(job.id, limit=3)
    page2 = c.fine_tuning.jobs.list_events(job.id, limit=3, after=page1.data[-1].id)
    assert page1.has_more and not {e.id for e in page1.data} & {e.id for e in page2.data}
    ckpts = c.fine_tuning.jobs.checkpoints.list(job.id)
    openapi(ckpts, "ListFineTuningJobCheckpointsResponse")
    assert ckpts.data and all(
        ck.fine_tuned_model_checkpoint.startswith(job.fine_tuned_model + ":ckpt-step-") for ck in ckpts.data
    )
    assert "train_loss" in ckpts.data[0].metrics.model_dump(exclude_none=True)
    listed = c.fine_tuning.jobs.list(limit=50)
    openapi(listed, "ListPaginatedFineTuningJobsResponse")
    assert job.id in [j.id for j in listed.data]


def test_comparison_is_readable(server, finished_job):
    r = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{finished_job['job'].id}/comparison", timeout=30)
    assert r.status_code == 200
    body = r.json()
    assert len(body["rows"]) == 2 and body["rows"][1]["question"] == "你好，你是谁？"
    assert {"before", "after", "before_scores", "after_scores"} <= set(body["rows"][0])


def test_models_list_has_base_fine_tuned_and_checkpoints(server, finished_job, openapi):
    c = server.client()
    models = c.models.list()
    openapi(models, "ListModelsResponse")
    ids = [m.id for m in models.data]
    assert "smollm2-135m-instruct" in ids and finished_job["job"].fine_tuned_model in ids
    assert any(":ckpt-step-" in i for i in ids)
    openapi(c.models.retrieve(finished_job["job"].fine_tuned_model), "Model")


def test_chat_with_the_fine_tuned_model_and_a_checkpoint(server, finished_job, openapi):
    c = server.client()
    name = finished_job["job"].fine_tuned_model
    ckpt = c.fine_tuning.jobs.checkpoints.list(finished_job["job"].id).data[-1].fine_tuned_model_checkpoint
    for model in (name, ckpt):
        r = c.chat.completions.create(
            model=model,
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"}],
            max_tokens=12,
            temperature=0,
        )
        openapi(r, "CreateChatCompletionResponse")
        assert r.model == model and r.choices[0].finish_reason in ("stop", "length")
        assert (
            r.usage.completion_tokens <= 12
            and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        )
    stream = c.chat.completions.create(
        model=name,
        messages=[{"role": "user", "content": "Who are you?"}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    for ch in chunks:
        openapi(ch, "CreateChatCompletionStreamResponse")
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    whole = c.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Who are you?"}], max_tokens=12, temperature=0
    )
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")


def test_the_issue_snippet_runs_verbatim(server, finished_job):
    snippet = f'''
from openai import OpenAI
client = OpenAI(api_key="local", base_url="{server.url}/v1")
messages = [{{"role": "user", "content": "用当前语言解释微调模型流程"}}]
response = client.chat.completions.create(model="{finished_job["job"].fine_tuned_model}",
    messages=messages, stream=True, max_tokens=4096)
for chunk in response:
    print(chunk.choices[0].delta.content, end='')
'''
    out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    # The failure this guards against is a None printed for a chunk without content
    # (the role chunk first, the finish chunk last). The random tiny model may
    # well say "None" in between, so look at the ends.
    assert out.stdout and not out.stdout.startswith("None") and not out.stdout.endswith("None")
    assert "\ufffd" not in out.stdout


def test_unknown_and_bad_requests_get_the_error_envelope(server):
    c = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="ft:nope:local::x", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="smollm2-135m-instruct", messages=[])
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "wizard", "content": "hi"}])
    assert "messages.0.role" in e.value.body["param"]
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=b"{not json",
        timeout=10,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError):
        c.fine_tuning.jobs.retrieve("ftjob-doesnotexist")


def test_idempotency_key_creates_one_job(server, tiny_model_dir):
    c = server.client()
    f = c.files.create(file=("t.jsonl", jsonl(_rows(12))), purpose="fine-tune")
    kwargs = dict(
        model=TINY,
        training_file=f.id,
        extra_body={"max_steps": 1},
        extra_headers={"Idempotency-Key": "retry-me-123"},
    )
    a = c.fine_tuning.jobs.create(**kwargs)
    b = c.fine_tuning.jobs.create(**kwargs)
    assert a.id == b.id
    wait_for(lambda: c.fine_tuning.jobs.retrieve(a.id).status in ("succeeded", "failed"))


def test_cli_as_a_client_of_the_running_server(server, finished_job, tmp_path):
    import os

    env = {**os.environ, "OPENFT_BASE_URL": server.url + "/v1", "OPENFT_API_KEY": "local"}

    def cli(*args, stdin=None):
        return subprocess.run(
            [sys.executable, "-m", "openft.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            input=stdin,
            timeout=300,
        )

    data = tmp_path / "d.jsonl"
    data.write_bytes(jsonl(_rows(12)))
    up = cli("files", "upload", str(data))
    assert up.returncode == 0, up.stderr
    fid = json.loads(up.stdout)["id"]
    assert fid in cli("files", "list").stdout
    job_id = finished_job["job"].id
    assert job_id in cli("jobs", "list").stdout
    assert json.loads(cli("jobs", "show", job_id).stdout)["status"] == "succeeded"
    events = cli("jobs", "events", job_id, "--limit", "200").stdout
    assert "Created fine-tuning job" in events and "successfully completed" in events
    chat = cli(
        "chat", finished_job["job"].fine_tuned_model, "--max-tokens", "8", "--temperature", "0", stdin="Who are you?\n"
    )
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
    down = subprocess.run(
        [sys.executable, "-m", "openft.cli", "jobs", "list"],
        capture_output=True,
        text=True,
        env={**env, "OPENFT_BASE_URL": "http://127.0.0.1:9/v1"},
        timeout=60,
    )
    assert down.returncode == 1 and "error:" in down.stderr  # server unreachable: a clear message, no traceback
    assert "Traceback" not in down.stderr


def test_plain_completions_endpoint(server, finished_job, openapi):
    c = server.client()
    r = c.completions.create(
        model=finished_job["job"].fine_tuned_model, prompt="Once upon a time", max_tokens=5, temperature=0
    )
    openapi(r, "CreateCompletionResponse")
    assert r.object == "text_completion" and r.usage.completion_tokens <= 5


def test_interactive_docs_and_openapi(server):
    assert httpx.get(server.url + "/docs", timeout=10).status_code == 200
    spec = httpx.get(server.url + "/openapi.json", timeout=10).json()
    assert "/v1/chat/completions" in spec["paths"] and "/v1/fine_tuning/jobs" in spec["paths"]

"""A job's `resources` (issue 17: `{"nproc_per_node": 2}`, the ranks it trains on)
through the official `openai` client's `extra_body`, in process (the real app, no
worker: the jobs stay queued): stored and returned on the job object, and refused
with a 400 in the error envelope naming the field when unknown or mistyped."""

from __future__ import annotations

import json

import openai
import pytest
from fastapi.testclient import TestClient

from .conftest import TINY, in_process_app, jsonl

ROWS = [
    {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
    for i in range(12)
]


@pytest.fixture(scope="module")
def client(tmp_path_factory, session_home, tiny_model_dir):
    home = tmp_path_factory.mktemp("resources-home")
    with in_process_app(home, {TINY: tiny_model_dir}) as app:
        # A loopback peer: the server in local mode (no keys) serves only those.
        http = TestClient(app, base_url="http://127.0.0.1", client=("127.0.0.1", 50000))
        yield openai.OpenAI(api_key="local", base_url="http://127.0.0.1/v1", http_client=http, max_retries=0)


@pytest.fixture(scope="module")
def train_file(client):
    f = client.files.create(file=("train.jsonl", jsonl(ROWS)), purpose="fine-tune")
    assert f.status == "processed", f.status_details
    return f.id


def test_a_job_carries_the_resources_it_asked_for(client, train_file, openapi):
    job = client.fine_tuning.jobs.create(
        model=TINY, training_file=train_file, extra_body={"resources": {"nproc_per_node": 2}}
    )
    openapi(job, "FineTuningJob")
    assert job.resources == {"nproc_per_node": 2}
    assert client.fine_tuning.jobs.retrieve(job.id).resources == {"nproc_per_node": 2}
    listed = {j.id: j for j in client.fine_tuning.jobs.list(limit=100).data}
    assert listed[job.id].resources == {"nproc_per_node": 2}


@pytest.mark.parametrize("extra", [{}, {"resources": None}, {"resources": {}}])
def test_a_job_that_asks_for_nothing_shows_one_rank(client, train_file, extra):
    job = client.fine_tuning.jobs.create(model=TINY, training_file=train_file, extra_body=extra)
    assert job.resources == {"nproc_per_node": 1}


@pytest.mark.parametrize(
    "resources, param, code",
    [
        ({"memory_gb": 2}, "resources.memory_gb", "unknown_parameter"),
        ({"gpus": -1}, "resources.gpus", "invalid_value"),
        ({"nproc_per_node": 2, "nnodes": 2}, "resources.nnodes", "unknown_parameter"),
        ({"nproc_per_node": "2"}, "resources.nproc_per_node", "invalid_value"),
        ({"nproc_per_node": 2.5}, "resources.nproc_per_node", "invalid_value"),
        ({"nproc_per_node": True}, "resources.nproc_per_node", "invalid_value"),
        ({"nproc_per_node": 0}, "resources.nproc_per_node", "invalid_value"),
        ({"nproc_per_node": 65}, "resources.nproc_per_node", "invalid_value"),
        (2, "resources", "invalid_value"),
    ],
)
def test_bad_resources_are_refused_naming_the_field(client, train_file, resources, param, code):
    before = len(client.fine_tuning.jobs.list(limit=100).data)
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model=TINY, training_file=train_file, extra_body={"resources": resources})
    body = json.loads(e.value.response.text)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == param and body["error"]["code"] == code, body
    assert len(client.fine_tuning.jobs.list(limit=100).data) == before  # no job was made

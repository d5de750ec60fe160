"""Dataset statistics, preview, estimates, ad-hoc comparisons, model lineage and
export, and key management, through the HTTP API."""

from __future__ import annotations

import io
import zipfile

import httpx
import pytest

from .conftest import TINY, jsonl, wait_for
from .test_api_e2e import _rows

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(server, tiny_model_dir):
    c = server.client()
    train = c.files.create(file=("train.jsonl", jsonl(_rows(30))), purpose="fine-tune")
    q = c.files.create(file=("q.jsonl", jsonl([{"question": "Who are you?", "reference": "Pip"}])), purpose="evals")
    job = c.fine_tuning.jobs.create(
        model=TINY,
        training_file=train.id,
        suffix="ins",
        extra_body={"max_steps": 4, "learning_rate": 1e-2},
    )
    done = wait_for(lambda: (j := c.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed") and j)
    assert done.status == "succeeded", done.error
    return {"train": train, "questions": q, "job": done, "model": TINY}


def test_stats_count_tokens_and_draw_a_histogram(server, setup):
    r = httpx.get(f"{server.url}/v1/files/{setup['train'].id}/stats", params={"model": setup["model"]}, timeout=60)
    assert r.status_code == 200, r.text
    s = r.json()
    assert s["examples"] == 30 and 0 < s["supervised_tokens"] < s["total_tokens"]
    assert sum(s["histogram"]["counts"]) == 30 and len(s["histogram"]["edges"]) == len(s["histogram"]["counts"]) + 1
    assert s["estimated_seconds"] > 0 and s["epochs"] == 4  # auto epochs: 30 examples -> ceil(100/30)


def test_preview_marks_the_assistant_turns(server, setup):
    r = httpx.get(
        f"{server.url}/v1/files/{setup['train'].id}/preview", params={"model": setup["model"], "n": 2}, timeout=60
    )
    ex = r.json()["examples"]
    # The tiny model carries the built-in's own ChatML template.
    assert r.json()["chat_template"]["source"] == "model" and r.json()["chat_template"]["name"] == "chatml"
    assert len(ex) == 2 and ex[0]["where"] == "train.jsonl:1"
    trained = "".join(s["text"] for s in ex[0]["segments"] if s["trained"])
    assert trained.endswith("<|im_end|>") and _rows(1)[0]["messages"][-1]["content"] in trained
    assert sum(1 for s in ex[0]["segments"] if s["trained"]) >= 1 and not ex[0]["segments"][0]["trained"]


def test_estimate_before_starting(server, setup):
    body = {"model": setup["model"], "training_file": setup["train"].id, "hyperparameters": {"n_epochs": 2}}
    r = httpx.post(f"{server.url}/v1/fine_tuning/estimate", json=body, timeout=60)
    e = r.json()
    assert r.status_code == 200, r.text
    assert e["epochs"] == 2 and e["examples"] == 27  # 10% held out
    assert e["steps"] == 2 * -(-27 // e["batch_size"]) and e["supervised_tokens"] > 0
    bad = httpx.post(f"{server.url}/v1/fine_tuning/estimate", json={**body, "training_file": "file-nope"}, timeout=30)
    assert bad.status_code == 404 and bad.json()["error"]["param"] == "training_file"


def test_adhoc_comparison_of_a_checkpoint(server, setup):
    c = server.client()
    ckpt = c.fine_tuning.jobs.checkpoints.list(setup["job"].id).data[0].fine_tuned_model_checkpoint
    r = httpx.post(
        f"{server.url}/v1/comparisons",
        timeout=300,
        json={
            "before_model": setup["job"].fine_tuned_model,
            "after_model": ckpt,
            "questions_file": setup["questions"].id,
            "max_tokens": 8,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["rows"][0]["question"] == "Who are you?" and "similarity" in body["rows"][0]["after_scores"]
    assert body["verdict"]["summary"]


def test_model_lineage_and_export(server, setup):
    name = setup["job"].fine_tuned_model
    m = httpx.get(f"{server.url}/v1/models/{name}", timeout=30).json()
    assert len(m["lineage"]["base_model_sha256"]) == 64 and m["config"]["train"]["max_steps"] == 4
    assert m["summary"]["trained_tokens"] > 0
    z = httpx.get(f"{server.url}/v1/models/{name}/export", params={"what": "adapter"}, timeout=120)
    assert z.status_code == 200 and z.headers["content-type"] == "application/zip"
    names = zipfile.ZipFile(io.BytesIO(z.content)).namelist()
    assert "adapter_model.safetensors" in names and "adapter_config.json" in names
    merged = httpx.get(f"{server.url}/v1/models/{name}/export", params={"what": "merged"}, timeout=300)
    assert "model.safetensors" in zipfile.ZipFile(io.BytesIO(merged.content)).namelist()


def test_keys_api_ends_local_mode(tmp_path_factory, session_home):
    from .conftest import Server

    home = tmp_path_factory.mktemp("keys-home")
    s = Server(home).start()
    try:
        created = httpx.post(f"{s.url}/v1/keys", timeout=30).json()
        assert created["owner"] == "local" and created["key"].startswith("sk-oft-")
        assert httpx.get(f"{s.url}/v1/keys", timeout=30).status_code == 401  # keys exist now: local mode is over
        auth = {"Authorization": f"Bearer {created['key']}"}
        listed = httpx.get(f"{s.url}/v1/keys", headers=auth, timeout=30).json()["data"]
        assert [k["id"] for k in listed] == [created["id"]] and "key" not in listed[0]
        assert httpx.delete(f"{s.url}/v1/keys/key-nope", headers=auth, timeout=30).status_code == 404
        assert httpx.delete(f"{s.url}/v1/keys/{created['id']}", headers=auth, timeout=30).json()["deleted"]
    finally:
        s.stop()

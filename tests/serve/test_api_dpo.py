"""A DPO job through the official `openai` client: OpenAI's preference JSONL, the
`method={"type": "dpo", ...}` body, the method returned as sent, per-step rewards in
the events and checkpoints, and a fine-tuned model that answers."""

from __future__ import annotations

import json

import openai
import pytest
from train.helpers import preference_rows

from .conftest import TINY, jsonl, wait_for

pytestmark = pytest.mark.integration


def pairs(n: int = 24) -> bytes:
    return jsonl(preference_rows(n))


def test_a_dpo_job_runs_and_reports_its_rewards(server, openapi):
    c = server.client()
    f = c.files.create(file=("prefs.jsonl", pairs()), purpose="fine-tune")
    assert f.status == "processed" and f.validation["layout"] == "openai_preference"
    method = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2, "batch_size": 4}}}
    job = c.fine_tuning.jobs.create(
        model=TINY, training_file=f.id, method=method, seed=1, extra_body={"learning_rate": 5e-3}
    )
    openapi(job, "FineTuningJob")
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    done = wait_for(lambda: (j := c.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed") and j)
    assert done.status == "succeeded", done.error
    assert done.method.to_dict() == {
        "type": "dpo",
        "dpo": {"hyperparameters": {**method["dpo"]["hyperparameters"], "learning_rate_multiplier": "auto"}},
    }
    events = c.fine_tuning.jobs.list_events(job.id, limit=200).data
    steps = [e.data for e in events if e.type == "metrics"]
    assert steps and all("train_reward_accuracy" in s and "train_reward_margin" in s for s in steps)
    first, last = min(steps, key=lambda s: s["step"]), max(steps, key=lambda s: s["step"])
    assert last["train_reward_margin"] > first["train_reward_margin"]
    ckpts = c.fine_tuning.jobs.checkpoints.list(job.id).data
    assert ckpts and "train_reward_accuracy" in ckpts[0].metrics.to_dict()
    reply = c.chat.completions.create(
        model=done.fine_tuned_model, messages=[{"role": "user", "content": "How long is the warranty?"}], max_tokens=8
    )
    assert reply.choices[0].message.content is not None


def test_a_dpo_job_on_chat_data_is_refused_naming_the_file(server):
    c = server.client()
    rows = [
        {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
        for i in range(12)
    ]
    f = c.files.create(
        file=("chat.jsonl", ("\n".join(json.dumps(r) for r in rows) + "\n").encode()), purpose="fine-tune"
    )
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(model=TINY, training_file=f.id, method={"type": "dpo"})
    err = e.value.body
    assert (
        err["param"] == "training_file"
        and err["code"] == "invalid_training_file"
        and "preference pairs" in err["message"]
    )


def test_a_bad_beta_is_refused(server):
    c = server.client()
    f = c.files.create(file=("prefs.jsonl", pairs(12)), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(
            model=TINY, training_file=f.id, method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 5}}}
        )
    assert e.value.body["param"] == "method.dpo.hyperparameters.beta"

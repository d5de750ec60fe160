"""Every checkpoint scored, through the official client: a job with a question set
gets an eval of the Evals API built from the references; the base model and each
checkpoint are scored as they are written (scores in checkpoint metrics, events,
and one completed eval run each); a job may name its own eval instead, and
`select: best` makes the best-scoring checkpoint the job's model."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from .conftest import TINY, jsonl, wait_for

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "src" / "openft" / "examples"


def upload(client):
    rows = [json.loads(x) for x in (EXAMPLES / "lumen_train.jsonl").read_text().splitlines()[:24]]
    train = client.files.create(file=("train.jsonl", jsonl(rows)), purpose="fine-tune")
    questions = client.files.create(
        file=("questions.jsonl", (EXAMPLES / "lumen_questions.jsonl").read_bytes()), purpose="fine-tune"
    )
    return train, questions


def run_job(client, train, questions, **extra):
    job = client.fine_tuning.jobs.create(
        model=TINY,
        training_file=train.id,
        extra_body={"questions_file": questions.id, "max_steps": 6, **extra},
    )
    done = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed") and j)
    assert done.status == "succeeded", done.error
    return done


def test_each_checkpoint_is_scored_and_recorded_as_an_eval_run(server):
    client = server.client()
    train, questions = upload(client)
    job = run_job(client, train, questions)
    eval_id = job.to_dict()["eval_id"]
    ev = client.evals.retrieve(eval_id)
    assert [c.name for c in ev.testing_criteria] == ["contains_reference", "rouge_l"]
    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert ckpts
    for c in ckpts:
        m = c.metrics.to_dict()
        assert 0.0 <= m["eval_score"] <= 1.0 and 0.0 <= m["eval_pass_rate"] <= 1.0
        assert set(m) >= {"eval_contains_reference", "eval_rouge_l", "eval_below_base", "eval_base_score"}
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=200).data]
    assert any(m.startswith("The base model scores") for m in messages)
    scored_steps = {int(m.split("step ")[1].split(" ")[0]) for m in messages if m.startswith("The checkpoint at step")}
    assert {c.step_number for c in ckpts} <= scored_steps
    runs = client.evals.runs.list(eval_id, limit=100).data
    models = {r.model for r in runs}
    assert TINY in models and {c.fine_tuned_model_checkpoint for c in ckpts} <= models
    assert all(r.status == "completed" and r.result_counts.total == 12 for r in runs)
    items = client.evals.runs.output_items.list(runs[0].id, eval_id=eval_id, limit=100).data
    assert len(items) == 12 and items[0].datasource_item["reference"] == "Pip"
    # The same eval, run by the worker on the fine-tuned model (an adapter served by the engine).
    rows = [json.loads(x) for x in (EXAMPLES / "lumen_questions.jsonl").read_text().splitlines()]
    run = client.evals.runs.create(
        eval_id,
        data_source={
            "type": "completions",
            "model": job.fine_tuned_model,
            "input_messages": {"type": "template", "template": [{"role": "user", "content": "{{item.question}}"}]},
            "sampling_params": {"max_completion_tokens": 8},
            "source": {"type": "file_content", "content": [{"item": r} for r in rows]},
        },
    )
    done = wait_for(
        lambda: (
            (r := client.evals.runs.retrieve(run.id, eval_id=eval_id)).status != "queued"
            and r.status != "in_progress"
            and r
        )
    )
    assert done.status == "completed" and done.result_counts.total == 12
    assert {u.model_name for u in done.per_model_usage} == {job.fine_tuned_model}


def test_a_job_names_its_own_eval_and_selects_the_best_checkpoint(server):
    client = server.client()
    train, questions = upload(client)
    ev = client.evals.create(
        name="short answers",
        data_source_config={"type": "custom", "item_schema": {"type": "object"}},
        testing_criteria=[
            {
                "type": "python",
                "name": "brevity",
                "source": "def grade(sample, item):\n    return 1.0 / (1 + len(sample['output_text'].split()))\n",
            }
        ],
    )
    job = run_job(client, train, questions, eval_id=ev.id, select="best")
    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    scores = {c.step_number: c.metrics.to_dict()["eval_score"] for c in ckpts}
    assert all("eval_brevity" in c.metrics.to_dict() for c in ckpts)
    best = max(scores, key=lambda s: (scores[s], s))
    selected = [
        e for e in client.fine_tuning.jobs.list_events(job.id, limit=200).data if e.message.startswith("Selected")
    ]
    assert selected and selected[0].data["step"] == best
    assert client.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    ).choices


def test_bad_eval_settings_are_refused(server):
    client = server.client()
    train, questions = upload(client)
    for extra, param in [
        ({"eval_id": "eval-missing", "questions_file": questions.id}, "eval_id"),
        ({"select": "best"}, "select"),
        ({"select": "best", "questions_file": questions.id, "full_finetune": True}, "select"),
    ]:
        with pytest.raises((openai.BadRequestError, openai.NotFoundError)) as e:
            client.fine_tuning.jobs.create(model=TINY, training_file=train.id, extra_body=extra)
        assert e.value.body["param"] == param
    strict = client.evals.create(
        data_source_config={"type": "custom", "item_schema": {"type": "object", "required": ["label"]}},
        testing_criteria=[
            {
                "type": "string_check",
                "name": "s",
                "input": "{{sample.output_text}}",
                "reference": "{{item.label}}",
                "operation": "eq",
            }
        ],
    )
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(
            model=TINY, training_file=train.id, extra_body={"eval_id": strict.id, "questions_file": questions.id}
        )
    assert e.value.body["param"] == "questions_file[0].item"

"""The Evals API through the official client against a real server and its worker:
an eval with a custom item schema and graders, a completions run that samples a
served model (items inline and from a file), a jsonl run that grades the samples
its items carry, live and final counts, output items, cancel, delete, and every
bad request refused naming its field. Shapes are checked against OpenAI's spec."""

from __future__ import annotations

import openai
import pytest

from .conftest import TINY, jsonl, wait_for

pytestmark = pytest.mark.integration

SCHEMA = {
    "type": "object",
    "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
    "required": ["question", "answer"],
}
ANSWERED = {
    "type": "python",
    "name": "answered",
    "source": "def grade(sample, item):\n    return 1.0 if isinstance(sample['output_text'], str) else 0.0\n",
    "pass_threshold": 1.0,
}
EXACT = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "eq",
}
QUESTIONS = [
    {"question": "Capital of France?", "answer": "Paris"},
    {"question": "Capital of Italy?", "answer": "Rome"},
    {"question": "Capital of Spain?", "answer": "Madrid"},
]


def make_eval(client, criteria=(ANSWERED, EXACT)):
    return client.evals.create(
        name="capitals",
        data_source_config={"type": "custom", "item_schema": SCHEMA, "include_sample_schema": True},
        testing_criteria=list(criteria),
        metadata={"team": "geo"},
    )


def completions_source(source: dict) -> dict:
    return {
        "type": "completions",
        "model": TINY,
        "input_messages": {"type": "template", "template": [{"role": "user", "content": "{{item.question}}"}]},
        "sampling_params": {"max_completion_tokens": 6, "temperature": 0},
        "source": source,
    }


def check_run(openapi, run) -> None:
    """A run against OpenAI's EvalRun, with two fields stood in for: its `data_source`
    (the spec's oneOf matches a plain {role, content} message twice, as EasyInputMessage
    and as EvalItem, so no real template validates) and a null `error` (a run without
    one; the spec has no null there, the SDK takes it)."""
    body = run.model_dump(mode="json", exclude_unset=True, by_alias=True)
    assert body["data_source"]["type"] in ("completions", "jsonl")
    body["data_source"] = {"type": "jsonl", "source": {"type": "file_id", "id": "file-x"}}
    if body["error"] is None:
        body["error"] = {"code": "none", "message": ""}
    openapi(body, "EvalRun")


def finished(client, eval_id: str, run_id: str):
    return wait_for(
        lambda: (
            (r := client.evals.runs.retrieve(run_id, eval_id=eval_id)).status in ("completed", "failed", "canceled")
            and r
        ),
        timeout=600,
    )


def test_an_eval_is_created_listed_updated_and_deleted(server, openapi):
    client = server.client()
    ev = make_eval(client)
    openapi(ev, "Eval")
    assert ev.data_source_config.type == "custom" and ev.data_source_config.schema_["properties"]["item"] == SCHEMA
    assert [c.name for c in ev.testing_criteria] == ["answered", "exact"]
    assert client.evals.retrieve(ev.id).name == "capitals"
    renamed = client.evals.update(ev.id, name="capitals v2", metadata={"team": "maps"})
    assert renamed.name == "capitals v2" and renamed.metadata == {"team": "maps"}
    second = make_eval(client)
    page = client.evals.list(limit=1, order="asc")
    assert page.has_more and len(page.data) == 1
    ids = [e.id for e in client.evals.list(limit=100).data]
    assert ev.id in ids and second.id in ids
    deleted = client.evals.delete(ev.id)
    assert deleted.deleted and deleted.eval_id == ev.id
    with pytest.raises(openai.NotFoundError):
        client.evals.retrieve(ev.id)


def test_a_completions_run_samples_the_model_and_grades_each_item(server, openapi):
    client = server.client()
    ev = make_eval(client)
    run = client.evals.runs.create(
        ev.id,
        name="tiny",
        data_source=completions_source({"type": "file_content", "content": [{"item": q} for q in QUESTIONS]}),
    )
    check_run(openapi, run)
    assert run.status in ("queued", "in_progress") and run.model == TINY
    done = finished(client, ev.id, run.id)
    assert done.status == "completed", done.error
    check_run(openapi, done)
    items = client.evals.runs.output_items.list(run.id, eval_id=ev.id).data
    assert [i.datasource_item_id for i in items] == [0, 1, 2]
    for item, q in zip(items, QUESTIONS):
        body = item.model_dump(mode="json", exclude_unset=True, by_alias=True)
        assert body["sample"]["error"] is None  # null without an error, as on the run (the spec has no null)
        openapi(body | {"sample": body["sample"] | {"error": {"code": "none", "message": ""}}}, "EvalRunOutputItem")
        assert item.datasource_item == q
        assert item.sample.input == [{"role": "user", "content": q["question"]}] or item.sample.input[0].content
        answer = item.sample.output[0].content
        by_name = {r.name: r for r in item.results}
        assert by_name["answered"].passed and by_name["answered"].score == 1.0
        assert by_name["exact"].passed == (answer == q["answer"])
        assert item.sample.usage.completion_tokens >= 1 and item.sample.max_completion_tokens == 6
        assert item.sample.usage.total_tokens == item.sample.usage.prompt_tokens + item.sample.usage.completion_tokens
    passed = sum(all(r.passed for r in i.results) for i in items)
    assert done.result_counts.to_dict() == {"total": 3, "errored": 0, "failed": 3 - passed, "passed": passed}
    per = {c.testing_criteria: c for c in done.per_testing_criteria_results}
    assert per["answered"].passed == 3 and per["exact"].passed == passed
    usage = {u.model_name: u for u in done.per_model_usage}
    assert usage[TINY].invocation_count == 3  # the run's usage is its items' usage, summed
    for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert getattr(usage[TINY], field) == sum(getattr(i.sample.usage, field) for i in items), field
    one = client.evals.runs.output_items.retrieve(items[1].id, eval_id=ev.id, run_id=run.id)
    assert one.datasource_item_id == 1
    failing = client.evals.runs.output_items.list(run.id, eval_id=ev.id, status="fail").data
    assert len(failing) == 3 - passed


def test_a_jsonl_run_grades_the_samples_its_items_carry_from_a_file(server):
    client = server.client()
    ev = make_eval(client, criteria=(EXACT,))
    rows = [{"item": q, "sample": {"output_text": out}} for q, out in zip(QUESTIONS, ["Paris", "Milan", "Madrid"])]
    f = client.files.create(file=("items.jsonl", jsonl(rows)), purpose="evals")
    run = client.evals.runs.create(ev.id, data_source={"type": "jsonl", "source": {"type": "file_id", "id": f.id}})
    done = finished(client, ev.id, run.id)
    assert done.status == "completed", done.error
    assert done.result_counts.to_dict() == {"total": 3, "errored": 0, "failed": 1, "passed": 2}
    assert [i.status for i in client.evals.runs.output_items.list(run.id, eval_id=ev.id).data] == [
        "pass",
        "fail",
        "pass",
    ]


@pytest.mark.parametrize(
    "data_source, param",
    [
        (
            completions_source({"type": "file_content", "content": [{"item": {"question": "Q?"}}]}),
            "data_source.source.content[0].item",
        ),
        (
            completions_source({"type": "file_content", "content": [{"item": {"question": "Q?", "answer": 3}}]}),
            "data_source.source.content[0].item.answer",
        ),
        (completions_source({"type": "file_content", "content": []}), "data_source.source.content"),
        (completions_source({"type": "stored_completions"}), "data_source.source.type"),
        (
            dict(
                completions_source({"type": "file_content", "content": [{"item": QUESTIONS[0]}]}),
                input_messages={
                    "type": "template",
                    "template": [{"role": "user", "content": "{{sample.output_text}}"}],
                },
            ),
            "data_source.input_messages.template[0].content",
        ),
        ({"type": "responses"}, "data_source.type"),
    ],
)
def test_bad_runs_are_refused_naming_the_field(server, data_source, param):
    client = server.client()
    ev = make_eval(client)
    with pytest.raises(openai.BadRequestError) as e:
        client.evals.runs.create(ev.id, data_source=data_source)
    assert e.value.body["param"] == param, e.value.body
    assert client.evals.runs.list(ev.id).data == []  # nothing was queued


def test_bad_evals_and_unknown_names_are_refused(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        make_eval(client, criteria=(dict(EXACT, operation="contains"),))
    assert e.value.body["param"] == "testing_criteria[0].operation"
    with pytest.raises(openai.BadRequestError) as e:
        make_eval(client, criteria=(EXACT, dict(ANSWERED, name="exact")))
    assert e.value.body["param"] == "testing_criteria[1].name"
    with pytest.raises(openai.BadRequestError) as e:
        client.evals.create(data_source_config={"type": "logs"}, testing_criteria=[EXACT])
    assert e.value.body["param"] == "data_source_config.type"
    ev = make_eval(client)
    with pytest.raises(openai.NotFoundError) as e:
        client.evals.runs.create(
            ev.id,
            data_source=dict(
                completions_source({"type": "file_content", "content": [{"item": QUESTIONS[0]}]}), model="no-such-model"
            ),
        )
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.evals.runs.create("eval-missing", data_source=completions_source({"type": "file_id", "id": "f"}))


def test_a_run_is_cancelled_and_deleted(server):
    client = server.client()
    ev = make_eval(client)
    many = [{"item": {"question": f"Question {i}?", "answer": "x"}} for i in range(64)]
    run = client.evals.runs.create(ev.id, data_source=completions_source({"type": "file_content", "content": many}))
    cancelled = client.evals.runs.cancel(run.id, eval_id=ev.id)
    assert cancelled.status == "canceled"
    final = finished(client, ev.id, run.id)
    assert final.status == "canceled"
    # the worker stops between chunks: it never grades the whole set after a cancel
    stored = client.evals.runs.output_items.list(run.id, eval_id=ev.id, limit=100).data
    assert len(stored) < 64
    with pytest.raises(openai.ConflictError):
        done = client.evals.runs.create(
            ev.id, data_source=completions_source({"type": "file_content", "content": many[:1]})
        )
        client.evals.runs.cancel(finished(client, ev.id, done.id).id, eval_id=ev.id)
    deleted = client.evals.runs.delete(run.id, eval_id=ev.id)
    assert deleted.deleted and deleted.run_id == run.id
    with pytest.raises(openai.NotFoundError):
        client.evals.runs.retrieve(run.id, eval_id=ev.id)

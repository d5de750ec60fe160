"""Tool definitions and calls in datasets: OpenAI's and ShareGPT's formats read into
typed messages, and every call checked (declared tool, JSON arguments, schema),
each problem naming its record or line and turn."""

from __future__ import annotations

import json

import pytest

from openft.data import load_dataset
from openft.data.tools import schema_problem

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
            },
            "required": ["city"],
        },
    },
}


def openai_record(arguments='{"city": "Paris", "unit": "celsius"}', name="get_weather", tools=(WEATHER,)) -> dict:
    return {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_a", "type": "function", "function": {"name": name, "arguments": arguments}}
                ],
            },
            {"role": "tool", "tool_call_id": "call_a", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "It is 21 degrees in Paris."},
        ],
        **({"tools": list(tools)} if tools is not None else {}),
    }


def sharegpt_record(call: dict, tools=(WEATHER["function"],)) -> dict:
    return {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": json.dumps(call)},
            {"from": "observation", "value": '{"temp": 21}'},
            {"from": "gpt", "value": "21 degrees."},
        ],
        "tools": json.dumps(list(tools)),
    }


def test_openai_tool_record_is_read_into_typed_messages(write):
    r = load_dataset(write("t.jsonl", [openai_record()]))
    assert r.ok or r.errors == [], r.errors
    ex = r.examples[0]
    assert ex.tools == [WEATHER]
    call_turn, reply = ex.messages[1], ex.messages[2]
    assert call_turn.content == "" and len(call_turn.tool_calls) == 1
    call = call_turn.tool_calls[0]
    assert (call.id, call.name, json.loads(call.arguments)) == (
        "call_a",
        "get_weather",
        {"city": "Paris", "unit": "celsius"},
    )
    assert call.to_openai()["function"]["arguments"] == '{"city": "Paris", "unit": "celsius"}'
    assert (reply.role, reply.tool_call_id) == ("tool", "call_a")


def test_openai_legacy_functions_and_function_call(write):
    rec = {
        "messages": [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": None,
                "function_call": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            },
            {"role": "function", "name": "get_weather", "content": '{"temp": 3}'},
            {"role": "assistant", "content": "3 degrees."},
        ],
        "functions": [WEATHER["function"]],
    }
    r = load_dataset(write("t.jsonl", [rec]))
    assert not r.errors, r.errors
    ex = r.examples[0]
    assert ex.tools == [WEATHER]
    assert ex.messages[1].tool_calls[0].name == "get_weather"
    # The function reply answers that call: it gets the call's id, as OpenAI's tool replies carry one.
    assert ex.messages[2].role == "tool" and ex.messages[2].tool_call_id == ex.messages[1].tool_calls[0].id


def test_sharegpt_tool_record_with_a_json_string_tools_column(write):
    r = load_dataset(write("t.json", [sharegpt_record({"name": "get_weather", "arguments": {"city": "Paris"}})]))
    assert r.layout == "sharegpt" and not r.errors, r.errors
    ex = r.examples[0]
    assert ex.tools == [{"type": "function", "function": WEATHER["function"]}]
    call = ex.messages[1].tool_calls[0]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert ex.messages[2].tool_call_id == call.id and ex.messages[2].name == "get_weather"


def test_two_calls_in_one_sharegpt_turn(write):
    calls = [
        {"name": "get_weather", "arguments": {"city": "Paris"}},
        {"name": "get_weather", "arguments": {"city": "Rome"}},
    ]
    rec = sharegpt_record(calls)  # type: ignore[arg-type]
    rec["conversations"].insert(3, {"from": "observation", "value": '{"temp": 25}'})
    r = load_dataset(write("t.json", [rec]))
    assert not r.errors, r.errors
    turn = r.examples[0].messages[1]
    assert [json.loads(c.arguments)["city"] for c in turn.tool_calls] == ["Paris", "Rome"]
    assert [m.tool_call_id for m in r.examples[0].messages[2:4]] == [c.id for c in turn.tool_calls]


@pytest.mark.parametrize(
    "record, field, words",
    [
        (openai_record(name="get_time"), "messages[1].tool_calls[0]", ["turn 1", "'get_time'", "not declared"]),
        (openai_record(tools=None), "messages[1].tool_calls[0]", ["turn 1", "not declared", "add a 'tools' list"]),
        (
            openai_record(arguments='{"city": "Paris",'),
            "messages[1].tool_calls[0].function.arguments",
            ["not valid JSON"],
        ),
        (openai_record(arguments='["Paris"]'), "messages[1].tool_calls[0].function.arguments", ["JSON object"]),
        (openai_record(arguments='{"unit": "celsius"}'), "messages[1].tool_calls[0]", ["required property 'city'"]),
        (openai_record(arguments='{"city": 7}'), "messages[1].tool_calls[0]", ["arguments.city must be string"]),
        (openai_record(arguments='{"city": "P", "unit": "kelvin"}'), "messages[1].tool_calls[0]", ['"kelvin"']),
        (openai_record(arguments='{"city": "P", "days": true}'), "messages[1].tool_calls[0]", ["days must be integer"]),
    ],
)
def test_bad_openai_calls_are_refused_naming_line_and_turn(write, record, field, words):
    good = openai_record()
    r = load_dataset(write("t.jsonl", [good, record]))
    assert not r.ok and len(r.examples) == 1
    (err,) = r.errors
    assert (err.line, err.field) == (2, field), err
    for w in words:
        assert w in err.message, err.message


@pytest.mark.parametrize(
    "call, words",
    [
        ({"name": "send_mail", "arguments": {}}, ["turn 1", "'send_mail'", "declared: get_weather"]),
        ({"name": "get_weather", "arguments": {"town": "Paris"}}, ["turn 1", "required property 'city'"]),
        ({"name": "get_weather", "arguments": '{"city": '}, ["not valid JSON"]),
        ({"arguments": {"city": "Paris"}}, ["non-empty 'name'"]),
    ],
)
def test_bad_sharegpt_calls_are_refused_naming_record_and_turn(write, call, words):
    good = sharegpt_record({"name": "get_weather", "arguments": {"city": "Paris"}})
    r = load_dataset(write("t.json", [good, sharegpt_record(call)]))
    assert not r.ok and len(r.examples) == 1
    (err,) = r.errors
    assert (err.record, err.field) == (1, "conversations[1].value"), err
    assert err.line is not None and f":{err.line} " in str(err)  # JSON arrays are placed by line too
    for w in words:
        assert w in err.message, err.message


def test_broken_tool_definitions_are_reported_once(write):
    rec = sharegpt_record({"name": "get_weather", "arguments": {"city": "Paris"}})
    rec["tools"] = '[{"name": "get_weather", "parameters": {'
    r = load_dataset(write("t.json", [rec]))
    (err,) = r.errors
    assert err.field == "tools" and "not valid JSON" in err.message


def test_schema_subset():
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "additionalProperties": False,
    }
    assert schema_problem({"n": 2.0, "tags": ["a"]}, schema) is None  # 2.0 is an integer in JSON Schema
    assert "n must be integer" in schema_problem({"n": 2.5}, schema)
    assert "tags[1] must be string" in schema_problem({"tags": ["a", 3]}, schema)
    assert "does not define" in schema_problem({"m": 1}, schema)
    assert schema_problem("x", {"anyOf": [{"type": "integer"}, {"type": "string"}]}) is None
    assert "none of the anyOf" in schema_problem(None, {"anyOf": [{"type": "integer"}, {"type": "string"}]})
    assert schema_problem({"x": 1}, {}) is None  # a tool without parameters takes any object


def test_glaive_toolcall_demo_loads_with_its_schema_breaks_named(shared_datasets):
    """LLaMA-Factory's glaive demo: 300 ShareGPT records, 216 function_call turns.
    Six records call a tool with arguments their own schema refuses (a rectangle's
    `dimensions` without the `radius` the schema requires, Chinese values for an
    English enum, a missing required `keywords`): those are named, the rest load."""
    r = load_dataset(shared_datasets / "glaive_toolcall_zh_demo.json")
    assert r.layout == "sharegpt" and r.records == 300
    assert len(r.examples) == 294
    assert len({e.line for e in r.errors}) == 6 and len(r.errors) == 8
    assert all("do not match its schema" in e.message and e.field.startswith("conversations[") for e in r.errors)
    calls = [c for ex in r.examples for m in ex.messages for c in m.tool_calls]
    assert len(calls) > 180 and all(ex.tools for ex in r.examples if any(m.tool_calls for m in ex.messages))


def test_prompt_completion_tool_calls_are_checked_too(write):
    """TRL's conversational prompt/completion rows: a call in the completion names
    a declared tool like any other, and its error names the completion's turn."""
    good = openai_record()
    row = {"prompt": good["messages"][:1], "completion": good["messages"][1:], "tools": [WEATHER]}
    bad = {**row, "tools": [{"type": "function", "function": {"name": "other"}}]}
    r = load_dataset(write("t.jsonl", [row, bad]))
    assert r.layout == "prompt_completion" and len(r.examples) == 1
    assert r.examples[0].tools == [WEATHER] and r.examples[0].messages[1].tool_calls[0].name == "get_weather"
    (err,) = r.errors
    assert (err.line, err.field) == (2, "completion[0].tool_calls[0]") and "not declared" in err.message

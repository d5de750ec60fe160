"""Each layout's detection and normalisation, and each per-record error with its
exact place."""

from __future__ import annotations

import pytest

from openft.data.layouts import detect_layout, guess_layout, normalise
from openft.data.load import load_dataset
from openft.data.types import Location


def chat(i: int = 0) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


def msgs(example):
    return [(m.role, m.content) for m in example.messages]


def test_messages_layout_multiturn_tools_and_parts(write):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "what"}, {"type": "text", "text": "time?"}]},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "1", "type": "function", "function": {"name": "clock", "arguments": "{}"}}],
                },
                {"role": "tool", "content": "12:00", "tool_call_id": "1"},
                {"role": "assistant", "content": "noon"},
            ],
            "tools": [{"type": "function", "function": {"name": "clock", "parameters": {"type": "object"}}}],
        }
    ]
    r = load_dataset(write("d.jsonl", rows))
    assert r.layout == "messages" and not r.errors
    ex = r.examples[0]
    assert msgs(ex)[1] == ("user", "what\ntime?")
    assert ex.messages[2].role == "assistant" and ex.messages[2].content == ""
    assert [c.name for c in ex.messages[2].tool_calls] == ["clock"] and ex.messages[3].tool_call_id == "1"
    assert msgs(ex)[-1] == ("assistant", "noon")
    assert ex.where == Location(str(write("d.jsonl", rows)), line=1)


def test_sharegpt_layout_roles_and_system(write):
    rows = [
        {
            "system": "sys",
            "conversations": [
                {"from": "human", "value": "q"},
                {"from": "function_call", "value": '{"name": "f", "arguments": {}}'},
                {"from": "observation", "value": "obs"},
                {"from": "gpt", "value": "a"},
            ],
            "tools": '[{"name": "f", "parameters": {"type": "object"}}]',
        },
        # ShareGPT turns under a "messages" key are recognised by their from/value keys
    ]
    r = load_dataset(write("d.json", rows))
    assert r.layout == "sharegpt" and not r.errors
    assert msgs(r.examples[0]) == [
        ("system", "sys"),
        ("user", "q"),
        ("assistant", ""),
        ("tool", "obs"),
        ("assistant", "a"),
    ]
    rows = [{"messages": [{"from": "user", "value": "q"}, {"from": "bard", "value": "a"}]}]
    r = load_dataset(write("e.json", rows))
    assert r.layout == "sharegpt" and msgs(r.examples[0]) == [("user", "q"), ("assistant", "a")]


def test_alpaca_layout_input_history_system(write):
    rows = [
        {"instruction": "Translate", "input": "chat", "output": "cat"},
        {"instruction": "Say hi", "input": "", "output": "hi", "system": "S", "history": [["q0", "a0"]]},
        {"instruction": "Dolly", "context": "ctx", "response": "r", "category": "x"},
    ]
    r = load_dataset(write("d.json", rows))
    assert r.layout == "alpaca" and not r.errors
    assert msgs(r.examples[0]) == [("user", "Translate\n\nchat"), ("assistant", "cat")]
    assert msgs(r.examples[1]) == [
        ("system", "S"),
        ("user", "q0"),
        ("assistant", "a0"),
        ("user", "Say hi"),
        ("assistant", "hi"),
    ]
    assert msgs(r.examples[2]) == [("user", "Dolly\n\nctx"), ("assistant", "r")]


def test_prompt_completion_layout(write):
    rows = [
        {"prompt": "2+2=", "completion": "4"},
        {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "hello"}]},
    ]
    r = load_dataset(write("d.jsonl", rows))
    assert r.layout == "prompt_completion" and not r.errors
    assert msgs(r.examples[0]) == [("user", "2+2="), ("assistant", "4")]
    assert msgs(r.examples[1]) == [("user", "hi"), ("assistant", "hello")]


@pytest.mark.parametrize(
    "q,a", [("question", "answer"), ("Q", "A"), ("query", "response"), ("Question", "Response"), ("input", "output")]
)
def test_qa_layout_common_column_names(write, q, a):
    r = load_dataset(write("d.csv", f"{q},{a},System\nwhy?,because,be kind\n"))
    assert r.layout == "qa" and not r.errors
    assert msgs(r.examples[0]) == [("system", "be kind"), ("user", "why?"), ("assistant", "because")]


def test_qa_from_nested_xml(write):
    xml = (
        "<docs><doc>"
        + "".join(f"<QAPair><Question>q{i}</Question><Answer>a{i}</Answer></QAPair>" for i in range(3))
        + "</doc></docs>"
    )
    r = load_dataset(write("d.xml", xml))
    assert r.layout == "qa" and not r.errors
    assert msgs(r.examples[2]) == [("user", "q2"), ("assistant", "a2")]
    assert r.examples[2].where.record == 2


def test_text_layout(write):
    r = load_dataset(write("d.jsonl", [{"text": "hello world"}, {"content": "more text"}]))
    assert r.layout == "text" and not r.errors
    assert [e.text for e in r.examples] == ["hello world", "more text"]
    assert r.examples[0].messages is None


def test_column_mapping_and_layout_override(write):
    path = write("d.csv", "Frage,Antwort,Kontext\nwie?,so,sys\n")
    r = load_dataset(path)
    assert r.layout is None and len(r.errors) == 1
    msg = r.errors[0].message
    assert "Frage, Antwort, Kontext" in msg and "--layout" in msg and "--columns" in msg
    assert "prompt_completion" in msg
    r = load_dataset(path, columns={"question": "Frage", "answer": "Antwort", "system": "Kontext"})
    assert r.layout == "qa" and not r.errors
    assert msgs(r.examples[0]) == [("system", "sys"), ("user", "wie?"), ("assistant", "so")]
    # a record with both text and instruction/output: override picks the reading
    path = write("e.jsonl", [{"text": "t", "instruction": "i", "output": "o"}])
    assert load_dataset(path).layout == "alpaca"
    r = load_dataset(path, layout="text")
    assert r.layout == "text" and r.examples[0].text == "t"
    with pytest.raises(ValueError, match="unknown layout"):
        load_dataset(path, layout="chatml")
    with pytest.raises(ValueError, match="do not apply"):
        load_dataset(path, layout="text", columns={"question": "x"})


def test_detection_is_by_majority(write):
    rows = [chat(i) for i in range(3)] + [{"text": "stray"}]
    r = load_dataset(write("d.jsonl", rows))
    assert r.layout == "messages"
    assert len(r.examples) == 3
    e = r.errors[0]
    assert (e.line, e.field) == (4, "messages") and "missing required field" in e.message


def test_guess_layout():
    assert guess_layout({"messages": [{"role": "user"}]}) == "messages"
    assert guess_layout({"messages": [{"from": "human"}]}) == "sharegpt"
    assert guess_layout({"input": "x", "output": "y"}) == "qa"
    assert guess_layout({"instruction": "x", "input": "", "output": "y"}) == "alpaca"
    assert guess_layout({"foo": 1}) is None
    assert detect_layout([{"foo": 1}])[0] is None


# --------------------------------------------------------------------------- errors


def test_unknown_role_at_its_line(write):
    rows = [
        chat(0),
        chat(1),
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
                {"role": "bot", "content": "x"},
                {"role": "assistant", "content": "a"},
            ]
        },
    ]
    r = load_dataset(write("d.jsonl", rows))
    assert not r.ok and len(r.examples) == 2
    [e] = r.errors
    assert (e.line, e.field) == (3, "messages[2].role")
    assert "'bot'" in e.message and "system, user, assistant, tool" in e.message


def test_empty_content_no_assistant_last_turn(write):
    rows = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": "thanks"},
            ]
        },
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant"}]},
        {"messages": "hello"},
    ]
    r = load_dataset(write("d.jsonl", rows))
    got = [(e.line, e.field, e.message) for e in r.errors]
    assert got[0] == (1, "messages[1].content", "empty content")
    assert got[1][:2] == (2, "messages") and "no assistant turn" in got[1][2]
    assert got[2] == (3, "messages[2]", "last turn must be from the assistant (got 'user')")
    assert got[3][:2] == (4, "messages[0].content") and "got int" in got[3][2]
    assert got[4][:2] == (4, "messages[1].content") and "missing" in got[4][2]
    assert got[5][:2] == (5, "messages") and "got str" in got[5][2]
    assert len(got) == 6 and r.examples == []


def test_all_errors_of_a_record_are_reported():
    record = {"messages": [{"role": "bot", "content": "x"}, {"role": "user", "content": ""}, {"content": "y"}]}
    ex, problems = normalise(record, Location("f.json", record=7), "messages")
    assert ex is None
    assert [(p.record, p.field) for p in problems] == [
        (7, "messages[0].role"),
        (7, "messages[1].content"),
        (7, "messages[2].role"),
    ]


def test_sharegpt_errors_name_the_from_field(write):
    rows = [{"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}]
    [e] = load_dataset(write("d.json", rows)).errors
    assert (e.record, e.line, e.field) == (0, 2, "conversations[1].from")
    assert "'robot'" in e.message and "human" in e.message


def test_alpaca_errors(write):
    rows = [
        {"instruction": "i", "output": ""},
        {"instruction": "i", "output": ["a", "b"]},
        {"instruction": "", "input": "", "output": "o"},
        {"input": "x", "output": "o", "instruction": None},
        {"instruction": "i", "output": "o", "history": [["q"]]},
    ]
    r = load_dataset(write("d.jsonl", rows))
    got = [(e.line, e.field) for e in r.errors]
    assert got == [(1, "output"), (2, "output"), (3, "instruction"), (4, "instruction"), (5, "history[0]")]
    assert "empty 'output'" in r.errors[0].message
    assert "must be a string, got list" in r.errors[1].message


def test_csv_missing_answer_value_and_column(write):
    r = load_dataset(write("d.csv", "question,answer\nq1,a1\nq2,\nq3\n"))
    assert [(e.line, e.field) for e in r.errors] == [(3, "answer"), (4, "answer")]
    assert "empty 'answer'" in r.errors[0].message
    r = load_dataset(write("e.csv", "question,reply\nq1,a1\n"), columns={"question": "question", "answer": "answer"})
    [e] = r.errors
    assert (e.line, e.field) == (2, "answer") and "missing required field" in e.message


def test_three_bad_lines_give_three_errors(write):
    lines = ['{"text": "ok"}', '{"text": ', '{"text": "ok2"}', "[]", '{"text": 3}']
    r = load_dataset(write("d.jsonl", "\n".join(lines)))
    assert [e.line for e in r.errors] == [2, 4, 5]
    assert len(r.examples) == 2 and not r.ok

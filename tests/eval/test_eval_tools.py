"""Tool questions in the before/after comparison: read from the question file,
scored on the call (right tool, arguments valid for the schema, equal to the
expected ones), summed up per side and shown in the reports."""

from __future__ import annotations

import json

import pytest

from openft.eval.compare import build_comparison, to_json, to_markdown
from openft.eval.questions import QuestionFileError, load_questions
from openft.eval.scores import tool_call_scores

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]


def call(name: str, args: dict) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': args})}\n</tool_call>"


@pytest.mark.parametrize(
    "answer, scores",
    [
        (call("get_weather", {"city": "Paris"}), (True, True, True)),
        (call("get_weather", {"city": "Rome"}), (True, True, False)),
        (call("get_weather", {"town": "Paris"}), (True, False, False)),  # breaks the schema
        (call("get_time", {}), (False, True, False)),  # a real tool, the wrong one
        (call("get_news", {}), (False, False, False)),  # no such tool
        ("It is sunny in Paris.", (False, False, False)),  # no call at all
    ],
)
def test_tool_call_scores(answer, scores):
    assert tool_call_scores(answer, {"name": "get_weather", "arguments": {"city": "Paris"}}, TOOLS) == scores


def test_without_expected_arguments_only_the_tool_and_validity_count():
    assert tool_call_scores(
        call("get_weather", {"city": "Oslo"}), {"name": "get_weather", "arguments": None}, TOOLS
    ) == (
        True,
        True,
        None,
    )


def test_question_file_with_tools_and_expected_call(tmp_path):
    path = tmp_path / "q.jsonl"
    rows = [
        {
            "question": "Weather in Paris?",
            "tools": TOOLS,
            "tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}},
        },
        {"question": "What is 2+2?", "reference": "4"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    q = load_questions(path)
    assert q[0].tools == TOOLS and q[0].tool_call == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert q[1].tools is None and q[1].tool_call is None

    comparison = build_comparison(
        q,
        ["I think it is sunny.", "5"],
        [call("get_weather", {"city": "Paris"}), "4"],
        before_model="base",
        after_model="tuned",
    )
    tools = comparison.summary["tool_calls"]
    assert tools["questions"] == 1
    assert tools["before"] == {"right_tool": 0, "valid_arguments": 0, "expected_arguments": 0}
    assert tools["after"] == {"right_tool": 1, "valid_arguments": 1, "expected_arguments": 1}
    assert comparison.summary["with_reference"] == 1  # the text question is scored as before
    rows = to_json(comparison)["rows"]
    assert rows[0]["after_scores"]["right_tool"] is True and "right_tool" not in rows[1]["after_scores"]
    md = to_markdown(comparison)
    assert "right tool ✓" in md and "right tool ✗" in md and "| right tool | 0/1 | 1/1 |" in md


@pytest.mark.parametrize(
    "row, words",
    [
        ({"question": "q", "tool_call": {"name": "get_weather"}}, "must name one of the question's tools (none)"),
        ({"question": "q", "tools": TOOLS, "tool_call": {"name": "nope"}}, "must name one of"),
        ({"question": "q", "tools": TOOLS, "tool_call": {"name": "get_time", "arguments": "[1]"}}, "JSON object"),
        ({"question": "q", "tools": [{"type": "function", "function": {}}]}, "non-empty 'name'"),
    ],
)
def test_bad_tool_questions_are_named_by_line(tmp_path, row, words):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(QuestionFileError) as e:
        load_questions(path)
    assert e.value.problems[0].startswith("q.jsonl:2: ") and words in e.value.problems[0]


def test_the_comparison_prompt_offers_the_questions_tools(tool_tokenizer, tiny_tokenizer):
    """Both models see the tools through their own template (Qwen2.5's writes them
    into the system turn); a template without tools renders the question alone."""
    from openft.eval.generate import prompt_ids

    ask = [{"role": "user", "content": "Weather in Paris?"}]
    with_tools = tool_tokenizer.decode(prompt_ids(tool_tokenizer, ask, TOOLS))
    assert "# Tools" in with_tools and '"name": "get_weather"' in with_tools
    plain = tiny_tokenizer.decode(prompt_ids(tiny_tokenizer, ask, TOOLS))
    assert plain == tiny_tokenizer.decode(prompt_ids(tiny_tokenizer, ask))

"""Tool conversations rendered by the model's own template (Qwen2.5's) and masked:
the tool definitions and tool replies are prompt, the assistant's <tool_call> turn
and its answer are trained."""

from __future__ import annotations

import pytest

from openft.data.types import Example, Message, ToolCall
from openft.train.tokenize import IGNORE, TemplateError, encode, segments

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
CALL = ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')


def example() -> Example:
    return Example(
        messages=[
            Message("user", "Weather in Paris?"),
            Message("assistant", "", tool_calls=(CALL,)),
            Message("tool", '{"temp": 21}', tool_call_id="call_1", name="get_weather"),
            Message("assistant", "21 degrees."),
        ],
        tools=TOOLS,
    )


def test_tool_definitions_call_and_reply_are_rendered_and_masked(tool_tokenizer):
    enc, segs = segments(tool_tokenizer, example())
    prompt = "".join(text for trained, text in segs if not trained)
    trained = [text for t, text in segs if t]
    # The template writes the definitions into its system turn, as JSON between <tools> tags.
    assert "# Tools" in prompt and '"name": "get_weather"' in prompt.split("<tools>\n")[1].split("\n</tools>")[0]
    # The call turn: a <tool_call> block with the arguments as an object, then the end of turn.
    assert trained[0] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    assert trained[1] == "21 degrees.<|im_end|>"
    assert len(trained) == 2
    # The tool's reply is the user side of the conversation: rendered, never trained.
    assert '<tool_response>\n{"temp": 21}\n</tool_response>' in prompt
    assert enc.n_trained == sum(1 for lab in enc.labels if lab != IGNORE) > 0


def test_a_template_without_tools_refuses_tool_data(tiny_tokenizer):
    with pytest.raises(TemplateError, match="does not render tools"):
        encode(tiny_tokenizer, example(), 4096)


def test_plain_conversations_render_as_before_with_a_tool_template(tool_tokenizer):
    ex = Example(messages=[Message("user", "Hi"), Message("assistant", "Hello.")])
    _, segs = segments(tool_tokenizer, ex)
    assert [text for t, text in segs if t] == ["Hello.<|im_end|>"]
    assert "# Tools" not in "".join(text for _, text in segs)

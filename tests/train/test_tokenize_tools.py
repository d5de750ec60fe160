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


def _tool_rows(n: int) -> list[dict]:
    cities = ["Paris", "Oslo", "Rome", "Lima", "Kyiv", "Accra"]
    rows = []
    for i in range(n):
        city = cities[i % len(cities)]
        call = {
            "id": f"c{i}",
            "type": "function",
            "function": {"name": "get_weather", "arguments": f'{{"city": "{city}"}}'},
        }
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Weather in {city}? (#{i})"},
                    {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": f"c{i}", "content": '{"temp": 20}'},
                    {"role": "assistant", "content": f"It is 20 degrees in {city}."},
                ],
                "tools": TOOLS,
            }
        )
    return rows


@pytest.mark.integration  # a whole (tiny) run: about a minute on 2 shared CPUs
def test_a_tool_calling_fine_tune_trains_and_a_template_without_tools_is_refused(
    tiny_tool_model_dir, tiny_model_dir, tmp_path
):
    import json

    from openft.config import JobSpec
    from openft.train.recipe import finetune

    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _tool_rows(16)))

    def spec(model, out):
        s = JobSpec(model=str(model))
        s.data.path, s.output_dir = str(data), str(tmp_path / out)
        s.train.learning_rate, s.train.epochs, s.train.batch_size = 1e-2, 3, 4
        return s

    result = finetune(spec(tiny_tool_model_dir, "run"), progress=False)
    losses = [r["train_loss"] for r in result.history]
    assert sum(losses[-3:]) / 3 < 0.85 * losses[0]
    assert result.signals["fully_masked_examples"] == 0
    # The run keeps the tool template: served, the fine-tune takes tools.
    assert "<tool_call>" in (result.run_dir / "adapter" / "chat_template.jinja").read_text()
    with pytest.raises(TemplateError, match="does not render tools"):
        finetune(spec(tiny_model_dir, "refused"), progress=False)

"""Tool calls between OpenAI's shapes and chat templates: which templates render
tools, the messages templates take, and reading calls back out of model output."""

from __future__ import annotations

import json

import pytest

from openft.models.tools import (
    CallHoldBack,
    forced_call_prefill,
    parse_tool_calls,
    reads_tool_call_blocks,
    supports_tools,
    template_message,
)

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_supports_tools_by_template(qwen_tool_template):
    qwen = qwen_tool_template
    assert supports_tools(qwen) and reads_tool_call_blocks(qwen)
    assert not supports_tools(CHATML) and not reads_tool_call_blocks(CHATML)
    assert not supports_tools(None) and not supports_tools("")
    # Llama 3.1 style: renders tools, but its calls are bare JSON, not <tool_call> blocks.
    llama = (
        "{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m.tool_calls | tojson }}{% endfor %}"
    )
    assert supports_tools(llama) and not reads_tool_call_blocks(llama)


def test_template_message_decodes_arguments():
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    m = template_message("assistant", None, [call])
    assert m == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}],
    }
    assert template_message("tool", "42", tool_call_id="call_1", name="f") == {
        "role": "tool",
        "content": "42",
        "tool_call_id": "call_1",
        "name": "f",
    }
    assert template_message("user", "hi") == {"role": "user", "content": "hi"}


def test_parse_one_call():
    content, calls = parse_tool_calls(
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "巴黎"}}\n</tool_call>'
    )
    assert content == ""
    (call,) = calls
    assert call["id"].startswith("call_") and len(call["id"]) > 10 and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert isinstance(call["function"]["arguments"], str)
    assert json.loads(call["function"]["arguments"]) == {"city": "巴黎"}


def test_parse_text_and_parallel_calls():
    text = (
        'Let me check both.\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n'
        '<tool_call>\n{"name": "b", "arguments": "{\\"k\\": [1, 2]}"}\n</tool_call>'
    )
    content, calls = parse_tool_calls(text)
    assert content == "Let me check both."
    assert [c["function"]["name"] for c in calls] == ["a", "b"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{}, {"k": [1, 2]}]
    assert len({c["id"] for c in calls}) == 2


def test_parse_a_call_cut_before_its_closing_tag():
    content, calls = parse_tool_calls('<tool_call>\n{"name": "a", "arguments": {"x": 1}}')
    assert content == "" and json.loads(calls[0]["function"]["arguments"]) == {"x": 1}


def test_plain_text_is_untouched():
    assert parse_tool_calls("Just an answer.\n") == ("Just an answer.\n", [])
    assert parse_tool_calls("") == ("", [])


def test_a_broken_block_keeps_its_text_but_never_its_markup():
    for body in ('{"name": "a", "arguments": ', "not json", '{"arguments": {}}', '{"name": "a", "arguments": [1]}'):
        content, calls = parse_tool_calls(f"<tool_call>\n{body}\n</tool_call>")
        assert calls == [] and "<tool_call>" not in content and "</tool_call>" not in content
        assert body in content


def test_a_forced_prefill_parses_with_what_the_model_adds():
    prefill = forced_call_prefill("get_weather")
    _, calls = parse_tool_calls(prefill + '{"city": "Paris"}}\n</tool_call>')
    assert calls[0]["function"]["name"] == "get_weather"
    _, calls = parse_tool_calls(forced_call_prefill() + '{"name": "x", "arguments": {}}\n</tool_call>')
    assert calls[0]["function"]["name"] == "x"


def test_the_serving_tokenizer_renders_tools_as_transformers_does(tiny_tool_model_dir, tool_tokenizer):
    """The server renders with fasttok's LightTokenizer: tools and tool-call turns
    come out exactly as transformers renders them."""
    from openft.models import fasttok

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": "é"}'}}
    messages = [
        template_message("user", "hi"),
        template_message("assistant", None, [call]),
        template_message("tool", "ok", tool_call_id="call_1"),
    ]
    light = fasttok.load(tiny_tool_model_dir)
    assert light is not None
    for kwargs in ({"tools": tools}, {}):
        ours = light.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        theirs = tool_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        assert ours == theirs
    assert '"arguments": {"x": "é"}' in ours


@pytest.mark.parametrize(
    "pieces",
    [
        ["Hel", "lo ", "<", "tool", "_call>\n", '{"name": "a", "arguments": {}}', "\n</tool_call>"],
        ["Hello", " <too", "ls are fun> ", "and <b>bold</b>"],  # looks like a tag for a moment, is not
        ["  Plain text with trailing space  "],
        ["<tool_call>", "\nnot json\n", "</tool_call>"],
    ],
)
def test_hold_back_streams_what_parse_tool_calls_would_answer(pieces):
    hold = CallHoldBack()
    sent = "".join(hold.push(p) for p in pieces)
    rest, calls = parse_tool_calls(hold.held)
    whole_content, whole_calls = parse_tool_calls("".join(pieces))
    assert "<tool_call>" not in sent and [c["function"] for c in calls] == [c["function"] for c in whole_calls]
    if whole_calls:
        assert (sent + rest).strip() == whole_content
    else:
        assert sent + rest == whole_content  # no call: the text exactly, streamed


def test_hold_back_sends_content_as_it_comes_until_a_call_may_start():
    hold = CallHoldBack()
    assert hold.push("The weather") == "The weather"
    assert hold.push(" is <") == " is"  # "<" may start a call: held, and the space before it
    assert hold.push("b>") == " <b>"
    assert hold.push("\n<tool_call>\n{") == "" and hold.in_call
    assert CallHoldBack(forced_call_prefill()).push("anything") == ""


def test_a_bare_call_counts_only_for_an_offered_tool():
    """Qwen2.5-Coder-0.5B, asked with tools, often answers the call without its tags."""
    bare = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    content, calls = parse_tool_calls(bare, {"get_weather"})
    assert content == "" and json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert parse_tool_calls(bare) == (bare, [])  # no tools offered: it is text
    assert parse_tool_calls(bare, {"get_time"}) == (bare, [])
    answer = '{"name": "Ada", "age": 36}'  # JSON that is no call
    assert parse_tool_calls(answer, {"get_weather"}) == (answer, [])
    assert parse_tool_calls("Call " + bare, {"get_weather"})[1] == []  # only a whole answer


def test_hold_back_holds_an_answer_that_may_be_a_bare_call():
    hold = CallHoldBack(bare=True)
    assert hold.push("\n{") == "" and hold.push('"name": "a"}') == ""
    assert hold.held == '\n{"name": "a"}'
    text = CallHoldBack(bare=True)
    assert text.push(" ") == "" and text.push("Hi {x}") == " Hi {x}"

"""Tool calls between OpenAI's shapes and chat templates: which templates render
tools, the messages templates take, and reading calls back out of model output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from openft.models.tools import (
    HERMES,
    LLAMA3,
    MISTRAL,
    CallHoldBack,
    forced_call_prefill,
    parse_tool_calls,
    supports_tools,
    template_message,
    tool_style,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
LLAMA3_TEMPLATE = (FIXTURES / "llama3.1_tools_chat_template.jinja").read_text()
MISTRAL_TEMPLATE = (FIXTURES / "mistral_tools_chat_template.jinja").read_text()

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_supports_tools_by_template(qwen_tool_template):
    qwen = qwen_tool_template
    assert supports_tools(qwen) and tool_style(qwen) is HERMES
    assert not supports_tools(CHATML) and tool_style(CHATML) is None
    assert not supports_tools(None) and not supports_tools("")
    assert tool_style(LLAMA3_TEMPLATE) is LLAMA3 and tool_style(MISTRAL_TEMPLATE) is MISTRAL
    # Renders tools, but writes calls in no form openft reads back: not offered tools.
    other = (
        "{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m.tool_calls | tojson }}{% endfor %}"
    )
    assert supports_tools(other) and tool_style(other) is None


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


# --------------------------------------------------------------------------- Llama 3.1 and Mistral

WEATHER = {"city": "Paris"}


def rendered_call(template: str, tool_tokenizer, call_id: str = "abcDEF123") -> str:
    """What `template` writes for an assistant turn that calls get_weather: the text
    the model learns to answer with, which the parser must read back."""
    call = {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(WEATHER)}}
    messages = [template_message("user", "Weather?"), template_message("assistant", None, [call])]
    text = tool_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    return text


def test_llama3_reads_back_the_call_its_template_writes(tool_tokenizer):
    text = rendered_call(LLAMA3_TEMPLATE, tool_tokenizer)
    answer = text.split("<|start_header_id|>assistant<|end_header_id|>\n\n", 1)[1].removesuffix("<|eot_id|>")
    content, calls = parse_tool_calls(answer, {"get_weather"}, LLAMA3)
    assert content == "" and [c["function"]["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == WEATHER
    # After <|python_tag|> (where the model writes one) and without tools named, it is still the call.
    assert parse_tool_calls("<|python_tag|>" + answer, None, LLAMA3)[1][0]["function"]["name"] == "get_weather"
    # A bare object of an offered tool only: otherwise text.
    assert parse_tool_calls(answer, None, LLAMA3) == (answer, [])
    assert parse_tool_calls(answer, {"get_time"}, LLAMA3) == (answer, [])


def test_llama3_reads_several_calls_and_leaves_other_json_as_text():
    two = '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}'
    assert [c["function"]["name"] for c in parse_tool_calls(two, {"a", "b"}, LLAMA3)[1]] == ["a", "b"]
    person = '{"name": "Ada", "age": 36}'
    assert parse_tool_calls(person, {"get_weather"}, LLAMA3) == (person, [])
    assert parse_tool_calls("It is sunny.", {"get_weather"}, LLAMA3) == ("It is sunny.", [])
    broken = '<|python_tag|>{"name": "a", "parameters": {'
    assert parse_tool_calls(broken, {"a"}, LLAMA3) == ('{"name": "a", "parameters": {', [])


def test_mistral_reads_back_the_calls_its_template_writes(tool_tokenizer):
    text = rendered_call(MISTRAL_TEMPLATE, tool_tokenizer)
    answer = text[text.index("[TOOL_CALLS]") :].removesuffix(tool_tokenizer.eos_token)
    content, calls = parse_tool_calls("Let me check. " + answer, {"get_weather"}, MISTRAL)
    assert content == "Let me check."
    assert json.loads(calls[0]["function"]["arguments"]) == WEATHER
    # Its ids are what Mistral's templates take back in the next request.
    assert re.fullmatch(r"[A-Za-z0-9]{9}", calls[0]["id"])
    assert rendered_call(MISTRAL_TEMPLATE, tool_tokenizer, calls[0]["id"])
    # The [TOOL_CALLS] token dropped by the decoder: a bare list of offered tools' calls.
    bare = answer.removeprefix("[TOOL_CALLS]").strip()
    assert parse_tool_calls(bare, {"get_weather"}, MISTRAL)[1][0]["function"]["name"] == "get_weather"
    assert parse_tool_calls(bare, {"other"}, MISTRAL) == (bare, [])


@pytest.mark.parametrize("style", [HERMES, LLAMA3, MISTRAL], ids=lambda s: s.name)
def test_a_forced_prefill_in_each_style_parses_with_what_the_model_adds(style):
    rest = {"hermes": "}\n</tool_call>", "llama3": "}", "mistral": "}]"}[style.name]
    named = forced_call_prefill("get_weather", style) + json.dumps(WEATHER) + rest
    (call,) = parse_tool_calls(named, {"get_weather"}, style)[1]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == WEATHER
    whole = json.dumps({"name": "get_weather", style.args_key: WEATHER})
    required = forced_call_prefill(None, style) + (whole.removeprefix('{"name": ') if style is LLAMA3 else whole)
    required += {"hermes": "\n</tool_call>", "llama3": "", "mistral": "]"}[style.name]
    assert parse_tool_calls(required, {"get_weather"}, style)[1][0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize(
    "style, pieces",
    [
        (LLAMA3, ["<|python", "_tag|>", '{"name": "get_weather", ', '"parameters": {"city": "Paris"}}']),
        (LLAMA3, ["{", '"name": "get_weather", "parameters": {}}']),
        (LLAMA3, ["Sunny ", "and {warm}"]),
        (MISTRAL, ["Checking. ", "[TOOL", "_CALLS] [", '{"name": "get_weather", "arguments": {}}]']),
        (MISTRAL, ["[", '{"name": "get_weather", "arguments": {}}]']),
        (MISTRAL, ["A [list] of things"]),
    ],
)
def test_hold_back_in_each_style_streams_what_parse_tool_calls_would_answer(style, pieces):
    hold = CallHoldBack(bare=True, style=style)
    sent = "".join(hold.push(p) for p in pieces)
    names = {"get_weather"}
    rest, calls = parse_tool_calls(hold.held, names, style)
    whole_content, whole_calls = parse_tool_calls("".join(pieces), names, style)
    assert style.opener not in sent
    assert [c["function"] for c in calls] == [c["function"] for c in whole_calls]
    assert (sent + rest).strip() == whole_content.strip()

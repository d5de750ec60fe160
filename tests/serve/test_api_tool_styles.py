"""Tools on /v1/chat/completions for models whose templates write calls in Llama
3.1's form (a bare {"name", "parameters"} object) and Mistral's ([TOOL_CALLS] and a
JSON list): tiny qwen2 models carrying those templates, the engine's sampler
scripted to write a call as each family's model does (see test_api_tools.py)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import in_process_app, scripted_sampler
from .test_api_tools import ASK, TOOLS, post, streamed_call

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
STYLES = {
    "tiny-llama3-tools": (
        "llama3.1_tools_chat_template.jinja",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
    ),
    "tiny-mistral-tools": (
        "mistral_tools_chat_template.jinja",
        'Checking. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]',
    ),
}
# What a call of the named tool continues with after the forced start of each style.
FORCED_REST = {"tiny-llama3-tools": '{"city": "Oslo"}}', "tiny-mistral-tools": '{"city": "Oslo"}}]'}


@pytest.fixture(scope="module")
def app(tmp_path_factory, session_home, tiny_tool_model_dir):
    from transformers import AutoTokenizer

    dirs = {}
    for name, (template, _) in STYLES.items():
        out = tmp_path_factory.mktemp(name)
        shutil.copytree(tiny_tool_model_dir, out, dirs_exist_ok=True)
        tok = AutoTokenizer.from_pretrained(out)
        tok.chat_template = (FIXTURES / template).read_text()
        tok.save_pretrained(out)
        dirs[name] = out
    with in_process_app(tmp_path_factory.mktemp("styles-home"), dirs) as application:
        yield application


@pytest.fixture
def script(monkeypatch, tool_tokenizer):
    return scripted_sampler(monkeypatch, tool_tokenizer, "<|im_end|>")


@pytest.mark.parametrize("model", STYLES)
def test_the_models_call_comes_back_as_tool_calls_without_its_markup(app, openapi, script, model):
    script(STYLES[model][1])
    r = post(app, {"model": model, "messages": ASK, "tools": TOOLS, "max_tokens": 64})
    assert r.status_code == 200, r.text
    openapi(r.json(), "CreateChatCompletionResponse")
    (choice,) = r.json()["choices"]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    content = choice["message"]["content"] or ""
    assert "[TOOL_CALLS]" not in content and "python_tag" not in content and "{" not in content


@pytest.mark.parametrize("model", STYLES)
def test_a_streamed_call_arrives_in_openais_delta_shape(app, openapi, script, model):
    script(STYLES[model][1])
    _, calls, text = streamed_call(app, openapi, model)
    assert [tc["function"]["name"] for tc in calls] == ["get_weather"]
    assert "[TOOL" not in text and "python_tag" not in text and "{" not in text


@pytest.mark.parametrize("model", STYLES)
def test_a_named_tool_choice_forces_the_call_in_the_models_style(app, script, model):
    script(FORCED_REST[model])
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = post(app, {"model": model, "messages": ASK, "tools": TOOLS, "tool_choice": choice, "max_tokens": 64})
    assert r.status_code == 200, r.text
    (call,) = r.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Oslo"}


def test_mistrals_call_ids_are_taken_back_by_its_template(app, openapi, script):
    """Mistral's templates refuse an id that is not 9 letters and digits: the ids
    openft hands out for its calls make the next turn of the conversation render."""
    model = "tiny-mistral-tools"

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, timeout=120) as http:
            client = openai.AsyncOpenAI(
                api_key="local", base_url="http://127.0.0.1/v1", http_client=http, max_retries=0
            )
            script(STYLES[model][1])
            first = await client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, max_tokens=64)
            call = first.choices[0].message.tool_calls[0]
            history = ASK + [
                first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
                {"role": "user", "content": "And now?"},
            ]
            script("It is 21 degrees.")
            second = await client.chat.completions.create(model=model, messages=history, tools=TOOLS, max_tokens=64)
            return call, second

    call, second = asyncio.run(go())
    assert re.fullmatch(r"[A-Za-z0-9]{9}", call.id)
    openapi(second, "CreateChatCompletionResponse")
    assert second.choices[0].message.content == "It is 21 degrees."
    # An OpenAI-style id is refused by that template, as a 400 that names the messages.
    bad = [*ASK, {"role": "assistant", "content": None, "tool_calls": [{**call.model_dump(), "id": "call_x"}]}]
    r = post(app, {"model": model, "messages": [*bad, {"role": "user", "content": "?"}], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"

"""Tools on /v1/chat/completions, in process (a real app and engine, no server
process): a tiny qwen2 model with Qwen2.5's tool template takes `tools` and
`tool_choice`, a model whose template has no tools answers 400 naming `tools`.
A tiny random model never writes a valid call, so the tool-call answers come from
the engine's own sampler scripted to emit one (the route, the engine, the
detokenizer and the parser all run as in production)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from .conftest import TINY, in_process_app, scripted_sampler

TOOLY = "tiny-qwen2-tools"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def app(tmp_path_factory, session_home, tiny_model_dir, tiny_tool_model_dir):
    home = tmp_path_factory.mktemp("tools-home")
    with in_process_app(home, {TOOLY: tiny_tool_model_dir, TINY: tiny_model_dir}) as application:
        yield application


@pytest.fixture
def script(monkeypatch, tool_tokenizer):
    return scripted_sampler(monkeypatch, tool_tokenizer, "<|im_end|>")


def post(app, body: dict) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=120) as client:
            return await client.post("/v1/chat/completions", json=body)

    return asyncio.run(go())


def sse(response: httpx.Response) -> list[dict]:
    lines = [ln[len("data: ") :] for ln in response.text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def streamed_call(app, openapi, model: str) -> tuple[list[dict], list[dict], str]:
    """Stream a tool request to `model` (its answer scripted to a call): the choice's
    deltas, checked against the schema and ending in "tool_calls", the calls in
    them, and the streamed content."""
    r = post(app, {"model": model, "messages": ASK, "tools": TOOLS, "max_tokens": 64, "stream": True})
    assert r.status_code == 200, r.text
    chunks = sse(r)
    for ch in chunks:
        openapi(ch, "CreateChatCompletionStreamResponse")
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    assert deltas[-1]["finish_reason"] == "tool_calls"
    calls = [tc for d in deltas for tc in d["delta"].get("tool_calls") or []]
    return deltas, calls, "".join(d["delta"].get("content") or "" for d in deltas)


def test_a_tool_request_to_a_tool_model_is_answered(app, openapi):
    r = post(app, {"model": TOOLY, "messages": ASK, "tools": TOOLS, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    openapi(r.json(), "CreateChatCompletionResponse")
    message = r.json()["choices"][0]["message"]
    assert "<tool_call>" not in (message["content"] or "")


def test_the_models_call_comes_back_as_tool_calls(app, openapi, script):
    script(CALL_TEXT)
    r = post(app, {"model": TOOLY, "messages": ASK, "tools": TOOLS, "max_tokens": 64})
    assert r.status_code == 200, r.text
    body = r.json()
    openapi(body, "CreateChatCompletionResponse")
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_streamed_tool_call_arrives_in_openais_delta_shape(app, openapi, script):
    script("Checking. " + CALL_TEXT)
    deltas, calls, text = streamed_call(app, openapi, TOOLY)
    assert [(tc["index"], tc["function"]["name"]) for tc in calls] == [(0, "get_weather")]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert text == "Checking." and "<tool_call>" not in text


def test_streamed_tool_call_keeps_every_tokens_logprob(app, openapi, script):
    body = {"model": TOOLY, "messages": ASK, "tools": TOOLS, "max_tokens": 64, "logprobs": True}
    script("Checking. " + CALL_TEXT)
    whole = post(app, body).json()["choices"][0]["logprobs"]["content"]
    script("Checking. " + CALL_TEXT)
    chunks = sse(post(app, {**body, "stream": True}))
    for ch in chunks:
        openapi(ch, "CreateChatCompletionStreamResponse")
    streamed = [e for c in chunks for ch in c["choices"] for e in (ch.get("logprobs") or {}).get("content") or []]
    assert [e["token"] for e in streamed] == [e["token"] for e in whole] and len(whole) > 10


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_written_without_its_tags_is_still_a_call(app, openapi, script, stream):
    """What the real Qwen2.5-Coder-0.5B answers to a weather question with tools."""
    script('{"name": "get_weather", "arguments": {"city": "Paris"}}')
    r = post(app, {"model": TOOLY, "messages": ASK, "tools": TOOLS, "max_tokens": 64, "stream": stream})
    if stream:
        chunks = sse(r)
        for ch in chunks:
            openapi(ch, "CreateChatCompletionStreamResponse")
        deltas = [c["choices"][0] for c in chunks if c["choices"]]
        assert not "".join(d["delta"].get("content") or "" for d in deltas)
        calls, finish = [tc for d in deltas for tc in d["delta"].get("tool_calls") or []], deltas[-1]["finish_reason"]
    else:
        openapi(r.json(), "CreateChatCompletionResponse")
        choice = r.json()["choices"][0]
        assert choice["message"]["content"] is None
        calls, finish = choice["message"]["tool_calls"], choice["finish_reason"]
    assert finish == "tool_calls" and [c["function"]["name"] for c in calls] == ["get_weather"]


def test_a_text_answer_with_tools_offered_still_streams_piece_by_piece(app, openapi, script):
    text = "Sunny <b>today</b>, 21 degrees in Paris."
    script(text)
    plain = post(app, {"model": TOOLY, "messages": ASK, "tools": TOOLS, "max_tokens": 64}).json()
    script(text)
    r = post(app, {"model": TOOLY, "messages": ASK, "tools": TOOLS, "max_tokens": 64, "stream": True})
    chunks = sse(r)
    for ch in chunks:
        openapi(ch, "CreateChatCompletionStreamResponse")
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    pieces = [d["delta"].get("content") or "" for d in deltas]
    assert "".join(pieces) == text == plain["choices"][0]["message"]["content"]
    assert sum(1 for p in pieces if p) > 3  # sent as it came, not held to the end
    assert deltas[-1]["finish_reason"] == "stop" and not any("tool_calls" in d["delta"] for d in deltas)


@pytest.mark.parametrize(
    "choice, scripted, name",
    [
        ("required", '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>', "get_weather"),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            '{"city": "Oslo"}}\n</tool_call>',
            "get_weather",
        ),
    ],
)
def test_forced_tool_choice_starts_the_answer_with_the_call(app, script, choice, scripted, name):
    """ "required" and a named function end the prompt with the start of a call; the
    model (here scripted) only writes the rest, and the call is whole in the answer."""
    script(scripted)
    r = post(app, {"model": TOOLY, "messages": ASK, "tools": TOOLS, "tool_choice": choice, "max_tokens": 64})
    assert r.status_code == 200, r.text
    (call,) = r.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == name and json.loads(call["function"]["arguments"]) == {"city": "Oslo"}


def test_tool_choice_none_answers_in_text(app, script):
    script(CALL_TEXT)
    r = post(app, {"model": TOOLY, "messages": ASK, "tools": TOOLS, "tool_choice": "none", "max_tokens": 64})
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]


def test_a_model_without_a_tool_template_answers_400_naming_tools(app):
    r = post(app, {"model": TINY, "messages": ASK, "tools": TOOLS, "max_tokens": 4})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "tools" and err["code"] == "unsupported_parameter" and "chat template" in err["message"]
    # Its plain chats still work; and tool_choice "none" asks nothing of the template.
    assert post(app, {"model": TINY, "messages": ASK, "max_tokens": 2}).status_code == 200
    assert (
        post(app, {"model": TINY, "messages": ASK, "tools": TOOLS, "tool_choice": "none", "max_tokens": 2}).status_code
        == 200
    )


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools to choose from
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools.0.type"),
    ],
)
def test_bad_tool_fields_are_refused_naming_them(app, extra, param):
    r = post(app, {"model": TOOLY, "messages": ASK, "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_the_openai_client_sends_tools_and_a_tool_conversation(app, openapi, script):
    """The official client: tools in, a call out, then the conversation sent back with
    the assistant's tool_calls and the tool's reply, which the template renders."""

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, timeout=120) as http:
            client = openai.AsyncOpenAI(
                api_key="local", base_url="http://127.0.0.1/v1", http_client=http, max_retries=0
            )
            script(CALL_TEXT)
            first = await client.chat.completions.create(model=TOOLY, messages=ASK, tools=TOOLS, max_tokens=64)
            call = first.choices[0].message.tool_calls[0]
            history = ASK + [
                first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
            ]
            script("It is 21 degrees.")
            second = await client.chat.completions.create(model=TOOLY, messages=history, tools=TOOLS, max_tokens=64)
            return first, second

    first, second = asyncio.run(go())
    openapi(first, "CreateChatCompletionResponse")
    openapi(second, "CreateChatCompletionResponse")
    assert first.choices[0].finish_reason == "tool_calls"
    assert first.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == "It is 21 degrees." and not second.choices[0].message.tool_calls


def test_the_tool_conversation_is_rendered_into_the_prompt(app, tool_tokenizer, tiny_tool_model_dir):
    """What the engine is given for a conversation with a call and its reply: the
    definitions, the call as a <tool_call> block, the reply as a <tool_response>."""
    from openft.serve.chat import ChatMessage
    from openft.serve.engine import ModelHandle

    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    sent = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    messages = [ChatMessage.model_validate(m).for_template() for m in sent]
    handle = ModelHandle(name=TOOLY, base_path=tiny_tool_model_dir)
    text = tool_tokenizer.decode(app.state.engine.apply_chat_template(handle, messages, TOOLS))
    assert '"name": "get_weather", "description": "Current weather in a city"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '<tool_response>\n{"temp": 21}\n</tool_response>' in text
    assert text.endswith("<|im_start|>assistant\n")


def test_sent_back_calls_need_a_tool_template_and_odd_arguments_are_no_500(app):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "[" * 1500}}
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "?"},
    ]
    # Arguments that are not JSON (here nested past any parser's depth) are rendered as the text they are.
    r = post(app, {"model": TOOLY, "messages": history, "tools": TOOLS, "max_tokens": 2})
    assert r.status_code == 200, r.text
    r = post(app, {"model": TINY, "messages": history, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_previewing_tool_data_with_a_model_without_tools_is_a_400(app, tmp_path):
    """The file preview and stats render the data with the chosen model's template:
    tool calls through a template without tools are refused naming the model."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "21"},
                {"role": "assistant", "content": "21 degrees."},
            ],
            "tools": TOOLS,
        }
    ]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=120) as client:
            up = await client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", data)})
            fid = up.json()["id"]
            bad = await client.get(f"/v1/files/{fid}/preview", params={"model": TINY})
            good = await client.get(f"/v1/files/{fid}/preview", params={"model": TOOLY})
            return up, bad, good

    up, bad, good = asyncio.run(go())
    assert up.status_code == 200, up.text
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "model", bad.text
    assert "does not render tools" in bad.json()["error"]["message"]
    assert good.status_code == 200, good.text
    trained = [s["text"] for s in good.json()["examples"][0]["segments"] if s.get("trained")]
    assert trained and trained[0].startswith("<tool_call>")


def test_a_comparison_scores_tool_questions(app, script):
    """/v1/comparisons offers a question's tools through the template and scores the
    call each model makes (both sides scripted to make the expected one)."""
    question = {
        "question": "Weather in Paris?",
        "tools": TOOLS,
        "tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}},
    }

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=300) as client:
            up = await client.post(
                "/v1/files", data={"purpose": "evals"}, files={"file": ("q.jsonl", json.dumps(question) + "\n")}
            )
            body = {"before_model": TOOLY, "after_model": TOOLY, "questions_file": up.json()["id"], "max_tokens": 40}
            script(CALL_TEXT)
            return await client.post("/v1/comparisons", json=body)

    r = asyncio.run(go())
    assert r.status_code == 200, r.text
    summary = r.json()["summary"]["tool_calls"]
    assert summary["questions"] == 1
    assert summary["after"] == {"right_tool": 1, "valid_arguments": 1, "expected_arguments": 1}
    assert r.json()["rows"][0]["after_scores"]["right_tool"] is True

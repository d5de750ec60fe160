"""A reasoning model's `<think>` block comes back as `reasoning_content` beside
`content` (as DeepSeek's API returns it), streamed and not, in process (a real app
and engine). The tiny model carries a DeepSeek-R1-style template whose generation
prompt opens the block; its answers come from the engine's sampler scripted to write
reasoning and an answer (the route, engine, detokenizer and splitter run as in
production)."""

from __future__ import annotations

import pytest

from openft.models.reasoning import ReasoningStream, split_reasoning

from .conftest import TINY, in_process_app, scripted_sampler
from .test_api_tools import post, sse

THINKER = "tiny-r1"
# ChatML whose generation prompt opens a think block, as DeepSeek-R1 distills' does.
R1_TEMPLATE = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n<think>\\n'}}{% endif %}"
)
ASK = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def thinker_dir(tiny_model_dir, tmp_path_factory):
    import shutil

    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-r1")
    for f in tiny_model_dir.iterdir():
        if f.suffix in (".json", ".safetensors"):
            shutil.copy(f, out / f.name)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = R1_TEMPLATE
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def app(tmp_path_factory, session_home, tiny_model_dir, thinker_dir):
    home = tmp_path_factory.mktemp("reasoning-home")
    with in_process_app(home, {THINKER: thinker_dir, TINY: tiny_model_dir}) as application:
        yield application


@pytest.fixture
def script(monkeypatch, tiny_tokenizer):
    return scripted_sampler(monkeypatch, tiny_tokenizer, "<|im_end|>")


def test_reasoning_comes_back_beside_the_answer(app, openapi, script):
    script("Two plus three is five.\n</think>\n\nThe answer is 5.")
    r = post(app, {"model": THINKER, "messages": ASK, "max_tokens": 64})
    assert r.status_code == 200, r.text
    openapi(r.json(), "CreateChatCompletionResponse")
    message = r.json()["choices"][0]["message"]
    assert message["reasoning_content"] == "Two plus three is five."
    assert message["content"] == "The answer is 5."
    assert "think>" not in message["content"]


def test_streamed_reasoning_arrives_as_reasoning_content_deltas(app, openapi, script):
    script("Two plus three is five.\n</think>\n\nThe answer is 5.")
    r = post(app, {"model": THINKER, "messages": ASK, "max_tokens": 64, "stream": True})
    assert r.status_code == 200, r.text
    chunks = sse(r)
    for ch in chunks:
        openapi(ch, "CreateChatCompletionStreamResponse")
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    assert reasoning.strip() == "Two plus three is five."
    assert content == "The answer is 5."


def test_a_model_without_think_blocks_has_no_reasoning_field(app, script):
    script("Hello there.")
    r = post(app, {"model": TINY, "messages": ASK, "max_tokens": 16})
    message = r.json()["choices"][0]["message"]
    assert "reasoning_content" not in message and message["content"] == "Hello there."


@pytest.mark.parametrize("cut", range(1, 12))
def test_stream_splitter_agrees_with_the_whole_text_split_wherever_a_tag_is_cut(cut):
    text = "<think>\nweighing it</think>\n\nIt is 5."
    rs = ReasoningStream()
    parts = [rs.push(text[i : i + cut]) for i in range(0, len(text), cut)] + [rs.finish()]
    reasoning = "".join(r for r, _ in parts)
    content = "".join(c for _, c in parts)
    assert (reasoning.strip(), content) == split_reasoning(text)


def test_an_unclosed_block_cut_by_max_tokens_is_all_reasoning():
    rs = ReasoningStream(opened=True)
    r, c = rs.push("still thinking about </thi")
    r2, c2 = rs.finish()
    assert (r + r2, c + c2) == ("still thinking about </thi", "")

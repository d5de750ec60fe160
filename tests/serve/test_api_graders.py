"""/v1/fine_tuning/alpha/graders through the official client against a real
server: every grader type runs, answers match OpenAI's RunGraderResponse, bad
graders are refused naming the field, and a served model judges (the real tiny
model over HTTP; a scripted one in process, to check the score it gives is read)."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from .conftest import TINY, in_process_app, scripted_sampler

pytestmark = pytest.mark.integration

EXACT = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.label}}",
    "operation": "eq",
}
PYTHON = {
    "type": "python",
    "name": "length",
    "source": "def grade(sample, item):\n    return min(1.0, len(sample['output_text']) / item['target'])\n",
}


def test_string_check_and_python_graders_run(server, openapi):
    client = server.client()
    result = client.fine_tuning.alpha.graders.run(grader=EXACT, item={"label": "Paris"}, model_sample="Paris")
    assert result.reward == 1.0 and result.metadata.type == "string_check" and result.metadata.name == "exact"
    openapi(result, "RunGraderResponse")
    result = client.fine_tuning.alpha.graders.run(grader=PYTHON, item={"target": 10}, model_sample="Paris")
    assert result.reward == pytest.approx(0.5) and not result.metadata.errors.python_grader_runtime_error
    openapi(result, "RunGraderResponse")


def test_text_similarity_and_multi_graders_run(server, openapi):
    client = server.client()
    multi = {
        "type": "multi",
        "name": "mix",
        "graders": {
            "exact": EXACT,
            "overlap": {
                "type": "text_similarity",
                "name": "overlap",
                "input": "{{sample.output_text}}",
                "reference": "{{item.label}} is the capital",
                "evaluation_metric": "rouge_1",
            },
        },
        "calculate_output": "0.25 * exact + 0.75 * overlap",
    }
    result = client.fine_tuning.alpha.graders.run(grader=multi, item={"label": "Paris"}, model_sample="Paris")
    assert result.sub_rewards == {"exact": 1.0, "overlap": pytest.approx(0.4)}
    assert result.reward == pytest.approx(0.25 + 0.75 * 0.4)
    openapi(result, "RunGraderResponse")


def test_a_python_grader_that_hangs_or_connects_is_reported_not_fatal(server):
    client = server.client()
    bad = dict(
        PYTHON, source="import socket\ndef grade(sample, item):\n    socket.create_connection(('127.0.0.1', 1))\n"
    )
    result = client.fine_tuning.alpha.graders.run(grader=bad, item={}, model_sample="x")
    assert result.reward == 0.0 and result.metadata.errors.python_grader_runtime_error
    assert "may not use socket" in result.metadata.errors.python_grader_runtime_error_details
    # the server is unharmed: the next grader runs
    assert client.fine_tuning.alpha.graders.run(grader=EXACT, item={"label": "a"}, model_sample="a").reward == 1.0


def test_validate_returns_the_grader_or_names_the_bad_field(server, openapi):
    client = server.client()
    valid = client.fine_tuning.alpha.graders.validate(grader=EXACT)
    assert valid.grader.type == "string_check"
    openapi(valid, "ValidateGraderResponse")
    for grader, param in [
        (dict(EXACT, operation="contains"), "grader.operation"),
        (dict(PYTHON, source="def grade(sample, item)\n    return 1"), "grader.source"),
        (
            {"type": "multi", "name": "m", "graders": {"a": EXACT}, "calculate_output": "a + b"},
            "grader.calculate_output",
        ),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.fine_tuning.alpha.graders.validate(grader=grader)
        assert e.value.body["param"] == param and e.value.body["code"] == "invalid_grader"


def score_grader(model: str) -> dict:
    return {
        "type": "score_model",
        "name": "judge",
        "model": model,
        "input": [{"role": "user", "content": "Reference: {{item.label}}\nAnswer: {{sample.output_text}}\nScore it."}],
        "sampling_params": {"max_completions_tokens": 8},
    }


def test_a_served_model_is_the_judge(server, openapi):
    client = server.client()
    result = client.fine_tuning.alpha.graders.run(
        grader=score_grader(TINY), item={"label": "Paris"}, model_sample="Paris"
    )
    openapi(result, "RunGraderResponse")
    # The tiny random model writes noise: either a number in range or a parse error, never a server error.
    assert not result.metadata.errors.api_model_grader_server_error
    assert result.metadata.sampled_model_name == TINY
    usage = result.api_model_grader_token_usage_per_model[TINY]
    assert usage["prompt_tokens"] > 10 and 1 <= usage["completion_tokens"] <= 8
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.alpha.graders.run(grader=score_grader("no-such-judge"), item={}, model_sample="x")


@pytest.fixture(scope="module")
def app(tmp_path_factory, session_home, tiny_model_dir):
    with in_process_app(tmp_path_factory.mktemp("graders-home"), {TINY: tiny_model_dir}) as application:
        yield application


@pytest.mark.parametrize(
    "grader, said, reward, label",
    [
        (score_grader(TINY), "0.8", 0.8, None),
        (
            {
                "type": "label_model",
                "name": "tone",
                "model": TINY,
                "input": [{"role": "user", "content": "Tone of: {{sample.output_text}}"}],
                "labels": ["positive", "negative"],
                "passing_labels": ["positive"],
            },
            "negative",
            0.0,
            "negative",
        ),
    ],
)
def test_the_judges_reply_through_the_engine_is_read(app, monkeypatch, tiny_tokenizer, grader, said, reward, label):
    script = scripted_sampler(monkeypatch, tiny_tokenizer, "<|im_end|>")
    script(said)

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, timeout=120) as http:
            client = openai.AsyncOpenAI(
                api_key="local", base_url="http://127.0.0.1/v1", http_client=http, max_retries=0
            )
            return await client.fine_tuning.alpha.graders.run(
                grader=grader, item={"label": "Paris"}, model_sample="I love it"
            )

    result = asyncio.run(go())
    assert result.reward == pytest.approx(reward)
    assert result.metadata.scores.get("label") == label

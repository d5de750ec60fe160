"""Graders on fixed samples: parsing (with the path of the bad field), templates,
every grader type, the multi formula, and model graders over a judge that
answers with fixed replies (the real engine as judge is in tests/serve)."""

from __future__ import annotations

import pytest

from openft.eval.formula import FormulaError, parse_formula
from openft.eval.graders import (
    GradeContext,
    GraderError,
    JudgeError,
    JudgeReply,
    grade,
    parse_grader,
    parse_label,
    parse_score,
    passed,
)
from openft.eval.render import TemplateVariableError, render, sample_namespace

ITEM = {"label": "Paris", "meta": {"tags": ["geo", "capital"]}, "n": 3}


def run(grader: dict, output: str, item: dict = ITEM, ctx: GradeContext | None = None):
    spec = parse_grader(grader)
    return spec, grade(spec, item, sample_namespace(output), ctx)


def check(op: str, reference: str = "{{item.label}}") -> dict:
    return {
        "type": "string_check",
        "name": "s",
        "input": "{{sample.output_text}}",
        "reference": reference,
        "operation": op,
    }


# ----------------------------------------------------------------- templates


def test_render_fills_nested_fields_lists_and_json():
    sample = sample_namespace('{"answer": "Paris", "score": 0.5}')
    assert render("{{ item.meta.tags[1] }}/{{item.n}}", ITEM, sample) == "capital/3"
    assert render("{{sample.output_json.answer}} {{sample.output_json.score}}", ITEM, sample) == "Paris 0.5"
    assert render("{{item.meta}}", ITEM, sample) == '{"tags":["geo","capital"]}'


@pytest.mark.parametrize(
    "template", ["{{item.missing}}", "{{item.meta.tags[7]}}", "{{sample.output_json.x}}", "{{other.x}}", "{{item..x}}"]
)
def test_render_refuses_names_that_hold_nothing(template):
    with pytest.raises(TemplateVariableError):
        render(template, ITEM, sample_namespace("not json"))


def test_a_missing_variable_is_an_invalid_variable_error_not_an_empty_match():
    _, result = run(check("eq", "{{item.lable}}"), "")
    assert result.errors["invalid_variable_error"] and result.reward == 0.0 and "lable" in result.message


# ----------------------------------------------------------------- string_check and text_similarity


@pytest.mark.parametrize(
    "op, output, reward",
    [
        ("eq", "Paris", 1.0),
        ("eq", "paris", 0.0),
        ("ne", "Lyon", 1.0),
        ("ne", "Paris", 0.0),
        ("like", "It is Paris.", 1.0),  # no wildcard: substring, case-sensitive
        ("like", "It is paris.", 0.0),
        ("ilike", "It is PARIS.", 1.0),
    ],
)
def test_string_check_operations(op, output, reward):
    spec, result = run(check(op), output)
    assert result.reward == reward and not result.failed
    assert passed(spec, result) == (reward == 1.0)


def test_like_wildcards():
    assert run(check("like", "P_r%"), "Paris, France")[1].reward == 1.0
    assert run(check("like", "P_r%"), "Prague")[1].reward == 0.0
    assert run(check("ilike", "%FRANCE"), "paris, france")[1].reward == 1.0


def test_text_similarity_with_a_pass_threshold():
    grader = {
        "type": "text_similarity",
        "name": "t",
        "input": "{{sample.output_text}}",
        "reference": "the capital is {{item.label}}",
        "evaluation_metric": "rouge_1",
        "pass_threshold": 0.6,
    }
    spec, result = run(grader, "The capital is Paris!")
    assert result.reward == pytest.approx(1.0) and passed(spec, result)
    spec, result = run(grader, "I think it is Lyon")
    assert 0 < result.reward < 0.6 and not passed(spec, result)


# ----------------------------------------------------------------- parsing errors


@pytest.mark.parametrize(
    "grader, param",
    [
        ({"type": "string_chek"}, "grader.type"),
        ({"type": "string_check", "input": "a", "reference": "b", "operation": "contains"}, "grader.operation"),
        ({"type": "string_check", "input": 3, "reference": "b", "operation": "eq"}, "grader.input"),
        ({"type": "string_check", "input": "{{items.x}}", "reference": "b", "operation": "eq"}, "grader.input"),
        (
            {"type": "text_similarity", "input": "a", "reference": "b", "evaluation_metric": "bert"},
            "grader.evaluation_metric",
        ),
        ({"type": "python", "source": "def grade(s, i) return 1"}, "grader.source"),
        ({"type": "python", "source": "def score(s, i):\n    return 1"}, "grader.source"),
        ({"type": "python", "source": "def grade(s):\n    return 1"}, "grader.source"),
        (
            {"type": "score_model", "model": "m", "input": [{"role": "user", "content": "x"}], "range": [1, 0]},
            "grader.range",
        ),
        ({"type": "score_model", "model": "m", "input": []}, "grader.input"),
        ({"type": "score_model", "model": "m", "input": [{"role": "judge", "content": "x"}]}, "grader.input[0].role"),
        (
            {
                "type": "score_model",
                "model": "m",
                "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}],
            },
            "grader.input[0].content[0]",
        ),
        (
            {
                "type": "label_model",
                "model": "m",
                "input": [{"role": "user", "content": "x"}],
                "labels": ["a", "b"],
                "passing_labels": ["c"],
            },
            "grader.passing_labels",
        ),
        (
            {
                "type": "multi",
                "graders": {"a": {"type": "string_check", "input": "x", "reference": "y", "operation": "nope"}},
                "calculate_output": "a",
            },
            "grader.graders.a.operation",
        ),
        ({"type": "multi", "graders": {"a": check("eq")}, "calculate_output": "a + b"}, "grader.calculate_output"),
        (
            {"type": "multi", "graders": {"a": check("eq")}, "calculate_output": "__import__('os')"},
            "grader.calculate_output",
        ),
    ],
)
def test_bad_graders_name_the_field(grader, param):
    with pytest.raises(GraderError) as e:
        parse_grader(grader)
    assert e.value.param == param


# ----------------------------------------------------------------- multi


def test_multi_combines_named_sub_graders_by_formula():
    grader = {
        "type": "multi",
        "name": "m",
        "graders": {
            "exact": check("eq"),
            "close": {
                "type": "text_similarity",
                "name": "c",
                "input": "{{sample.output_text}}",
                "reference": "{{item.label}} France",
                "evaluation_metric": "rouge_1",
            },
        },
        "calculate_output": "0.5 * exact + 0.5 * close ^ 2",
    }
    _, result = run(grader, "Paris")
    assert result.sub_rewards["exact"] == 1.0
    assert result.sub_rewards["close"] == pytest.approx(2 / 3)
    assert result.reward == pytest.approx(0.5 + 0.5 * (2 / 3) ** 2)


def test_multi_takes_a_list_named_by_each_grader_and_the_sdk_single_grader():
    listed = {
        "type": "multi",
        "name": "m",
        "graders": [dict(check("eq"), name="exact")],
        "calculate_output": "max(exact, 0.25)",
    }
    assert run(listed, "Lyon")[1].reward == 0.25
    single = {"type": "multi", "name": "m", "graders": dict(check("eq"), name="exact"), "calculate_output": "exact"}
    assert run(single, "Paris")[1].reward == 1.0


def test_formula_errors_at_run_time_are_flagged():
    grader = {"type": "multi", "name": "m", "graders": {"a": check("eq")}, "calculate_output": "1 / a"}
    _, result = run(grader, "Lyon")
    assert result.failed and result.errors["other_error"] and "could not be computed" in result.message
    with pytest.raises(FormulaError):
        parse_formula("a.__class__", {"a"})
    assert parse_formula("9 ^ 9 ^ 9 ^ 9", set()).text  # parses; computing it overflows instead of hanging
    with pytest.raises(FormulaError, match="could not be computed|finite"):
        parse_formula("9 ^ 9 ^ 9 ^ 9", set())({})


# ----------------------------------------------------------------- model graders


class FixedJudge:
    """A judge that replies with the given texts in turn and records what it was asked."""

    def __init__(self, *replies: str):
        self.replies = list(replies)
        self.asked: list[tuple[str, list[dict], dict]] = []

    def __call__(self, model, messages, sampling):
        self.asked.append((model, messages, sampling))
        return JudgeReply(self.replies.pop(0), model, prompt_tokens=40, completion_tokens=3)


SCORE = {
    "type": "score_model",
    "name": "judge",
    "model": "judge-model",
    "input": [
        {"role": "system", "content": "You grade answers."},
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "Ref: {{item.label}}\n"},
                {"type": "input_text", "text": "Answer: {{sample.output_text}}"},
            ],
        },
    ],
    "range": [0, 10],
    "pass_threshold": 7,
}


def test_score_model_renders_the_prompt_and_parses_the_score():
    judge = FixedJudge("8.5", '{"result": 3}', "I cannot say", "42")
    ctx = GradeContext(judge=judge)
    spec, result = run(SCORE, "Paris", ctx=ctx)
    model, messages, sampling = judge.asked[0]
    assert model == "judge-model" and messages[0] == {"role": "system", "content": "You grade answers."}
    assert messages[1]["content"].startswith("Ref: Paris\nAnswer: Paris") and "from 0 to 10" in messages[1]["content"]
    assert sampling["temperature"] == 0.0  # deterministic by default
    assert result.reward == 8.5 and passed(spec, result)
    assert result.usage["judge-model"]["total_tokens"] == 43 and result.sampled_model_name == "judge-model"
    assert run(SCORE, "Paris", ctx=ctx)[1].reward == 3.0
    unparsed = run(SCORE, "Paris", ctx=ctx)[1]
    assert unparsed.errors["model_grader_parse_error"] and unparsed.reward == 0.0
    outside = run(SCORE, "Paris", ctx=ctx)[1]
    assert outside.errors["model_grader_parse_error"] and "outside the range" in outside.message


def test_label_model_maps_the_label_to_a_pass():
    grader = {
        "type": "label_model",
        "name": "sentiment",
        "model": "judge-model",
        "input": [{"role": "user", "content": "Statement: {{sample.output_text}}"}],
        "labels": ["positive", "neutral", "negative"],
        "passing_labels": ["positive"],
    }
    ctx = GradeContext(judge=FixedJudge("Positive.", "It sounds negative to me, not positive", "unclear"))
    spec, result = run(grader, "I love it", ctx=ctx)
    assert result.label == "positive" and result.reward == 1.0 and passed(spec, result)
    spec, result = run(grader, "meh", ctx=ctx)
    assert result.label == "negative" and result.reward == 0.0  # the first label named wins
    assert run(grader, "?", ctx=ctx)[1].errors["model_grader_parse_error"]


def test_a_judge_that_fails_is_a_server_error_flag():
    def broken(model, messages, sampling):
        raise JudgeError("judge model 'x': not found")

    result = run(SCORE, "Paris", ctx=GradeContext(judge=broken))[1]
    assert (
        result.errors["model_grader_server_error"] and "not found" in result.errors["model_grader_server_error_details"]
    )


def test_parse_score_and_label_edge_cases():
    assert parse_score("Score: 0.75/1") == 0.75 and parse_score("-2e-1") == -0.2 and parse_score("none") is None
    assert parse_label('{"result": "b"}', ("a", "b")) == "b"
    assert parse_label("not-ok", ("ok", "not-ok")) == "not-ok"  # the whole reply first, then whole words

"""The checkpoint scorer without a model: which questions it scores, how answers
are graded by the references' criteria or an eval's, and the metrics a checkpoint
gains; the best-scored step a select=best run keeps."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from openft.data.types import Location
from openft.eval.checkpoints import Scorer, criteria_from_references
from openft.eval.questions import Question
from openft.train.recipe import Recipe


def q(question: str, reference: str | None, tool_call: dict | None = None) -> Question:
    return Question(question, reference, Location("q.jsonl", line=1), tool_call=tool_call)


QUESTIONS = [
    q("Capital of France?", "Paris"),
    q("Say anything", None),  # no reference: nothing to score it by
    q("Capital of Italy?", "Rome"),
    q("Weather?", "x", tool_call={"name": "weather", "arguments": None}),  # a tool call: not text
]


def test_references_score_only_the_questions_that_have_one():
    scorer = Scorer.from_questions(QUESTIONS)
    assert scorer.indices == [0, 2]
    assert [c.name for c in scorer.criteria] == ["contains_reference", "rouge_l"]
    assert Scorer.from_questions([q("a", None), q("b", None)]) is None


def test_answers_are_graded_by_containment_and_rouge_l():
    scorer = Scorer.from_questions(QUESTIONS)
    s = scorer.grade(["It is Paris.", "Milan"], start=0.0)
    assert s.per_criterion["contains_reference"] == 0.5
    # rouge_l of "It is Paris." vs "Paris": P=1/3, R=1 -> F1 = 0.5; "Milan" vs "Rome": 0
    assert s.per_criterion["rouge_l"] == pytest.approx(0.25)
    assert s.score == pytest.approx((0.5 + 0.25) / 2)
    assert s.pass_rate == 0.5  # the first passes both (0.5 >= 0.5), the second neither
    assert [r["status"] for r in s.rows] == ["pass", "fail"]
    assert s.rows[0]["sample"]["output"][0]["content"] == "It is Paris."
    m = s.metrics()
    assert set(m) == {"eval_score", "eval_pass_rate", "eval_contains_reference", "eval_rouge_l", "eval_seconds"}


def test_grade_all_picks_the_scored_questions_answers_from_the_whole_set():
    scorer = Scorer.from_questions(QUESTIONS)
    s = scorer.grade_all(["Paris", "whatever", "Rome", "call"])
    assert s.score == 1.0 and s.pass_rate == 1.0
    assert [r["datasource_item"]["question"] for r in s.rows] == ["Capital of France?", "Capital of Italy?"]


def test_an_evals_criteria_score_every_question():
    exact = {
        "type": "string_check",
        "name": "exact",
        "input": "{{sample.output_text}}",
        "reference": "{{item.reference}}",
        "operation": "eq",
    }
    scorer = Scorer.from_questions(QUESTIONS, criteria=[exact])
    assert scorer.indices == [0, 1, 2, 3]
    s = scorer.grade_all(["Paris", "", "Roma", "x"])
    assert s.per_criterion == {"exact": 0.75}  # "" equals the missing reference ""
    assert criteria_from_references()[0]["operation"] == "ilike"


def test_the_best_scored_step_is_the_latest_among_equals():
    history = [
        {"step": 1, "loss": 2.0},
        {"step": 2, "eval_score": 0.4},
        {"step": 4, "eval_score": 0.7},
        {"step": 6, "eval_score": 0.7},
        {"step": 8, "eval_score": 0.5},
    ]
    assert Recipe.best_scored_step(SimpleNamespace(state=SimpleNamespace(history=history))) == 6
    assert Recipe.best_scored_step(SimpleNamespace(state=SimpleNamespace(history=history[:1]))) is None

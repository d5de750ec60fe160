"""Score a model on an eval while it trains: the base before the first step and
every checkpoint as it is written.

A `Scorer` holds the eval's testing criteria and its items (from the job's
question set, or an eval of the Evals API with the question set as its items).
`score(model, tokenizer)` answers every item greedily with the model as it is in
memory (no reload, no copy: training waits only for the answers and the grading)
and grades each answer by every criterion. The checkpoint's score is the mean
reward over items and criteria; its pass rate, the share of items that pass all.

A question set without an eval gets criteria built from its references
(`criteria_from_references`): the reference contained in the answer (case
aside), and ROUGE-L against it, both cheap enough to run at every checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from openft.eval.generate import answer_conversations
from openft.eval.graders import GradeContext, Grader, parse_grader
from openft.eval.questions import Question
from openft.eval.render import sample_namespace
from openft.eval.runs import grade_entry

ITEM_SCHEMA = {
    "type": "object",
    "properties": {"question": {"type": "string"}, "reference": {"type": "string"}},
    "required": ["question", "reference"],
}


def criteria_from_references() -> list[dict]:
    """The testing criteria a question set's references stand for."""
    return [
        {
            "type": "string_check",
            "name": "contains_reference",
            "input": "{{sample.output_text}}",
            "reference": "{{item.reference}}",
            "operation": "ilike",
        },
        {
            "type": "text_similarity",
            "name": "rouge_l",
            "input": "{{sample.output_text}}",
            "reference": "{{item.reference}}",
            "evaluation_metric": "rouge_l",
            "pass_threshold": 0.5,
        },
    ]


@dataclass
class CheckpointScore:
    score: float  # mean reward over items and criteria
    pass_rate: float  # share of items passing every criterion
    per_criterion: dict[str, float]  # criterion -> mean reward
    rows: list[dict]  # one output item per item: answer and results
    seconds: float

    def metrics(self) -> dict:
        """The fields a checkpoint's metrics gain."""
        return {
            "eval_score": self.score,
            "eval_pass_rate": self.pass_rate,
            **{f"eval_{name}": value for name, value in self.per_criterion.items()},
            "eval_seconds": self.seconds,
        }


@dataclass
class Scorer:
    criteria_json: list[dict]
    entries: list[dict]  # {"item": {...}}
    indices: list[int]  # which of the question set's questions each entry is
    max_new_tokens: int = 64
    ctx: GradeContext = field(default_factory=GradeContext)
    criteria: list[Grader] = field(init=False)

    def __post_init__(self):
        self.criteria = [parse_grader(c, f"testing_criteria[{i}]") for i, c in enumerate(self.criteria_json)]

    @classmethod
    def from_questions(cls, questions: list[Question], criteria: list[dict] | None = None, **kw) -> Scorer | None:
        """A scorer over the question set: by the given criteria (an eval's), every
        question; by the references' criteria, the questions that have one. None
        when nothing can be scored."""
        if criteria is None:
            keep = [i for i, q in enumerate(questions) if q.reference is not None and q.tool_call is None]
        else:
            keep = list(range(len(questions)))
        if not keep:
            return None
        entries = [
            {"item": {"question": questions[i].question, "reference": questions[i].reference or ""}} for i in keep
        ]
        return cls(criteria or criteria_from_references(), entries, keep, **kw)

    def score(self, model, tokenizer) -> CheckpointScore:
        """Answer every item with the model as it is now, and grade the answers."""
        start = time.monotonic()
        answers = answer_conversations(model, tokenizer, self.conversations(), max_new_tokens=self.max_new_tokens)
        return self.grade(answers, start)

    def conversations(self) -> list[list[dict]]:
        return [[{"role": "user", "content": e["item"]["question"]}] for e in self.entries]

    def grade_all(self, answers_to_questions: list[str]) -> CheckpointScore:
        """Grade answers already given to the whole question set (the base model's)."""
        return self.grade([answers_to_questions[i] for i in self.indices], time.monotonic())

    def grade(self, answers: list[str], start: float) -> CheckpointScore:
        rows, rewards, passes = [], {c.name: [] for c in self.criteria}, 0
        for i, (entry, conv, answer) in enumerate(zip(self.entries, self.conversations(), answers)):
            results, status, _ = grade_entry(self.criteria, entry, sample_namespace(answer), self.ctx)
            for r in results:
                rewards[r["name"]].append(r["score"])
            passes += status == "pass"
            rows.append(
                {
                    "datasource_item_id": i,
                    "datasource_item": entry["item"],
                    "sample": {"input": conv, "output": [{"role": "assistant", "content": answer}]},
                    "results": results,
                    "status": status,
                }
            )
        per = {name: sum(v) / len(v) for name, v in rewards.items()}
        return CheckpointScore(
            score=sum(per.values()) / len(per),
            pass_rate=passes / len(self.entries),
            per_criterion=per,
            rows=rows,
            seconds=time.monotonic() - start,
        )

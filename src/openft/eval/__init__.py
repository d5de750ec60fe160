"""Before/after comparison: ask a fixed question set of the base model and the
fine-tuned model, score both answers against references, and say in plain words
whether training worked.

Stages, each usable alone: `questions` (read the question file), `generate`
(deterministic greedy answers; imported from its module so that rendering a report
does not import torch), `scores`, `compare` (rows, summary, Markdown/JSON/terminal
reports) and `verdict` (training signals + comparison → checks and a sentence).
"""

from openft.eval.compare import (
    Comparison,
    Row,
    Scores,
    build_comparison,
    format_terminal,
    to_json,
    to_markdown,
    write_report,
)
from openft.eval.questions import Question, QuestionFileError, load_questions
from openft.eval.scores import Embedder, contains, exact_match, rouge_l
from openft.eval.verdict import Check, TrainingSignals, Verdict, judge

__all__ = [
    "Check",
    "Comparison",
    "Embedder",
    "Question",
    "QuestionFileError",
    "Row",
    "Scores",
    "TrainingSignals",
    "Verdict",
    "build_comparison",
    "contains",
    "exact_match",
    "format_terminal",
    "judge",
    "load_questions",
    "rouge_l",
    "to_json",
    "to_markdown",
    "write_report",
]

"""Workflows that span stages: fine-tune with a before/after comparison, compare
any two models. The CLI and the job worker (`openft.jobs.worker`) call these."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from openft.config import JobSpec
from openft.eval.compare import Comparison, build_comparison, format_terminal, write_report
from openft.eval.generate import answer_questions
from openft.eval.questions import load_questions
from openft.eval.scores import Embedder
from openft.eval.verdict import TrainingSignals, judge
from openft.models.load import load_model
from openft.models.tools import model_tool_style
from openft.train.distributed import Launch
from openft.train.export import load_any
from openft.train.launch import run_ranks
from openft.train.prepare import check_data_template
from openft.train.recipe import ControlFn, EventFn, TrainResult, finetune


@dataclass
class FinetuneOutcome:
    result: TrainResult
    comparison: Comparison | None
    report_paths: tuple[Path, Path] | None


def _signals(result: TrainResult) -> TrainingSignals:
    s = result.signals
    return TrainingSignals(**{k: s[k] for k in TrainingSignals.__dataclass_fields__})


def finetune_with_comparison(
    spec: JobSpec,
    *,
    resume: bool = False,
    on_event: EventFn | None = None,
    progress: bool = True,
    echo=print,
    control: ControlFn | None = None,
    launch: Launch | None = None,
    criteria: list[dict] | None = None,
    grader_judge=None,
) -> FinetuneOutcome:
    """Fine-tune `spec`, answering its questions before and after. With a `launch`
    of more than one rank, training runs on torchrun's ranks (`openft.train.launch`)
    while this process relays their events and control requests. With questions
    (and `spec.eval.score_checkpoints`), the base model and every checkpoint are
    scored too, by `criteria` (an eval's testing criteria) or by the references;
    `grader_judge` answers for the criteria's model graders."""
    loaded = load_model(spec.model, chat_template=spec.chat_template)
    questions = load_questions(spec.eval.questions) if spec.eval.questions else None
    before = None
    scoring = None
    if questions:
        check_data_template(spec, loaded)  # a refused template fails now, not after the base model's answers
        echo(f"Answering {len(questions)} questions with the base model ...")
        before = answer_questions(
            loaded.model,
            loaded.tokenizer,
            [q.question for q in questions],
            max_new_tokens=spec.eval.max_new_tokens,
            tools=[q.tools for q in questions],
        )
        scoring = _checkpoint_scoring(spec, questions, before, criteria, grader_judge, on_event, launch)
    if launch and launch.distributed:
        check_data_template(spec, loaded)  # bad data fails here, once, not on every rank
        loaded = None  # each rank loads its own copy; this one is not needed until the answers after
        result = run_ranks(spec, launch, resume=resume, on_event=on_event, control=control, progress=progress)
        if launch.node_rank != 0:
            return FinetuneOutcome(result, None, None)  # node 0 reports
        loaded = load_any(str(result.run_dir))  # the ranks trained their own copies
    else:
        result = finetune(
            spec,
            resume=resume,
            on_event=on_event,
            progress=progress,
            loaded=loaded,
            control=control,
            score_checkpoint=scoring,
        )
    if not questions:
        verdict = judge(_signals(result))
        echo(verdict.summary)
        return FinetuneOutcome(result, None, None)
    echo(f"Answering {len(questions)} questions with the fine-tuned model ...")
    after = answer_questions(
        loaded.model,
        loaded.tokenizer,
        [q.question for q in questions],
        max_new_tokens=spec.eval.max_new_tokens,
        tools=[q.tools for q in questions],
    )
    style = model_tool_style(loaded.tokenizer)
    comparison = build_comparison(
        questions,
        before,
        after,
        before_model=spec.model,
        after_model=str(result.run_dir),
        embedder=Embedder(),
        tool_styles=(style, style),
    )
    comparison.verdict = judge(_signals(result), comparison.summary)
    paths = write_report(comparison, result.run_dir)
    echo(format_terminal(comparison))
    return FinetuneOutcome(result, comparison, paths)


def _checkpoint_scoring(spec: JobSpec, questions, before: list[str], criteria, grader_judge, on_event, launch):
    """The callback that scores each checkpoint, after scoring the base model's
    answers (already given) the same way; None when nothing is to be scored. One
    process only: on several ranks the model in memory is not this process's."""
    from openft.eval.checkpoints import Scorer
    from openft.eval.graders import GradeContext

    if not spec.eval.score_checkpoints or (launch and launch.distributed):
        return None
    scorer = Scorer.from_questions(
        questions, criteria, max_new_tokens=spec.eval.max_new_tokens, ctx=GradeContext(judge=grader_judge)
    )
    if scorer is None:
        return None
    emit = on_event or (lambda kind, data: None)
    base = scorer.grade_all(before)
    emit("base_scored", {**base.metrics(), "rows": base.rows})

    def score(model, tokenizer, step: int) -> dict:
        result = scorer.score(model, tokenizer)
        metrics = result.metrics() | {"eval_below_base": result.score < base.score, "eval_base_score": base.score}
        emit("checkpoint_scored", {"step": step, **metrics, "rows": result.rows})
        return metrics

    return score


def compare_models(
    before: str, after: str, questions_path: str, out_dir: str | Path, *, max_new_tokens: int = 64, echo=print
) -> Comparison:
    questions = load_questions(questions_path)
    texts = [q.question for q in questions]
    answers, styles = [], []
    for arg in (before, after):
        loaded = load_any(arg)
        styles.append(model_tool_style(loaded.tokenizer))
        echo(f"Answering {len(texts)} questions with {arg} ...")
        answers.append(
            answer_questions(
                loaded.model, loaded.tokenizer, texts, max_new_tokens=max_new_tokens, tools=[q.tools for q in questions]
            )
        )
        del loaded
    comparison = build_comparison(
        questions,
        answers[0],
        answers[1],
        before_model=before,
        after_model=after,
        embedder=Embedder(),
        tool_styles=(styles[0], styles[1]),
    )
    signals_path = Path(after) / "summary.json"
    if signals_path.exists():
        s = json.loads(signals_path.read_text())["signals"]
        comparison.verdict = judge(
            TrainingSignals(**{k: s[k] for k in TrainingSignals.__dataclass_fields__}), comparison.summary
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_report(comparison, out)
    echo(format_terminal(comparison))
    return comparison

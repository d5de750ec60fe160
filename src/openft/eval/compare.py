"""Put the base model's and the fine-tuned model's answers side by side, scored.

`build_comparison` scores both sides against each question's reference (if it has
one) and sums them up; the renderers show the same `Comparison` as Markdown (the
report file), JSON (the API and the console read it) and two terminal columns
(the CLI). A `Verdict` from `openft.eval.verdict` is attached when the run's
training signals are known.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import fmean

from openft.eval.questions import Question
from openft.eval.scores import Embedder, contains, exact_match, rouge_l, tool_call_scores
from openft.eval.verdict import TrainingSignals, Verdict, judge
from openft.fileio import atomic_write
from openft.models.tools import HERMES, ToolStyle

# A question counts as improved (or worse) when its score moved by more than this
# (scores are 0..1): smaller moves are rewording, not better or worse answers.
CHANGE_MARGIN = 0.01


@dataclass
class Scores:
    """Scores against the reference; all None when the question has none.
    `similarity` is also None when no embedder was used."""

    exact: bool | None = None
    contains: bool | None = None
    rouge_l: float | None = None
    similarity: float | None = None
    # Tool questions (an expected call): None elsewhere; expected_arguments also
    # None when the question gives no arguments.
    right_tool: bool | None = None
    valid_arguments: bool | None = None
    expected_arguments: bool | None = None


@dataclass
class Row:
    question: str
    reference: str | None
    before: str
    after: str
    before_scores: Scores
    after_scores: Scores


@dataclass
class Comparison:
    before_model: str
    after_model: str
    rows: list[Row]
    summary: dict
    verdict: Verdict | None = None


def build_comparison(
    questions: list[Question],
    before_answers: list[str],
    after_answers: list[str],
    *,
    before_model: str,
    after_model: str,
    embedder: Embedder | None = None,
    signals: TrainingSignals | None = None,
    tool_styles: tuple[ToolStyle, ToolStyle] = (HERMES, HERMES),
) -> Comparison:
    """Score and summarise; with `signals`, also judge the run (`comparison.verdict`).
    `tool_styles`: how the before and after models write tool calls (their templates')."""
    if not (len(questions) == len(before_answers) == len(after_answers)):
        raise ValueError(
            f"{len(questions)} questions but {len(before_answers)} before and {len(after_answers)} after answers"
        )
    scored = [i for i, q in enumerate(questions) if q.reference is not None]
    sims_before: dict[int, float] = {}
    sims_after: dict[int, float] = {}
    if embedder is not None and scored:
        # One call for both sides: each reference is embedded once.
        refs = [questions[i].reference for i in scored]
        answers = [before_answers[i] for i in scored] + [after_answers[i] for i in scored]
        sims = embedder.similarity(answers, refs + refs)
        sims_before = dict(zip(scored, sims[: len(scored)]))
        sims_after = dict(zip(scored, sims[len(scored) :]))

    rows = []
    for i, q in enumerate(questions):
        rows.append(
            Row(
                question=q.question,
                reference=q.reference,
                before=before_answers[i],
                after=after_answers[i],
                before_scores=_with_tools(
                    _score(before_answers[i], q.reference, sims_before.get(i)), before_answers[i], q, tool_styles[0]
                ),
                after_scores=_with_tools(
                    _score(after_answers[i], q.reference, sims_after.get(i)), after_answers[i], q, tool_styles[1]
                ),
            )
        )
    summary = summarise(rows)
    verdict = judge(signals, summary) if signals is not None else None
    return Comparison(before_model, after_model, rows, summary, verdict)


def _score(answer: str, reference: str | None, similarity: float | None) -> Scores:
    if reference is None:
        return Scores()
    return Scores(exact_match(answer, reference), contains(answer, reference), rouge_l(answer, reference), similarity)


def _with_tools(scores: Scores, answer: str, q: Question, style: ToolStyle) -> Scores:
    if q.tool_call is not None:
        scores.right_tool, scores.valid_arguments, scores.expected_arguments = tool_call_scores(
            answer, q.tool_call, q.tools or [], style
        )
    return scores


def _tool_summary(rows: list[Row]) -> dict | None:
    """Per side, how many tool questions got the right tool, valid and expected arguments."""
    tool_rows = [r for r in rows if r.after_scores.right_tool is not None]
    if not tool_rows:
        return None

    def side(scores: list[Scores]) -> dict:
        return {
            k: sum(bool(getattr(s, k)) for s in scores) for k in ("right_tool", "valid_arguments", "expected_arguments")
        }

    return {
        "questions": len(tool_rows),
        "before": side([r.before_scores for r in tool_rows]),
        "after": side([r.after_scores for r in tool_rows]),
    }


def summarise(rows: list[Row]) -> dict:
    """Per side: counts and rates of exact/contains, mean ROUGE-L and similarity
    (None where nothing was scored); and per question, whether it got better or
    worse by `metric` (similarity when available, else ROUGE-L)."""
    scored = [r for r in rows if r.reference is not None]
    has_sim = bool(scored) and all(r.after_scores.similarity is not None for r in scored)
    metric = ("similarity" if has_sim else "rouge_l") if scored else None
    improved = worse = 0
    for r in scored:
        delta = getattr(r.after_scores, metric) - getattr(r.before_scores, metric)
        improved += delta > CHANGE_MARGIN
        worse += delta < -CHANGE_MARGIN
    return {
        "questions": len(rows),
        "with_reference": len(scored),
        "answers_changed": sum(r.before != r.after for r in rows),
        "metric": metric,
        "improved": improved,
        "worse": worse,
        "unchanged": len(scored) - improved - worse,
        "before": _side([r.before_scores for r in scored]),
        "after": _side([r.after_scores for r in scored]),
        "tool_calls": _tool_summary(rows),
    }


def _side(scores: list[Scores]) -> dict:
    def mean(values: list) -> float | None:
        values = [float(v) for v in values if v is not None]
        return round(fmean(values), 4) if values else None

    return {
        "exact": sum(bool(s.exact) for s in scores),
        "contains": sum(bool(s.contains) for s in scores),
        "exact_rate": mean([s.exact for s in scores]),
        "contains_rate": mean([s.contains for s in scores]),
        "rouge_l": mean([s.rouge_l for s in scores]),
        "similarity": mean([s.similarity for s in scores]),
    }


# ---- JSON and files -------------------------------------------------------------


def to_json(comparison: Comparison) -> dict:
    """A JSON-serialisable dict with stable keys (the API returns it as is)."""
    return {
        "before_model": comparison.before_model,
        "after_model": comparison.after_model,
        "rows": [_row_json(r) for r in comparison.rows],
        "summary": comparison.summary,
        "verdict": asdict(comparison.verdict) if comparison.verdict else None,
    }


TOOL_SCORES = ("right_tool", "valid_arguments", "expected_arguments")


def _row_json(row: Row) -> dict:
    """A row as JSON; the tool scores only on tool questions (other rows keep their keys)."""
    out = asdict(row)
    for side in ("before_scores", "after_scores"):
        if row.after_scores.right_tool is None:
            for key in TOOL_SCORES:
                out[side].pop(key)
    return out


def write_report(comparison: Comparison, out_dir: str | Path) -> tuple[Path, Path]:
    """Write comparison.md and comparison.json; a reader never sees half a file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = atomic_write(out / "comparison.md", to_markdown(comparison))
    js = atomic_write(out / "comparison.json", json.dumps(to_json(comparison), ensure_ascii=False, indent=2) + "\n")
    return md, js


# ---- Markdown -------------------------------------------------------------------


def _fmt_scores(s: Scores) -> str:
    def mark(ok) -> str:
        return "✓" if ok else "✗"

    tool = []
    if s.right_tool is not None:
        tool = [f"right tool {mark(s.right_tool)}", f"valid arguments {mark(s.valid_arguments)}"]
        tool += [f"expected arguments {mark(s.expected_arguments)}"] if s.expected_arguments is not None else []
    if s.rouge_l is None:
        return " · ".join(tool) or "no reference"
    parts = [f"exact {mark(s.exact)}", f"contains {mark(s.contains)}", f"ROUGE-L {s.rouge_l:.2f}"]
    if s.similarity is not None:
        parts.append(f"similarity {s.similarity:.2f}")
    return " · ".join(parts + tool)


def _md_cell(text: str) -> str:
    # A table cell is one line: escape what would end the cell or become HTML,
    # then turn newlines into <br>.
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return "<br>".join(text.splitlines()) if text.strip() else "*(empty answer)*"


def _summary_lines(summary: dict) -> list[str]:
    k = summary["with_reference"]
    lines = [
        f"{summary['questions']} question{'s' if summary['questions'] != 1 else ''}, {k} with a reference answer; "
        f"the fine-tuned model answered differently on {summary['answers_changed']}."
    ]
    if summary["metric"]:
        label = "similarity" if summary["metric"] == "similarity" else "ROUGE-L"
        lines.append(
            f"By {label}: {summary['improved']} improved, {summary['worse']} got worse, "
            f"{summary['unchanged']} about the same."
        )
    tools = summary.get("tool_calls")
    if tools:
        n, before, after = tools["questions"], tools["before"]["right_tool"], tools["after"]["right_tool"]
        lines.append(f"Tool calls: the right tool on {before}/{n} questions before, {after}/{n} after.")
    return lines


def _metric_rows(summary: dict) -> list[tuple[str, str, str]]:
    b, a, k = summary["before"], summary["after"], summary["with_reference"]
    tools = summary.get("tool_calls")
    tool_rows = (
        [
            (label, f"{tools['before'][key]}/{tools['questions']}", f"{tools['after'][key]}/{tools['questions']}")
            for key, label in (("right_tool", "right tool"), ("valid_arguments", "valid arguments"))
        ]
        if tools
        else []
    )
    if not summary["metric"]:
        return tool_rows
    rows = tool_rows + [
        ("exact match", f"{b['exact']}/{k}", f"{a['exact']}/{k}"),
        ("contains", f"{b['contains']}/{k}", f"{a['contains']}/{k}"),
    ]
    for key, label in (("rouge_l", "mean ROUGE-L"), ("similarity", "mean similarity")):
        if a[key] is not None:
            rows.append((label, f"{b[key]:.3f}", f"{a[key]:.3f}"))
    return rows


def to_markdown(comparison: Comparison) -> str:
    c = comparison
    out = [f"# Before / after: `{c.before_model}` vs `{c.after_model}`", ""]
    if c.verdict:
        out += [f"**Verdict:** {c.verdict.summary}", ""]
    for n, r in enumerate(c.rows, start=1):
        out += [f"## {n}. {' '.join(r.question.split())}", ""]
        if r.reference is not None:
            out += [f"**Reference:** {_md_cell(r.reference)}", ""]
        out += [
            f"| Before (`{c.before_model}`) | After (`{c.after_model}`) |",
            "| --- | --- |",
            f"| {_md_cell(r.before)} | {_md_cell(r.after)} |",
            f"| *{_fmt_scores(r.before_scores)}* | *{_fmt_scores(r.after_scores)}* |",
            "",
        ]
    out += ["## Summary", ""] + _summary_lines(c.summary) + [""]
    if _metric_rows(c.summary):
        out += ["| | Before | After |", "| --- | --- | --- |"]
        out += [f"| {name} | {b} | {a} |" for name, b, a in _metric_rows(c.summary)] + [""]
    if c.verdict:
        out += ["## Verdict", "", c.verdict.summary, ""]
        for check in c.verdict.checks:
            mark = "✓" if check.ok else ("⚠" if check.severity == "warning" else "✗")
            out.append(f"- {mark} **{check.name}**: {check.detail}")
        out.append("")
    return "\n".join(out)


# ---- Terminal -------------------------------------------------------------------


def char_width(c: str) -> int:
    """Terminal columns a character takes: 2 for wide/full-width (CJK), 0 for
    combining marks and controls, else 1."""
    if unicodedata.combining(c) or unicodedata.category(c) in ("Cc", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1


def text_width(text: str) -> int:
    return sum(char_width(c) for c in text)


def wrap(text: str, width: int) -> list[str]:
    """Wrap to `width` terminal columns: break at spaces, between CJK characters
    (which need no space to break), and inside words longer than a line."""
    lines: list[str] = []
    for para in text.expandtabs(4).splitlines() or [""]:
        line, line_w = "", 0
        for chunk in _chunks(para):
            if chunk.isspace():
                if line:  # spaces only between words, never at a line's start
                    line, line_w = line + " ", line_w + 1
                continue
            w = text_width(chunk)
            if line_w + w > width and line.strip():
                lines.append(line.rstrip())
                line, line_w = "", 0
            for c in chunk:  # a word wider than the line is cut where it overflows
                cw = char_width(c)
                if line_w + cw > width and line:
                    lines.append(line.rstrip())
                    line, line_w = "", 0
                line, line_w = line + c, line_w + cw
        lines.append(line.rstrip())
    return lines


def _chunks(text: str) -> list[str]:
    """Runs of spaces, runs of narrow non-space characters, and single wide characters."""
    chunks: list[str] = []
    for c in text:
        kind = "space" if c.isspace() else ("wide" if char_width(c) == 2 else "word")
        if chunks and kind != "wide" and _kind(chunks[-1]) == kind:
            chunks[-1] += c
        else:
            chunks.append(c)
    return chunks


def _kind(chunk: str) -> str:
    return "space" if chunk.isspace() else ("wide" if char_width(chunk[0]) == 2 else "word")


def _pad(text: str, width: int) -> str:
    return text + " " * max(0, width - text_width(text))


def format_terminal(comparison: Comparison, width: int = 100) -> str:
    """Both answers in two columns under each question, then the summary and verdict."""
    c = comparison
    sep = " │ "
    col = max(10, (width - len(sep)) // 2)
    rule = "─" * (2 * col + len(sep))
    out: list[str] = []

    def columns(left: str, right: str) -> None:
        lw, rw = wrap(left, col), wrap(right, col)
        for i in range(max(len(lw), len(rw))):
            line = _pad(lw[i] if i < len(lw) else "", col) + sep + (rw[i] if i < len(rw) else "")
            out.append(line.rstrip())

    for n, r in enumerate(c.rows, start=1):
        out.append(rule)
        out += wrap(f"{n}/{len(c.rows)}. {r.question}", 2 * col + len(sep))
        if r.reference is not None:
            out += wrap(f"reference: {r.reference}", 2 * col + len(sep))
        columns(f"BEFORE ({c.before_model})", f"AFTER ({c.after_model})")
        columns(r.before or "(empty answer)", r.after or "(empty answer)")
        columns(_fmt_scores(r.before_scores), _fmt_scores(r.after_scores))
    out.append(rule)
    full = 2 * col + len(sep)
    for line in _summary_lines(c.summary):
        out += wrap(line, full)
    if _metric_rows(c.summary):
        for name, b, a in _metric_rows(c.summary):
            out.append(f"  {name:<16} {b:>9}  →  {a}")
    if c.verdict:
        out.append("")
        out += wrap(c.verdict.summary, full)
        for check in c.verdict.checks:
            mark = "✓" if check.ok else ("!" if check.severity == "warning" else "✗")
            # Hanging indent: continuation lines start under the check's name.
            body = wrap(f"{check.name}: {check.detail}", full - 4)
            out += [f"  {mark} {body[0]}"] + [f"    {line}" for line in body[1:]]
    return "\n".join(out) + "\n"

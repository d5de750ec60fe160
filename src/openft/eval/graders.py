"""OpenAI's graders, self-hosted: parse a grader object, then grade one sample.

`parse_grader(obj)` turns the JSON a client sends (`client.fine_tuning.alpha.
graders.run(grader=...)`, an eval's `testing_criteria`) into one of the typed
specs below, or raises `GraderError` naming the field at fault. `grade(spec,
item, sample, ctx)` computes the reward; what went wrong becomes the error flags
of OpenAI's `RunGraderResponse` (`GradeResult.errors`), never an exception, so
one bad sample cannot stop an eval run.

Model graders (`score_model`, `label_model`) ask a judge: any model openft serves,
reached through `GradeContext.judge` (the server's engine, or the worker's).
"""

from __future__ import annotations

import ast
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from openft.eval.formula import Formula, FormulaError, parse_formula
from openft.eval.render import TemplateVariableError, check_template, render
from openft.eval.sandbox import MAX_SOURCE_BYTES, SandboxLimits, run_python_grader
from openft.eval.scores import Embedder
from openft.eval.similarity import METRICS, similarity

STRING_OPERATIONS = ("eq", "ne", "like", "ilike")
ERROR_FLAGS = (
    "formula_parse_error",
    "sample_parse_error",
    "truncated_observation_error",
    "unresponsive_reward_error",
    "invalid_variable_error",
    "other_error",
    "python_grader_server_error",
    "python_grader_runtime_error",
    "model_grader_server_error",
    "model_grader_refusal_error",
    "model_grader_parse_error",
)


class GraderError(ValueError):
    """A grader object that cannot be used; `param` is the path of the bad field."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


@dataclass(frozen=True)
class StringCheck:
    name: str
    input: str
    reference: str
    operation: str
    pass_threshold: float | None = None


@dataclass(frozen=True)
class TextSimilarity:
    name: str
    input: str
    reference: str
    metric: str
    pass_threshold: float | None = None


@dataclass(frozen=True)
class PythonGrader:
    name: str
    source: str
    pass_threshold: float | None = None


@dataclass(frozen=True)
class ScoreModel:
    name: str
    model: str
    messages: tuple[tuple[str, str], ...]  # (role, content template)
    sampling: dict
    range: tuple[float, float] = (0.0, 1.0)
    pass_threshold: float | None = None


@dataclass(frozen=True)
class LabelModel:
    name: str
    model: str
    messages: tuple[tuple[str, str], ...]
    labels: tuple[str, ...]
    passing_labels: tuple[str, ...]
    sampling: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Multi:
    name: str
    graders: dict  # variable name -> spec
    formula: Formula
    pass_threshold: float | None = None


Grader = StringCheck | TextSimilarity | PythonGrader | ScoreModel | LabelModel | Multi


@dataclass
class JudgeReply:
    text: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class JudgeError(RuntimeError):
    """The judge model could not answer (not found, overloaded, failed)."""


Judge = Callable[[str, list[dict], dict], JudgeReply]  # (model, messages, sampling) -> reply


@dataclass
class GradeContext:
    judge: Judge | None = None
    embedder: Embedder | None = None
    limits: SandboxLimits = field(default_factory=SandboxLimits.from_env)


@dataclass
class GradeResult:
    name: str
    type: str
    reward: float = 0.0
    errors: dict = field(default_factory=dict)  # flag -> True, plus *_details strings
    message: str | None = None  # what went wrong, in one sentence
    sub_rewards: dict = field(default_factory=dict)
    label: str | None = None  # label_model: the label the judge chose
    usage: dict = field(default_factory=dict)  # judge model -> token counts
    sampled_model_name: str | None = None
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return any(self.errors.get(f) for f in ERROR_FLAGS)

    def fail(self, flag: str, message: str, details_key: str | None = None) -> GradeResult:
        self.errors[flag] = True
        if details_key:
            self.errors[details_key] = message
        self.message = message
        self.reward = 0.0
        return self


# --------------------------------------------------------------------------- parsing


def _text(obj: dict, key: str, param: str, *, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise GraderError(f"{param}.{key}", "must be a string" if key in obj else "is required")
    return value


def _template(obj: dict, key: str, param: str, namespaces=("item", "sample")) -> str:
    value = _text(obj, key, param)
    try:
        check_template(value, namespaces)
    except TemplateVariableError as e:
        raise GraderError(f"{param}.{key}", str(e)) from None
    return value


def _threshold(obj: dict, param: str) -> float | None:
    value = obj.get("pass_threshold")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise GraderError(f"{param}.pass_threshold", "must be a number")
    return float(value)


def _content_text(content, param: str) -> str:
    """An EvalItem's content as one string: plain text, an input_text/output_text
    part, or a list of them (images and audio are refused: no served model sees them)."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    texts = []
    for i, part in enumerate(parts):
        where = f"{param}[{i}]" if isinstance(content, list) else param
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise GraderError(where, f"content of type {kind!r} is not supported: openft's judges read text only")
        if not isinstance(part.get("text"), str):
            raise GraderError(f"{where}.text", "must be a string")
        texts.append(part["text"])
    return "".join(texts)


def parse_messages(value, param: str, namespaces=("item", "sample")) -> tuple[tuple[str, str], ...]:
    """EvalItem messages ({role, content}) as (role, content template) pairs."""
    if not isinstance(value, list) or not value:
        raise GraderError(param, "must be a non-empty list of messages")
    out = []
    for i, msg in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(msg, dict):
            raise GraderError(where, "must be a message object with role and content")
        role = msg.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise GraderError(f"{where}.role", "must be one of user, assistant, system, developer")
        text = _content_text(msg.get("content"), f"{where}.content")
        try:
            check_template(text, namespaces)
        except TemplateVariableError as e:
            raise GraderError(f"{where}.content", str(e)) from None
        out.append(("system" if role == "developer" else role, text))
    return tuple(out)


def _sampling(obj: dict, param: str) -> dict:
    value = obj.get("sampling_params") or {}
    if not isinstance(value, dict):
        raise GraderError(f"{param}.sampling_params", "must be an object")
    for key in ("temperature", "top_p"):
        v = value.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or v < 0):
            raise GraderError(f"{param}.sampling_params.{key}", "must be a number >= 0")
    return {k: v for k, v in value.items() if v is not None}


def _python(obj: dict, param: str) -> PythonGrader:
    source = _text(obj, "source", param)
    if len(source.encode()) > MAX_SOURCE_BYTES:
        raise GraderError(f"{param}.source", f"is over {MAX_SOURCE_BYTES // 1024} KB")
    try:
        tree = ast.parse(source, filename="grader.py")
    except SyntaxError as e:
        raise GraderError(f"{param}.source", f"line {e.lineno}: {e.msg}") from None
    grade_fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "grade"), None)
    if grade_fn is None:
        raise GraderError(f"{param}.source", "defines no top-level function grade(sample, item)")
    if len(grade_fn.args.args) + len(grade_fn.args.posonlyargs) < 2 and grade_fn.args.vararg is None:
        raise GraderError(f"{param}.source", "grade() must take two arguments: grade(sample, item)")
    return PythonGrader(_name(obj, param), source, _threshold(obj, param))


def _name(obj: dict, param: str) -> str:
    return _text(obj, "name", param, required=False) or obj.get("type", "grader")


def _model_grader(obj: dict, param: str, kind: str) -> ScoreModel | LabelModel:
    model = _text(obj, "model", param)
    messages = parse_messages(obj.get("input"), f"{param}.input")
    sampling = _sampling(obj, param)
    if kind == "score_model":
        rng = obj.get("range", [0, 1])
        if (
            not isinstance(rng, list)
            or len(rng) != 2
            or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in rng)
            or rng[0] >= rng[1]
        ):
            raise GraderError(f"{param}.range", "must be two numbers [low, high] with low < high")
        return ScoreModel(
            _name(obj, param), model, messages, sampling, (float(rng[0]), float(rng[1])), _threshold(obj, param)
        )
    labels, passing = obj.get("labels"), obj.get("passing_labels")
    for key, value in (("labels", labels), ("passing_labels", passing)):
        if not isinstance(value, list) or not value or not all(isinstance(x, str) and x.strip() for x in value):
            raise GraderError(f"{param}.{key}", "must be a non-empty list of non-empty strings")
    outside = [x for x in passing if x not in labels]
    if outside:
        raise GraderError(f"{param}.passing_labels", f"{', '.join(outside)} not in labels")
    return LabelModel(_name(obj, param), model, messages, tuple(labels), tuple(passing), sampling)


def _multi(obj: dict, param: str) -> Multi:
    subs = obj.get("graders")
    # OpenAI's guide sends a mapping name -> grader; the SDK's type, one grader; a list is taken too.
    if isinstance(subs, dict) and "type" in subs and not isinstance(subs.get("type"), dict):
        subs = [subs]
    if isinstance(subs, list):
        named = {}
        for i, sub in enumerate(subs):
            key = sub.get("name") if isinstance(sub, dict) else None
            named[key if isinstance(key, str) and key.isidentifier() else f"grader_{i}"] = sub
        subs = named
    if not isinstance(subs, dict) or not subs:
        raise GraderError(f"{param}.graders", "must map names to graders")
    graders = {}
    for key, sub in subs.items():
        if not str(key).isidentifier():
            raise GraderError(f"{param}.graders", f"{key!r} is not a name a formula can use (letters, digits, _)")
        if isinstance(sub, dict) and sub.get("type") == "multi":
            raise GraderError(f"{param}.graders.{key}", "a multi grader cannot contain another multi grader")
        graders[key] = parse_grader(sub, f"{param}.graders.{key}")
    formula_text = _text(obj, "calculate_output", param)
    try:
        formula = parse_formula(formula_text, set(graders))
    except FormulaError as e:
        raise GraderError(f"{param}.calculate_output", str(e)) from None
    return Multi(_name(obj, param), graders, formula, _threshold(obj, param))


def parse_grader(obj, param: str = "grader") -> Grader:
    """The typed grader, or GraderError naming the field (`grader.graders.a.operation`)."""
    if not isinstance(obj, dict):
        raise GraderError(param, "must be a grader object")
    kind = obj.get("type")
    if kind == "string_check":
        op = obj.get("operation")
        if op not in STRING_OPERATIONS:
            raise GraderError(f"{param}.operation", f"must be one of {', '.join(STRING_OPERATIONS)}")
        return StringCheck(
            _name(obj, param),
            _template(obj, "input", param),
            _template(obj, "reference", param),
            op,
            _threshold(obj, param),
        )
    if kind == "text_similarity":
        metric = obj.get("evaluation_metric")
        if metric not in METRICS:
            raise GraderError(f"{param}.evaluation_metric", f"must be one of {', '.join(METRICS)}")
        return TextSimilarity(
            _name(obj, param),
            _template(obj, "input", param),
            _template(obj, "reference", param),
            metric,
            _threshold(obj, param),
        )
    if kind == "python":
        return _python(obj, param)
    if kind in ("score_model", "label_model"):
        return _model_grader(obj, param, kind)
    if kind == "multi":
        return _multi(obj, param)
    raise GraderError(
        f"{param}.type", "must be one of string_check, text_similarity, python, score_model, label_model, multi"
    )


def grader_type(spec: Grader) -> str:
    return {
        StringCheck: "string_check",
        TextSimilarity: "text_similarity",
        PythonGrader: "python",
        ScoreModel: "score_model",
        LabelModel: "label_model",
        Multi: "multi",
    }[type(spec)]


# --------------------------------------------------------------------------- grading


def _like(text: str, pattern: str, fold: bool) -> bool:
    """SQL LIKE as OpenAI's string_check reads it: `%` any run, `_` one character;
    a pattern without wildcards matches as a substring."""
    if fold:
        text, pattern = text.casefold(), pattern.casefold()
    if "%" not in pattern and "_" not in pattern:
        return pattern in text
    regex = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, text, flags=re.DOTALL) is not None


def string_check(operation: str, text: str, reference: str) -> bool:
    if operation == "eq":
        return text == reference
    if operation == "ne":
        return text != reference
    return _like(text, reference, fold=operation == "ilike")


def _judge_messages(messages, item: dict, sample: dict, instruction: str) -> list[dict]:
    rendered = [{"role": role, "content": render(text, item, sample)} for role, text in messages]
    # Small local judges have no structured-output mode: say the reply's form in the
    # last user turn (a second user turn in a row breaks some chat templates).
    if rendered[-1]["role"] == "user":
        rendered[-1]["content"] += "\n\n" + instruction
    else:
        rendered.append({"role": "user", "content": instruction})
    return rendered


_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def parse_score(text: str) -> float | None:
    """The judge's score: JSON {"result": x} or a bare number, else the first number in the text."""
    try:
        data = json.loads(text)
        value = data.get("result") if isinstance(data, dict) else data
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    except ValueError:
        pass
    m = _NUMBER.search(text)
    return float(m.group(0)) if m else None


def parse_label(text: str, labels: tuple[str, ...]) -> str | None:
    """The label the judge chose: the whole reply (case and punctuation aside), JSON
    {"result": label}, else the label mentioned first as a whole word."""
    try:
        data = json.loads(text)
        if isinstance(data, dict) and isinstance(data.get("result"), str):
            text = data["result"]
    except ValueError:
        pass
    clean = text.strip().strip(".!\"'`*").strip().casefold()
    for label in labels:
        if clean == label.casefold():
            return label
    hits = []
    for label in labels:
        m = re.search(r"(?<!\w)" + re.escape(label.casefold()) + r"(?!\w)", text.casefold())
        if m:
            hits.append((m.start(), -len(label), label))
    return min(hits)[2] if hits else None


def _ask(spec, ctx: GradeContext, messages: list[dict], result: GradeResult) -> JudgeReply | None:
    if ctx.judge is None:
        result.fail(
            "model_grader_server_error", "no judge model is available here", "model_grader_server_error_details"
        )
        return None
    sampling = {"temperature": 0.0, "max_completions_tokens": 128} | spec.sampling
    try:
        reply = ctx.judge(spec.model, messages, sampling)
    except JudgeError as e:
        result.fail("model_grader_server_error", str(e), "model_grader_server_error_details")
        return None
    result.sampled_model_name = reply.model
    total = reply.prompt_tokens + reply.completion_tokens
    result.usage[reply.model] = {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": total,
        "cached_tokens": 0,
    }
    return reply


def _grade_score_model(spec: ScoreModel, item, sample, ctx, result: GradeResult) -> None:
    lo, hi = spec.range
    messages = _judge_messages(
        spec.messages, item, sample, f"Reply with only the score: one number from {lo:g} to {hi:g}."
    )
    reply = _ask(spec, ctx, messages, result)
    if reply is None:
        return
    score = parse_score(reply.text)
    if score is None:
        result.fail("model_grader_parse_error", f"the judge's reply holds no score: {reply.text[:200]!r}")
    elif not lo <= score <= hi:
        result.fail("model_grader_parse_error", f"the judge's score {score:g} is outside the range [{lo:g}, {hi:g}]")
    else:
        result.reward = score


def _grade_label_model(spec: LabelModel, item, sample, ctx, result: GradeResult) -> None:
    instruction = "Reply with only one of these labels: " + ", ".join(spec.labels) + "."
    reply = _ask(spec, ctx, _judge_messages(spec.messages, item, sample, instruction), result)
    if reply is None:
        return
    label = parse_label(reply.text, spec.labels)
    if label is None:
        result.fail("model_grader_parse_error", f"the judge's reply names none of the labels: {reply.text[:200]!r}")
        return
    result.label = label
    result.reward = 1.0 if label in spec.passing_labels else 0.0


def _grade_multi(spec: Multi, item, sample, ctx, result: GradeResult) -> None:
    for key, sub in spec.graders.items():
        r = grade(sub, item, sample, ctx)
        result.sub_rewards[key] = r.reward
        for model, usage in r.usage.items():
            result.usage[model] = usage
        if r.failed:
            result.errors.update(r.errors)
            result.message = f"grader {key}: {r.message}"
            result.reward = 0.0
            return
    try:
        result.reward = spec.formula(result.sub_rewards)
    except FormulaError as e:
        result.fail("other_error", str(e))


def _grade_one(spec: Grader, item: dict, sample: dict, ctx: GradeContext, result: GradeResult) -> None:
    if isinstance(spec, StringCheck):
        hit = string_check(spec.operation, render(spec.input, item, sample), render(spec.reference, item, sample))
        result.reward = 1.0 if hit else 0.0
    elif isinstance(spec, TextSimilarity):
        text, reference = render(spec.input, item, sample), render(spec.reference, item, sample)
        result.reward = similarity(spec.metric, text, reference, ctx.embedder)
    elif isinstance(spec, PythonGrader):
        run = run_python_grader(spec.source, sample, item, ctx.limits)
        if run.ok:
            result.reward = run.reward
        else:
            result.fail("python_grader_runtime_error", run.details or run.error, "python_grader_runtime_error_details")
            if run.error in ("timeout", "cpu"):
                result.errors["unresponsive_reward_error"] = True
    elif isinstance(spec, ScoreModel):
        _grade_score_model(spec, item, sample, ctx, result)
    elif isinstance(spec, LabelModel):
        _grade_label_model(spec, item, sample, ctx, result)
    else:
        _grade_multi(spec, item, sample, ctx, result)


def grade(spec: Grader, item: dict, sample: dict, ctx: GradeContext | None = None) -> GradeResult:
    """Grade one sample (`render.sample_namespace`) of one item; errors are flags in the result."""
    ctx = ctx or GradeContext()
    result = GradeResult(spec.name, grader_type(spec))
    start = time.monotonic()
    try:
        _grade_one(spec, item or {}, sample, ctx, result)
    except TemplateVariableError as e:
        result.fail("invalid_variable_error", str(e))
    result.seconds = time.monotonic() - start
    return result


def passed(spec: Grader, result: GradeResult) -> bool:
    """Whether a result passes: at or above the grader's pass_threshold (label_model:
    a passing label; no threshold: a reward of 1, string_check's pass)."""
    if result.failed:
        return False
    if isinstance(spec, LabelModel):
        return result.label in spec.passing_labels
    threshold = spec.pass_threshold if spec.pass_threshold is not None else 1.0
    return result.reward >= threshold

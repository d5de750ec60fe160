"""/v1/fine_tuning/alpha/graders: run and validate OpenAI's graders
(`client.fine_tuning.alpha.graders.run(...)` / `.validate(...)`).

The grading itself is `openft.eval.graders`; this router parses the request,
grades in a worker thread (a python grader is a subprocess, a model grader a
generation), and shapes the answer as OpenAI's `RunGraderResponse`. The judge of
`score_model` and `label_model` is any model the caller may chat with, run by
this server's engine.
"""

from __future__ import annotations

from typing import Any

import anyio.from_thread
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from openft.eval.graders import (
    ERROR_FLAGS,
    GradeContext,
    GraderError,
    GradeResult,
    JudgeError,
    JudgeReply,
    LabelModel,
    Multi,
    ScoreModel,
    grade,
    parse_grader,
)
from openft.eval.render import sample_namespace
from openft.eval.scores import Embedder
from openft.models.reasoning import split_reasoning
from openft.serve import schemas as S
from openft.serve.auth import owner
from openft.serve.engine_types import EngineError, SamplingParams
from openft.serve.errors import APIError
from openft.serve.models import handle_for
from openft.serve.schemas import ok

router = APIRouter(prefix="/v1/fine_tuning/alpha/graders", tags=["graders"])
_EMBEDDER = Embedder()  # one all-MiniLM-L6-v2 per server, loaded by the first cosine grader


class RunGraderRequest(BaseModel):
    grader: dict[str, Any]
    model_sample: str
    item: dict[str, Any] | None = None


class ValidateGraderRequest(BaseModel):
    grader: dict[str, Any]


def checked(grader: dict) -> Any:
    """The typed grader, or a 400 naming the field at fault."""
    try:
        return parse_grader(grader)
    except GraderError as e:
        raise APIError(400, e.message, param=e.param, code="invalid_grader") from None


def sampling_params(sampling: dict, default_max_tokens: int | None = None) -> SamplingParams:
    """OpenAI's sampling_params (of a judge or an eval run) for the engine; greedy by default."""
    return SamplingParams(
        max_tokens=sampling.get("max_completions_tokens")
        or sampling.get("max_completion_tokens")
        or default_max_tokens,
        temperature=float(sampling.get("temperature", 0.0)),
        top_p=float(sampling.get("top_p", 1.0)) or 1.0,
        seed=sampling.get("seed"),
    )


def reply_of(model: str, text: str, prompt_tokens: int, completion_tokens: int) -> JudgeReply:
    _, answer = split_reasoning(text)  # a reasoning judge's verdict follows its <think> block
    return JudgeReply(answer.strip(), model, prompt_tokens, completion_tokens)


def engine_judge(request: Request, who: str):
    """A Judge over this server's engine; call it from a worker thread."""
    engine = request.app.state.engine

    def judge(model: str, messages: list[dict], sampling: dict) -> JudgeReply:
        try:
            handle = handle_for(request, who, model)
            ids = engine.apply_chat_template(handle, messages)
            choices, usage = anyio.from_thread.run(engine.complete, handle, ids, sampling_params(sampling))
        except APIError as e:
            raise JudgeError(f"judge model {model!r}: {e.message}") from None
        except EngineError as e:
            raise JudgeError(f"judge model {model!r} failed: {e}") from None
        return reply_of(model, choices[0][0], usage.prompt_tokens, usage.completion_tokens)

    return judge


def judges(spec) -> list[str]:
    if isinstance(spec, ScoreModel | LabelModel):
        return [spec.model]
    if isinstance(spec, Multi):
        return [m for sub in spec.graders.values() for m in judges(sub)]
    return []


def response(spec, result: GradeResult) -> dict:
    """OpenAI's RunGraderResponse; `metadata.error_message` (openft's) says what went wrong."""
    errors = {flag: bool(result.errors.get(flag)) for flag in ERROR_FLAGS}
    for key in (
        "python_grader_server_error_type",
        "python_grader_runtime_error_details",
        "model_grader_server_error_details",
    ):
        errors[key] = result.errors.get(key)
    total = sum(u["total_tokens"] for u in result.usage.values()) if result.usage else None
    scores = dict(result.sub_rewards)
    if result.label is not None:
        scores["label"] = result.label
    return {
        "reward": result.reward,
        "metadata": {
            "name": result.name,
            "type": result.type,
            "errors": errors,
            "execution_time": result.seconds,
            "scores": scores,
            "token_usage": total,
            "sampled_model_name": result.sampled_model_name,
            "error_message": result.message,
        },
        "sub_rewards": dict(result.sub_rewards),
        "model_grader_token_usage_per_model": dict(result.usage),
    }


@router.post("/run", responses=ok(S.RunGraderResponse))
async def run_grader(request: Request, body: RunGraderRequest, who: str = Depends(owner)):
    spec = checked(body.grader)
    for model in judges(spec):  # an unknown judge is the request's fault: 404 now, not a flag later
        await run_in_threadpool(handle_for, request, who, model)
    ctx = GradeContext(judge=engine_judge(request, who), embedder=_EMBEDDER)
    sample = sample_namespace(body.model_sample)
    result = await run_in_threadpool(grade, spec, body.item or {}, sample, ctx)
    return response(spec, result)


@router.post("/validate", responses=ok(S.ValidateGraderResponse))
async def validate_grader(request: Request, body: ValidateGraderRequest, who: str = Depends(owner)):
    spec = checked(body.grader)
    for model in judges(spec):
        await run_in_threadpool(handle_for, request, who, model)
    return {"grader": body.grader}

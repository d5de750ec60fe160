"""What a user looks at before and after training, as API resources (so the
console and any other client get the same answers):

  GET  /v1/files/{id}/stats      token statistics, length histogram, time estimate
  GET  /v1/files/{id}/preview    examples as the model sees them, trained runs marked
  POST /v1/fine_tuning/estimate  tokens, steps and time for a job body, before starting it
  POST /v1/comparisons           answer a question file with two models, side by side, scored
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from openft.data.load import load_dataset
from openft.data.split import split_examples
from openft.serve import schemas as S
from openft.serve.auth import owner
from openft.serve.engine import EngineError, ModelHandle, SamplingParams
from openft.serve.errors import APIError
from openft.serve.files import get_owned
from openft.serve.fine_tuning import CreateJob, build_spec
from openft.serve.models import handle_for
from openft.serve.schemas import ok
from openft.train.hparams import auto_max_seq_length, resolve_train
from openft.train.stats import token_stats
from openft.train.tokenize import encode_all, segments

router = APIRouter(tags=["insights"])


def _handle(request: Request, who: str, model: str, *, convert: bool) -> ModelHandle:
    """A model the caller may name (see `handle_for`), never a path or hub id. The GET
    routes pass convert=False: a GET converts and downloads nothing."""
    return handle_for(request, who, model, convert=convert)


def _n_params(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in Path(path).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                total += math.prod(st.get_slice(k).get_shape())
    return total


def _examples(request: Request, who: str, file_id: str, param: str = "file_id"):
    row = get_owned(request, file_id, who, param)
    result = load_dataset(row["path"])
    for ex in result.examples:  # name places by the uploaded file's name, never the storage path
        ex.where = dataclasses.replace(ex.where, file=row["filename"])
    if not result.examples:
        raise APIError(
            400, f"{file_id} has no usable examples ({row['status_details']})", param=param, code="invalid_file"
        )
    return row, result


def _stats(request: Request, who: str, file_id: str, model: str, n_epochs, method: str) -> dict:
    _, result = _examples(request, who, file_id)  # the caller's file first: no model loads for a 404
    handle = _handle(request, who, model, convert=False)
    tok = request.app.state.engine.tokenizer(handle)
    ctx = request.app.state.engine.context_length(handle)
    lengths = [len(e) for e in encode_all(tok, result.examples, ctx)]  # for the histogram
    stats, warnings = token_stats(
        tok,
        result.examples,
        max_seq_length=None,
        context=ctx,
        n_params=_n_params(handle.weights_path),
        epochs=None if n_epochs == "auto" else int(n_epochs),
        method=method,
    )
    top = max(lengths)
    width = max(1, math.ceil(top / 12))
    edges = list(range(0, width * 13, width))
    counts = [0] * 12
    for n in lengths:
        counts[min(11, n // width)] += 1
    return {
        "object": "file.stats",
        "file_id": file_id,
        "model": model,
        **stats.to_dict(),
        "histogram": {"edges": edges, "counts": counts},
        "warnings": [w.to_dict() for w in warnings],
    }


@router.get("/v1/files/{file_id}/stats", responses=ok(S.FileStats))
def file_stats(
    request: Request,
    file_id: str,
    model: str = "smollm2-135m-instruct",
    n_epochs: str = "auto",
    method: str = Query("lora", pattern="^(lora|full)$"),
    who: str = Depends(owner),
):
    if n_epochs != "auto" and not n_epochs.isdigit():
        raise APIError(400, "n_epochs must be a positive integer or 'auto'", param="n_epochs", code="invalid_value")
    return _stats(request, who, file_id, model, n_epochs, method)


@router.get("/v1/files/{file_id}/preview", responses=ok(S.FilePreview))
def file_preview(
    request: Request,
    file_id: str,
    model: str = "smollm2-135m-instruct",
    n: int = Query(3, ge=1, le=50),
    train_on_prompt: bool = False,
    who: str = Depends(owner),
):
    _, result = _examples(request, who, file_id)
    tok = request.app.state.engine.tokenizer(_handle(request, who, model, convert=False))
    out = []
    for ex in result.examples[:n]:
        enc, runs = segments(tok, ex, train_on_prompt)
        out.append(
            {
                "where": str(ex.where),
                "tokens": len(enc),
                "trained_tokens": enc.n_trained,
                "segments": [{"text": text, "trained": t} for t, text in runs],
            }
        )
    template = getattr(tok, "openft_template", None)  # set by models.templates.apply_template
    shown = {"name": template.name, "source": template.source, "description": template.describe()} if template else None
    return {"object": "file.preview", "file_id": file_id, "model": model, "chat_template": shown, "examples": out}


@router.post("/v1/fine_tuning/estimate", responses=ok(S.Estimate))
def estimate(request: Request, body: CreateJob, who: str = Depends(owner)):
    spec, _ = build_spec(body, body.model)
    _, result = _examples(request, who, body.training_file, "training_file")
    for param in ("validation_file", "questions_file"):  # named, so they must exist (and be the caller's)
        if getattr(body, param) is not None:
            get_owned(request, getattr(body, param), who, param)
    handle = _handle(request, who, body.model, convert=True)  # a POST: may convert a GGUF base once
    tok = request.app.state.engine.tokenizer(handle)
    train = (
        result.examples
        if body.validation_file
        else split_examples(result.examples, spec.data.validation_split, spec.train.seed)[0]
    )
    ctx = request.app.state.engine.context_length(handle)
    lengths = [len(e) for e in encode_all(tok, train, ctx)]
    max_len = (
        int(spec.train.max_seq_length) if spec.train.max_seq_length != "auto" else auto_max_seq_length(lengths, ctx)
    )
    cfg = resolve_train(spec.train, len(train), max_len)
    stats, _ = token_stats(
        tok,
        train,
        max_seq_length=max_len,
        n_params=_n_params(handle.weights_path),
        epochs=cfg.epochs,
        method=cfg.method,
    )
    steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    return {
        "object": "fine_tuning.estimate",
        "examples": len(train),
        "epochs": cfg.epochs,
        "steps": steps,
        "batch_size": cfg.batch_size,
        "learning_rate": cfg.learning_rate,
        "max_seq_length": max_len,
        "total_tokens": stats.total_tokens * cfg.epochs,
        "supervised_tokens": stats.supervised_tokens * cfg.epochs,
        "estimated_seconds": stats.estimated_seconds,
        "method": cfg.method,
    }


class CompareBody(BaseModel):
    before_model: str
    after_model: str
    questions_file: str
    max_tokens: int = 64


@router.post("/v1/comparisons", responses=ok(S.Comparison))
async def compare(request: Request, body: CompareBody, who: str = Depends(owner)):
    from openft.eval.compare import build_comparison, to_json
    from openft.eval.questions import QuestionFileError, load_questions
    from openft.eval.verdict import TrainingSignals, judge
    from openft.serve.errors import engine_error

    engine = request.app.state.engine

    def prepare():
        """Off the event loop (a worker thread): reading the question file, resolving
        the models (a built-in may be converted from GGUF, ~30 s) and loading their
        tokenizers must not stall every stream in flight."""
        row = get_owned(request, body.questions_file, who, "questions_file")
        try:
            questions = load_questions(row["path"])
        except QuestionFileError as e:  # named by the uploaded file's name, not the storage path's
            message = str(e).replace(Path(row["path"]).name, row["filename"])
            raise APIError(400, message, param="questions_file", code="invalid_questions_file") from None
        handles, prompts = [], []
        for param in fields:
            try:
                handles.append(handle_for(request, who, getattr(body, param)))
            except APIError as e:
                e.param = param
                raise
            try:
                prompts.append(
                    [
                        engine.apply_chat_template(handles[-1], [{"role": "user", "content": q.question}], q.tools)
                        for q in questions
                    ]
                )
            except EngineError as e:
                raise named(e, param) from None
        return questions, handles, prompts

    def named(e: EngineError, param: str) -> APIError:
        err = engine_error(e, "questions_file")
        err.param = param if err.param == "model" else err.param
        return err

    fields = ("before_model", "after_model")
    questions, handles, prompts = await run_in_threadpool(prepare)
    params = SamplingParams(max_tokens=body.max_tokens, temperature=0.0)

    async def answer(handle, ids):
        choices, _ = await engine.complete(handle, ids, params)
        return choices[0][0].strip()

    answers = []
    for param, handle, ids_list in zip(fields, handles, prompts):
        try:
            answers.append(await asyncio.gather(*(answer(handle, ids) for ids in ids_list)))
        except EngineError as e:
            raise named(e, param) from None
    before, after = answers
    if getattr(request.app.state, "embedder", None) is None:
        from openft.eval.scores import Embedder

        request.app.state.embedder = Embedder()
    comparison = await run_in_threadpool(
        build_comparison,
        questions,
        before,
        after,
        before_model=body.before_model,
        after_model=body.after_model,
        embedder=request.app.state.embedder,
    )
    comparison.verdict = judge(TrainingSignals(None, None, None, None, None, None, 0, 0), comparison.summary)
    return {"object": "comparison", **to_json(comparison)}

"""/v1/evals: OpenAI's Evals API (`client.evals`, `client.evals.runs`,
`client.evals.runs.output_items`), self-hosted.

An eval is a `custom` item schema plus testing criteria (graders, checked when the
eval is created). A run names a data source: `completions` samples a model openft
serves with an `input_messages` template over items from `file_content` or a
`file_id`; `jsonl` grades samples the items carry. Runs are queued in the store
and executed by a worker (openft.jobs.evalworker); their counts are live while
they run. Everything is refused early (400 naming the field) rather than failing
in the worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from openft.eval.evals import (
    check_data_source_config,
    check_items,
    parse_criteria,
    parse_run_source,
    rows_from_jsonl,
)
from openft.eval.graders import GraderError
from openft.eval.runs import summarise
from openft.serve import schemas as S
from openft.serve.auth import owner
from openft.serve.errors import APIError, not_found
from openft.serve.graders import judges
from openft.serve.models import handle_for
from openft.serve.schemas import ok

router = APIRouter(prefix="/v1/evals", tags=["evals"])
Order = Literal["asc", "desc"]


class CreateEval(BaseModel):
    data_source_config: dict[str, Any]
    testing_criteria: list[dict[str, Any]]
    name: str | None = None
    metadata: dict[str, str] | None = None


class UpdateEval(BaseModel):
    name: str | None = None
    metadata: dict[str, str] | None = None


class CreateRun(BaseModel):
    data_source: dict[str, Any]
    name: str | None = None
    metadata: dict[str, str] | None = None


def _bad(e: GraderError) -> APIError:
    return APIError(400, e.message, param=e.param, code="invalid_value")


def eval_object(row: dict) -> dict:
    return {
        "object": "eval",
        "id": row["id"],
        "name": row["name"],
        "data_source_config": row["data_source_config"],
        "testing_criteria": row["testing_criteria"],
        "created_at": row["created_at"],
        "metadata": row["metadata"],
    }


def run_object(request: Request, store, row: dict, ev: dict | None) -> dict:
    summary = {k: row[k] for k in ("result_counts", "per_testing_criteria_results", "per_model_usage")}
    if row["status"] not in ("completed", "failed") and ev is not None:  # live counts while it runs
        try:
            summary = summarise(parse_criteria(ev["testing_criteria"]), store.all_output_items(row["id"]), row["model"])
        except GraderError:
            pass
    empty = {"total": 0, "errored": 0, "failed": 0, "passed": 0}
    return {
        "object": "eval.run",
        "id": row["id"],
        "eval_id": row["eval_id"],
        "status": row["status"],
        "model": row["model"] or "",
        "name": row["name"],
        "created_at": row["created_at"],
        "report_url": str(request.base_url) + f"v1/evals/{row['eval_id']}/runs/{row['id']}",
        "result_counts": summary["result_counts"] or empty,
        "per_model_usage": summary["per_model_usage"] or [],
        "per_testing_criteria_results": summary["per_testing_criteria_results"] or [],
        "data_source": row["data_source"],
        "metadata": row["metadata"],
        "error": row["error"],
    }


def item_object(row: dict) -> dict:
    return {
        "object": "eval.run.output_item",
        "id": row["id"],
        "run_id": row["run_id"],
        "eval_id": row["eval_id"],
        "created_at": row["created_at"],
        "status": row["status"],
        "datasource_item_id": row["datasource_item_id"],
        "datasource_item": row["datasource_item"],
        "results": row["results"],
        "sample": row["sample"],
    }


def page(data: list[dict], limit: int) -> dict:
    shown = data[:limit]
    return {
        "object": "list",
        "data": shown,
        "first_id": shown[0]["id"] if shown else None,
        "last_id": shown[-1]["id"] if shown else None,
        "has_more": len(data) > limit,
    }


def _eval(request: Request, who: str, eval_id: str) -> dict:
    row = request.app.state.store.get_eval(who, eval_id)
    if row is None:
        raise not_found("eval", eval_id, "eval_id")
    return row


def _run(request: Request, who: str, eval_id: str, run_id: str) -> dict:
    row = request.app.state.store.get_eval_run(who, eval_id, run_id)
    if row is None:
        raise not_found("eval run", run_id, "run_id")
    return row


# --------------------------------------------------------------------------- evals


@router.post("", responses=ok(S.EvalObject))
async def create_eval(request: Request, body: CreateEval, who: str = Depends(owner)):
    try:
        config = check_data_source_config(body.data_source_config)
        criteria = parse_criteria(body.testing_criteria)
    except GraderError as e:
        raise _bad(e) from None
    for spec in criteria:
        for model in judges(spec):  # a judge that is not served is refused now, not in every run
            await run_in_threadpool(handle_for, request, who, model)
    row = request.app.state.store.create_eval(
        {
            "owner": who,
            "name": body.name or "eval",
            "data_source_config": config,
            "testing_criteria": body.testing_criteria,
            "metadata": body.metadata,
        }
    )
    return eval_object(row)


@router.get("", responses=ok(S.EvalList))
def list_evals(
    request: Request,
    after: str | None = None,
    limit: int = Query(20, ge=1, le=100),
    order: Order = "asc",
    order_by: Literal["created_at", "updated_at"] = "created_at",
    who: str = Depends(owner),
):
    rows = request.app.state.store.list_evals(who, after, limit + 1, order)
    return page([eval_object(r) for r in rows], limit)


@router.get("/{eval_id}", responses=ok(S.EvalObject))
def get_eval(request: Request, eval_id: str, who: str = Depends(owner)):
    return eval_object(_eval(request, who, eval_id))


@router.post("/{eval_id}", responses=ok(S.EvalObject))
def update_eval(request: Request, eval_id: str, body: UpdateEval, who: str = Depends(owner)):
    _eval(request, who, eval_id)
    values = body.model_dump(exclude_unset=True)
    if values.get("name") is None:
        values.pop("name", None)  # a null name leaves the name as it is; a null metadata clears it
    return eval_object(request.app.state.store.update_eval(who, eval_id, **values))


@router.delete("/{eval_id}", responses=ok(S.EvalDeleted))
def delete_eval(request: Request, eval_id: str, who: str = Depends(owner)):
    if not request.app.state.store.delete_eval(who, eval_id):
        raise not_found("eval", eval_id, "eval_id")
    return {"object": "eval.deleted", "deleted": True, "eval_id": eval_id}


# --------------------------------------------------------------------------- runs


def _check_run(request: Request, who: str, ev: dict, body: CreateRun):
    """The run's source parsed, its items checked against the eval's schema now."""
    store = request.app.state.store
    try:
        source = parse_run_source(body.data_source)
        schema = ev["data_source_config"]["schema"]["properties"]["item"]
        if source.source["type"] == "file_id":
            f = store.get_file(who, source.source["id"])
            if f is None:
                raise not_found("file", source.source["id"], "data_source.source.id")
            rows = rows_from_jsonl(Path(f["path"]).read_text(encoding="utf-8"), "data_source.source.id")
            check_items(rows, schema, "data_source.source.id")
        else:
            check_items(source.source["content"], schema, "data_source.source.content")
    except GraderError as e:  # EvalSpecError included
        raise _bad(e) from None
    except UnicodeDecodeError:
        raise APIError(400, "the file is not UTF-8 text", param="data_source.source.id", code="invalid_value") from None
    if source.model:
        handle_for(request, who, source.model)
    return source


@router.post("/{eval_id}/runs", responses=ok(S.EvalRunObject))
async def create_run(request: Request, eval_id: str, body: CreateRun, who: str = Depends(owner)):
    ev = _eval(request, who, eval_id)
    source = await run_in_threadpool(_check_run, request, who, ev, body)
    store = request.app.state.store
    row = store.create_eval_run(
        {
            "eval_id": eval_id,
            "owner": who,
            "name": body.name or (f"{source.model} on {ev['name']}" if source.model else f"run of {ev['name']}"),
            "model": source.model,
            "data_source": body.data_source,
            "metadata": body.metadata,
        }
    )
    return run_object(request, store, row, ev)


@router.get("/{eval_id}/runs", responses=ok(S.EvalRunList))
def list_runs(
    request: Request,
    eval_id: str,
    after: str | None = None,
    limit: int = Query(20, ge=1, le=100),
    order: Order = "asc",
    status: Literal["queued", "in_progress", "completed", "canceled", "failed"] | None = None,
    who: str = Depends(owner),
):
    ev = _eval(request, who, eval_id)
    store = request.app.state.store
    rows = store.list_eval_runs(who, eval_id, after, limit + 1, order, status)
    return page([run_object(request, store, r, ev) for r in rows], limit)


@router.get("/{eval_id}/runs/{run_id}", responses=ok(S.EvalRunObject))
def get_run(request: Request, eval_id: str, run_id: str, who: str = Depends(owner)):
    ev = _eval(request, who, eval_id)
    return run_object(request, request.app.state.store, _run(request, who, eval_id, run_id), ev)


@router.post("/{eval_id}/runs/{run_id}", responses=ok(S.EvalRunObject))
@router.post("/{eval_id}/runs/{run_id}/cancel", responses=ok(S.EvalRunObject))  # the path the SDK calls
def cancel_run(request: Request, eval_id: str, run_id: str, who: str = Depends(owner)):
    """Cancel a queued or running run; the worker stops at its next chunk and keeps
    the items it graded. A finished run is left as it is (409)."""
    ev = _eval(request, who, eval_id)
    store = request.app.state.store
    row = _run(request, who, eval_id, run_id)
    if not store.update_eval_run(run_id, expect_status=("queued", "in_progress"), status="canceled"):
        row = _run(request, who, eval_id, run_id)
        if row["status"] != "canceled":
            raise APIError(409, f"the run is already {row['status']}", param="run_id", code="run_not_cancellable")
    return run_object(request, store, _run(request, who, eval_id, run_id), ev)


@router.delete("/{eval_id}/runs/{run_id}", responses=ok(S.EvalRunDeleted))
def delete_run(request: Request, eval_id: str, run_id: str, who: str = Depends(owner)):
    if not request.app.state.store.delete_eval_run(who, eval_id, run_id):
        raise not_found("eval run", run_id, "run_id")
    return {"object": "eval.run.deleted", "deleted": True, "run_id": run_id}


# --------------------------------------------------------------------------- output items


@router.get("/{eval_id}/runs/{run_id}/output_items", responses=ok(S.EvalOutputItemList))
def list_output_items(
    request: Request,
    eval_id: str,
    run_id: str,
    after: str | None = None,
    limit: int = Query(20, ge=1, le=100),
    order: Order = "asc",
    status: Literal["fail", "pass"] | None = None,
    who: str = Depends(owner),
):
    _run(request, who, eval_id, run_id)
    rows = request.app.state.store.list_output_items(run_id, after, limit + 1, order, status)
    return page([item_object(r) for r in rows], limit)


@router.get("/{eval_id}/runs/{run_id}/output_items/{output_item_id}", responses=ok(S.EvalOutputItem))
def get_output_item(request: Request, eval_id: str, run_id: str, output_item_id: str, who: str = Depends(owner)):
    _run(request, who, eval_id, run_id)
    row = request.app.state.store.get_output_item(run_id, output_item_id)
    if row is None:
        raise not_found("output item", output_item_id, "output_item_id")
    return item_object(row)

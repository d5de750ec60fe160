"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, pause, resume, events,
checkpoints, comparison. OpenAI's fields, plus openft's own as extra fields."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, BackgroundTasks, Depends, Header, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from openft.config import JobSpec
from openft.jobs.store import TERMINAL, new_id, now
from openft.models.registry import BUILTINS, ModelNotFound, resolve_name
from openft.serve import schemas as S
from openft.serve.auth import owner
from openft.serve.errors import APIError, not_found
from openft.serve.models import model_not_found, run_dir_of
from openft.serve.schemas import ok
from openft.train.hparams import auto_learning_rate

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])

Auto = Literal["auto"]


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: Auto | int = Field("auto", description="epochs, 1-50, or auto")
    batch_size: Auto | int = Field("auto", description="examples per step, 1-256, or auto")
    learning_rate_multiplier: Auto | float = Field("auto", description="scales openft's auto learning rate")


class Supervised(BaseModel):
    hyperparameters: Hyperparameters | None = None


class DpoHyperparameters(Hyperparameters):
    beta: Auto | float = Field(
        "auto", description="how far the model may move from the reference, (0, 2], or auto (0.1)"
    )


class Dpo(BaseModel):
    hyperparameters: DpoHyperparameters | None = None


class Method(BaseModel):
    """OpenAI's method: supervised (SFT) or dpo (preference pairs)."""

    type: Literal["supervised", "dpo"] = "supervised"
    supervised: Supervised | None = None
    dpo: Dpo | None = None


class Resources(BaseModel):
    """What a job's training runs on: `nproc_per_node` training processes (torchrun
    ranks) on the worker's machine, which must have `gpus` GPUs at least. Only a
    worker that can run that many ranks and has those GPUs claims the job. Strict:
    a count sent as "2" or true is a client bug, not something to guess at."""

    model_config = ConfigDict(extra="forbid")
    nproc_per_node: int = Field(1, ge=1, le=64, strict=True, description="training processes (ranks), 1-64")
    gpus: int = Field(0, ge=0, le=64, strict=True, description="GPUs the worker must have (0: any worker)")


DEFAULT_RESOURCES = {"nproc_per_node": 1}


class CreateJob(BaseModel):
    """OpenAI's create-job body; the fields after `metadata` are openft extensions
    (sent by the openai client with `extra_body`)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    integrations: list[dict] | None = None
    # --- openft extensions
    validation_split: float | None = Field(
        None, ge=0.0, lt=0.5, description="held-out fraction without a validation file"
    )
    learning_rate: float | None = Field(None, gt=0, lt=1)
    lora_rank: int | None = Field(None, ge=1, le=1024)
    lora_alpha: float | None = Field(None, gt=0)
    lora_dropout: float | None = Field(None, ge=0, lt=1)
    full_finetune: bool = False
    max_seq_length: int | None = Field(None, ge=16, le=131072)
    early_stopping_patience: int | None = Field(None, ge=0)
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    weight_decay: float | None = Field(None, ge=0)
    max_steps: int | None = Field(None, ge=1)
    train_on_prompt: bool = False
    questions_file: str | None = Field(None, description="a file of questions answered before and after training")
    eval_id: str | None = Field(None, description="an eval whose criteria score the questions at every checkpoint")
    select: Literal["last", "best"] | None = Field(
        None, description="the job's model: the last weights, or the best-scoring checkpoint"
    )
    resources: Resources | None = Field(None, description="ranks to train on; default: the worker's --nproc-per-node")


def _hyper(body: CreateJob) -> Hyperparameters:
    m = body.method
    if m and m.type == "dpo":
        return (m.dpo and m.dpo.hyperparameters) or DpoHyperparameters(
            **(body.hyperparameters or Hyperparameters()).model_dump()
        )
    if m and m.supervised and m.supervised.hyperparameters:
        return m.supervised.hyperparameters
    return body.hyperparameters or Hyperparameters()


def method_type(body: CreateJob) -> str:
    return body.method.type if body.method else "supervised"


STANDARD_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")


def _check_range(value: Any, lo: float, hi: float, param: str) -> None:
    if value != "auto" and not (lo <= value <= hi):
        raise APIError(400, f"{param} must be between {lo:g} and {hi:g} or 'auto'", param=param, code="invalid_value")


def build_spec(body: CreateJob, base_model: str) -> tuple[JobSpec, dict]:
    hp = _hyper(body)
    _check_range(hp.n_epochs, 1, 50, "hyperparameters.n_epochs")
    _check_range(hp.batch_size, 1, 256, "hyperparameters.batch_size")
    if hp.learning_rate_multiplier != "auto" and hp.learning_rate_multiplier <= 0:
        raise APIError(
            400,
            "learning_rate_multiplier must be > 0",
            param="hyperparameters.learning_rate_multiplier",
            code="invalid_value",
        )
    spec = JobSpec(model=base_model, suffix=body.suffix)
    spec.eval.select = body.select or "last"
    t = spec.train
    t.method = "full" if body.full_finetune else "lora"
    if method_type(body) == "dpo":
        t.objective = "dpo"
        beta = getattr(hp, "beta", "auto")
        if beta != "auto" and not 0 < beta <= 2:
            raise APIError(
                400, "beta must be in (0, 2] or 'auto'", param="method.dpo.hyperparameters.beta", code="invalid_value"
            )
        t.beta = beta
    t.epochs, t.batch_size = hp.n_epochs, hp.batch_size
    if body.learning_rate is not None:
        t.learning_rate = body.learning_rate
    elif hp.learning_rate_multiplier != "auto":
        t.learning_rate = auto_learning_rate(t.method, t.objective) * float(hp.learning_rate_multiplier)
    t.seed = body.seed if body.seed is not None else 0
    for field, target in (
        ("max_seq_length", "max_seq_length"),
        ("early_stopping_patience", "early_stopping_patience"),
        ("warmup_ratio", "warmup_ratio"),
        ("weight_decay", "weight_decay"),
        ("max_steps", "max_steps"),
    ):
        if getattr(body, field) is not None:
            setattr(t, target, getattr(body, field))
    if body.lora_rank is not None:
        spec.lora.rank = body.lora_rank
    if body.lora_alpha is not None:
        spec.lora.alpha = body.lora_alpha
    if body.lora_dropout is not None:
        spec.lora.dropout = body.lora_dropout
    if body.validation_split is not None:
        spec.data.validation_split = body.validation_split
    spec.data.train_on_prompt = body.train_on_prompt
    return spec, hp.model_dump()


def resolve_base(request: Request, who: str, model: str) -> str:
    """A base model for training, by name only: a built-in or registered model, or the
    caller's own fine-tuned model or LoRA checkpoint for a second round. Returns what the
    job spec holds: the name (the worker resolves it), or an own model's run folder or
    checkpoint folder (the worker merges it). A path or hub id is just an unknown name
    here: the same 404 whatever is on disk."""
    store = request.app.state.store
    own = store.get_model(who, model)
    if own is not None:
        return str(run_dir_of(Path(own["path"])))
    ckpt = store.checkpoint_by_model(who, model)
    if ckpt is not None and (Path(ckpt["path"]) / "adapter_config.json").exists():
        return ckpt["path"]  # a LoRA checkpoint: the worker merges it into its run's base
    if model in BUILTINS:  # a built-in whose packages are missing: say how to pull it (still a 404)
        try:
            resolve_name(model)
        except ModelNotFound as e:
            raise APIError(404, str(e), param="model", code="model_not_found") from None
        return model
    try:
        resolve_name(model)
    except ModelNotFound:
        raise model_not_found(model) from None
    return model


def job_object(row: dict) -> dict:
    hp = row["hyperparameters"]
    spec = row["spec"]
    out = {
        "object": "fine_tuning.job",
        "id": row["id"],
        "model": row["model"],
        "created_at": row["created_at"],
        "finished_at": row["finished_at"],
        "fine_tuned_model": row["fine_tuned_model"],
        "organization_id": row["owner"],
        "result_files": row["result_files"] or [],
        "status": row["status"],
        "validation_file": row["validation_file"],
        "training_file": row["training_file"],
        "hyperparameters": {k: hp[k] for k in STANDARD_HYPERPARAMETERS if k in hp},
        "trained_tokens": row["trained_tokens"],
        "error": row["error"],
        "integrations": [],
        "seed": row["seed"],
        "estimated_finish": row["estimated_finish"],
        "method": {"type": row["method"], row["method"]: {"hyperparameters": hp}},  # as sent, `auto` kept
        "metadata": row["metadata"],
        "suffix": row["suffix"],
        # openft extensions
        "user_provided_suffix": row["suffix"],
        "training_method": spec["train"]["method"],
        "validation_split": None if row["validation_file"] else spec["data"]["validation_split"],
        "lora": None if spec["train"]["method"] == "full" else spec["lora"],
        "questions_file": (row["extra"] or {}).get("questions_file"),
        "eval_id": (row["extra"] or {}).get("eval_id"),
        "resources": job_resources(row),
        # what was asked for (before `auto` is resolved), so a job can be cloned
        **{
            k: spec["train"][k]
            for k in (
                "learning_rate",
                "max_steps",
                "max_seq_length",
                "warmup_ratio",
                "weight_decay",
                "early_stopping_patience",
            )
        },
        "train_on_prompt": spec["data"]["train_on_prompt"],
        "has_comparison": row["comparison"] is not None,
    }
    return out


def job_resources(row: dict) -> dict:
    """What the job asked for, or, once a worker started it, what it runs on (the
    worker records its own default for a job that asked for nothing). A value that
    is no object (written by hand; the worker fails such a job) shows as the default,
    so the job can still be listed."""
    asked = (row["extra"] or {}).get("resources")
    return {**DEFAULT_RESOURCES, **asked} if isinstance(asked, dict) else dict(DEFAULT_RESOURCES)


def _extra(body: CreateJob) -> dict:
    extra: dict = {"questions_file": body.questions_file, "eval_id": body.eval_id}
    if body.resources is not None:  # only what was sent: an omitted count is the worker's to choose
        extra["resources"] = body.resources.model_dump(exclude_unset=True)
    return extra


def _check_eval(store, who: str, body: CreateJob) -> None:
    """An eval named by the job exists and its item schema takes the questions; and
    `select: best` has questions to select by and a LoRA checkpoint to serve."""
    if body.select == "best" and not body.questions_file:
        raise APIError(
            400,
            "select=best picks the best-scoring checkpoint: it needs a questions_file",
            param="select",
            code="invalid_value",
        )
    if body.select == "best" and body.full_finetune:
        raise APIError(
            400,
            "select=best serves a checkpoint's adapter: it needs LoRA, not full fine-tuning",
            param="select",
            code="invalid_value",
        )
    if not body.eval_id:
        return
    ev = store.get_eval(who, body.eval_id)
    if ev is None:
        raise not_found("eval", body.eval_id, "eval_id")
    if not body.questions_file:
        raise APIError(
            400,
            "eval_id scores the questions_file's questions at every checkpoint: give one",
            param="questions_file",
            code="invalid_value",
        )
    from openft.eval.evals import EvalSpecError, check_items
    from openft.eval.questions import QuestionFileError, load_questions

    try:
        questions = load_questions(store.get_file(who, body.questions_file)["path"])
        rows = [{"question": q.question, "reference": q.reference or ""} for q in questions]
        check_items(rows, ev["data_source_config"]["schema"]["properties"]["item"], "questions_file")
    except QuestionFileError as e:
        raise APIError(400, str(e), param="questions_file", code="invalid_value") from None
    except EvalSpecError as e:
        raise APIError(400, e.message, param=e.param, code="invalid_value") from None


def _questions_eval(store, row: dict) -> dict:
    """The job's question set as an eval of the Evals API, with criteria built from
    its references; each scored checkpoint becomes a run of it. A question set with
    no reference (or that does not parse: the worker reports that) gets none."""
    from openft.eval.checkpoints import ITEM_SCHEMA, criteria_from_references
    from openft.eval.evals import check_data_source_config
    from openft.eval.questions import QuestionFileError, load_questions

    extra = row["extra"] or {}
    f = store.get_file(row["owner"], extra["questions_file"])
    try:
        if not any(q.reference for q in load_questions(f["path"])):
            return row
    except QuestionFileError:
        return row
    ev = store.create_eval(
        {
            "owner": row["owner"],
            "name": f"questions of {row['id']} ({f['filename']})",
            "data_source_config": check_data_source_config({"type": "custom", "item_schema": ITEM_SCHEMA}),
            "testing_criteria": criteria_from_references(),
            "metadata": {"fine_tuning_job_id": row["id"]},
        }
    )
    store.update_job(row["id"], extra={**extra, "eval_id": ev["id"]})
    return store.get_job(row["owner"], row["id"])


def _check_pairs(f: dict, file_id: str, param: str) -> None:
    """A DPO job trains on preference pairs: refuse another layout before queueing."""
    from openft.data.preference import PREFERENCE_LAYOUTS

    layout = (f.get("validation") or {}).get("layout")
    if layout is not None and layout not in PREFERENCE_LAYOUTS:
        raise APIError(
            400,
            f"a dpo job trains on preference pairs, and {file_id} holds '{layout}' examples; give it pairs "
            f"({', '.join(PREFERENCE_LAYOUTS)}: OpenAI's input / preferred_output / non_preferred_output lines)",
            param=param,
            code="invalid_training_file" if param == "training_file" else "invalid_validation_file",
        )


def validate_files(app, job_id: str) -> None:
    """validating_files -> queued, or -> failed naming the bad line."""
    store = app.state.store
    job = store.get_job(None, job_id)
    if job is None or job["status"] != "validating_files":
        return
    for param in ("training_file", "validation_file"):
        fid = job[param]
        if not fid:
            continue
        store.add_event(job_id, f"Validating {param.replace('_', ' ')}: {fid}")
        f = store.get_file(job["owner"], fid)
        if f is None or f["status"] != "processed":
            msg = f"The {param.replace('_', ' ')} {fid} is not valid: " + (
                f["status_details"] if f else "it no longer exists"
            )
            store.update_job(
                job_id,
                expect_status=("validating_files",),
                status="failed",
                finished_at=now(),
                error={"code": f"invalid_{param}", "message": msg, "param": param},
                events=[{"message": msg, "level": "error"}],
            )
            return
    store.update_job(
        job_id,
        expect_status=("validating_files",),
        status="queued",
        events=[{"message": "Files validated, moving job to queued state"}],
    )


@router.post("", responses=ok(S.Job))
def create(
    request: Request,
    body: CreateJob,
    background: BackgroundTasks,
    who: str = Depends(owner),
    idempotency_key: str | None = Header(None, alias="Idempotency-Key"),
):
    store = request.app.state.store
    for param in ("training_file", "validation_file", "questions_file"):
        fid = getattr(body, param)
        if fid is not None and store.get_file(who, fid) is None:  # "" is an id too (one that never exists)
            raise not_found("file", fid, param)
    tf = store.get_file(who, body.training_file)
    if tf["purpose"] != "fine-tune":
        raise APIError(
            400,
            f"{body.training_file} was uploaded with purpose '{tf['purpose']}', not 'fine-tune'",
            param="training_file",
            code="invalid_training_file",
        )
    if method_type(body) == "dpo":
        _check_pairs(tf, body.training_file, "training_file")
        if body.validation_file:
            _check_pairs(store.get_file(who, body.validation_file), body.validation_file, "validation_file")
    _check_eval(store, who, body)
    base = resolve_base(request, who, body.model)
    spec, hp = build_spec(body, base)
    values = {
        "id": new_id("ftjob"),
        "owner": who,
        "model": body.model,
        "status": "validating_files",
        "created_at": now(),
        "training_file": body.training_file,
        "validation_file": body.validation_file,
        "spec": spec.to_dict(),
        "hyperparameters": hp,
        "method": method_type(body),
        "suffix": body.suffix,
        "seed": spec.train.seed,
        "metadata": body.metadata,
        "extra": _extra(body),
        # What a worker must have to claim it (one rank fits every worker; it may run more of its own).
        "ranks": body.resources.nproc_per_node if body.resources else 1,
        "gpus": body.resources.gpus if body.resources else 0,
    }
    row, created = store.create_job(values, idempotency_key)
    if created:
        store.add_event(row["id"], f"Created fine-tuning job: {row['id']}", data={"status": "validating_files"})
        if body.questions_file and not body.eval_id:
            row = _questions_eval(store, row)
        background.add_task(validate_files, request.app, row["id"])
    return job_object(row)


@router.get("", responses=ok(S.JobList))
def list_jobs(
    request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100), who: str = Depends(owner)
):
    rows = request.app.state.store.list_jobs(who, after, limit + 1)
    return {"object": "list", "data": [job_object(r) for r in rows[:limit]], "has_more": len(rows) > limit}


def owned_job(request: Request, job_id: str, who: str) -> dict:
    row = request.app.state.store.get_job(who, job_id)
    if row is None:
        raise not_found("fine-tuning job", job_id)
    return row


@router.get("/{job_id}", responses=ok(S.Job))
def retrieve(request: Request, job_id: str, who: str = Depends(owner)):
    return job_object(owned_job(request, job_id, who))


@router.post("/{job_id}/cancel", responses=ok(S.Job))
def cancel(request: Request, job_id: str, who: str = Depends(owner)):
    store = request.app.state.store
    job = owned_job(request, job_id, who)
    if job["status"] in TERMINAL:
        raise APIError(
            400, f"Job {job_id} has already {job['status']}; it cannot be cancelled", code="job_not_cancellable"
        )
    # The worker sees the status (and control flag) after its current step and stops.
    # Status and event in one transaction: a crash never leaves one without the other.
    store.update_job(
        job_id,
        expect_status=("validating_files", "queued", "running", "paused"),
        status="cancelled",
        control="cancel",
        finished_at=now(),
        estimated_finish=None,
        events=[{"message": "Job cancelled by request", "data": {"status": "cancelled"}}],
    )
    return job_object(store.get_job(who, job_id))


@router.post("/{job_id}/pause", responses=ok(S.Job))
def pause(request: Request, job_id: str, who: str = Depends(owner)):
    store = request.app.state.store
    job = owned_job(request, job_id, who)
    if job["status"] in ("validating_files", "queued"):
        store.update_job(
            job_id,
            expect_status=(job["status"],),
            status="paused",
            events=[{"message": "Job paused before it started", "data": {"status": "paused"}}],
        )
    elif job["status"] == "running":
        # The worker checkpoints at the end of the current step, then marks it paused.
        store.update_job(
            job_id,
            expect_status=("running",),
            control="pause",
            events=[{"message": "Pause requested; the job pauses after its current step"}],
        )
    elif job["status"] != "paused":
        raise APIError(400, f"Job {job_id} has {job['status']}; it cannot be paused", code="job_not_pausable")
    return job_object(store.get_job(who, job_id))


@router.post("/{job_id}/resume", responses=ok(S.Job))
def resume(request: Request, job_id: str, who: str = Depends(owner)):
    store = request.app.state.store
    job = owned_job(request, job_id, who)
    if job["status"] != "paused":
        raise APIError(400, f"Job {job_id} is {job['status']}, not paused", code="job_not_paused")
    store.update_job(
        job_id,
        expect_status=("paused",),
        status="queued",
        control="",
        events=[{"message": "Job resumed; queued to continue from its last checkpoint", "data": {"status": "queued"}}],
    )
    return job_object(store.get_job(who, job_id))


def event_object(e: dict) -> dict:
    return {
        "object": "fine_tuning.job.event",
        "id": e["id"],
        "created_at": e["created_at"],
        "level": e["level"],
        "message": e["message"],
        "type": e["type"],
        "data": e["data"] or {},
    }


@router.get("/{job_id}/events", responses=ok(S.EventList))
def events(
    request: Request,
    job_id: str,
    after: str | None = None,
    limit: int = Query(20, ge=1, le=1000),
    order: Literal["asc", "desc"] = "desc",
    who: str = Depends(owner),
):
    owned_job(request, job_id, who)
    rows = request.app.state.store.list_events(job_id, after, limit + 1, order)
    return {"object": "list", "data": [event_object(e) for e in rows[:limit]], "has_more": len(rows) > limit}


def checkpoint_object(c: dict) -> dict:
    return {
        "object": "fine_tuning.job.checkpoint",
        "id": c["id"],
        "created_at": c["created_at"],
        "fine_tuned_model_checkpoint": c["model_name"],
        "step_number": c["step"],
        "metrics": {k: v for k, v in c["metrics"].items() if v is not None},
        "fine_tuning_job_id": c["job_id"],
    }


@router.get("/{job_id}/checkpoints", responses=ok(S.CheckpointList))
def checkpoints(
    request: Request,
    job_id: str,
    after: str | None = None,
    limit: int = Query(10, ge=1, le=100),
    who: str = Depends(owner),
):
    owned_job(request, job_id, who)
    rows = request.app.state.store.list_checkpoints(job_id, after, limit + 1)
    data = [checkpoint_object(c) for c in rows[:limit]]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(rows) > limit,
    }


@router.get("/{job_id}/comparison", responses=ok(S.JobComparison))
def comparison(request: Request, job_id: str, who: str = Depends(owner)):
    job = owned_job(request, job_id, who)
    if job["comparison"] is None:
        raise APIError(
            404,
            f"Job {job_id} has no comparison (it needs questions_file and must have succeeded)",
            code="comparison_not_found",
        )
    return {"object": "fine_tuning.job.comparison", "fine_tuning_job_id": job_id, **job["comparison"]}

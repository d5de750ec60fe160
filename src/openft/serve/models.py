"""/v1/models: base models (built-in and registered) and the caller's fine-tuned
models and checkpoints.

Also turns a model name into a `ModelHandle` for the inference engine: a thin
wrapper over `openft.models.registry` (base models by name) and the store (the
caller's own models). Every name the caller may not use gets one answer.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from openft.models.builtins import missing_packages
from openft.models.load import is_materialised, materialise
from openft.models.registry import BUILTINS, ModelNotFound, registered, resolve_name, unknown_name
from openft.serve import schemas as S
from openft.serve.auth import owner
from openft.serve.engine import ModelHandle
from openft.serve.errors import APIError
from openft.serve.schemas import ok

router = APIRouter(prefix="/v1/models", tags=["models"])
CREATED_BUILTIN = 1730419200  # 2024-11-01, SmolLM2's release


def model_object(mid: str, created: int, owned_by: str, **extra) -> dict:
    return {"id": mid, "object": "model", "created": created, "owned_by": owned_by, **extra}


def model_not_found(name: str) -> APIError:
    """The answer for every model name the caller may not use."""
    return APIError(404, unknown_name(name), param="model", code="model_not_found")


def list_for(request: Request, who: str) -> list[dict]:
    store = request.app.state.store
    out = [
        model_object(b.name, CREATED_BUILTIN, "openft", kind="base")
        for b in BUILTINS.values()
        if not missing_packages(b)
    ]
    out += [model_object(m.name, m.added_at, "openft", kind="base") for m in registered().values()]
    for m in store.list_models(who):
        out.append(
            model_object(
                m["id"], m["created_at"], who, kind="fine-tuned", parent=m["base"], fine_tuning_job_id=m["job_id"]
            )
        )
        if m["job_id"]:
            for c in store.list_checkpoints(m["job_id"], limit=100):
                out.append(
                    model_object(
                        c["model_name"],
                        c["created_at"],
                        who,
                        kind="checkpoint",
                        parent=m["id"],
                        fine_tuning_job_id=m["job_id"],
                        step=c["step"],
                    )
                )
    return out


@router.get("", responses=ok(S.ModelList))
def list_models(request: Request, who: str = Depends(owner)):
    return {"object": "list", "data": list_for(request, who)}


def run_dir_of(path: Path) -> Path:
    """The run folder behind a model's weights: `<run>/adapter` or `<run>/model` for a
    fine-tuned model, `<run>/checkpoints/step-N` for a checkpoint."""
    return path.parent if path.name in ("adapter", "model") else path.parent.parent


def _run_details(path: Path) -> dict:
    """Lineage, resolved config and training summary of the run behind a model."""
    run = run_dir_of(path)
    out = {}
    for key, name in (("lineage", "lineage.json"), ("config", "config.json"), ("summary", "summary.json")):
        f = run / name
        out[key] = json.loads(f.read_text()) if f.exists() else None
    return out


@router.get("/{model_id}", responses=ok(S.Model))
def retrieve(request: Request, model_id: str, who: str = Depends(owner)):
    for m in list_for(request, who):
        if m["id"] == model_id:
            if m["kind"] != "base":
                m.update(_run_details(handle_path(request, who, model_id)))
            return m
    raise model_not_found(model_id)


def handle_path(request: Request, who: str, model_id: str) -> Path:
    h = handle_for(request, who, model_id, convert=False)
    return Path(h.full_model_path or h.adapter_path)


@router.get(
    "/{model_id}/export",
    response_class=FileResponse,
    responses={200: {"content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}}}},
)
def export_model(
    request: Request, model_id: str, what: Literal["adapter", "merged"] = "adapter", who: str = Depends(owner)
):
    """A zip of the adapter (PEFT format + tokenizer) or of the merged model."""
    if model_id in BUILTINS or model_id in registered():
        raise APIError(
            400, "base models are not exported; export a fine-tuned model", param="model", code="model_not_exportable"
        )
    path = handle_path(request, who, model_id)
    if what == "merged" and path.name not in ("adapter", "model"):
        raise APIError(
            400, "a checkpoint is exported as its adapter (what=adapter)", param="what", code="invalid_value"
        )
    tmp = Path(tempfile.mkdtemp(prefix="openft-export-"))
    try:  # the temp folder goes with the response, or at once if building the zip fails
        archive = _export_zip(path, what, tmp, re.sub(r"[^A-Za-z0-9._-]+", "_", model_id))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return FileResponse(
        archive,
        filename=f"{archive.stem}-{what}.zip",
        media_type="application/zip",
        background=BackgroundTask(shutil.rmtree, tmp, ignore_errors=True),
    )


def _export_zip(path: Path, what: str, tmp: Path, safe_name: str) -> Path:
    """Write the model at `path` (merged, or its adapter) into `tmp` and zip it there."""
    from openft.train.export import export

    if what == "merged" or not (path / "adapter_config.json").exists():
        try:
            src = export(run_dir_of(path), tmp / "model")
        except ModelNotFound:  # the base it was trained on is gone (the message would name its server path)
            raise APIError(
                409,
                "cannot merge: the base model this run was trained on is no longer on this server; "
                "export the adapter (what=adapter)",
                param="model",
                code="base_model_missing",
            ) from None
    else:
        src = shutil.copytree(path, tmp / "adapter")
    return Path(shutil.make_archive(str(tmp / safe_name), "zip", src))


@router.delete("/{model_id}", responses=ok(S.Deleted))
def delete(request: Request, model_id: str, who: str = Depends(owner)):
    store = request.app.state.store
    if model_id in BUILTINS or model_id in registered():
        raise APIError(403, f"{model_id} is a base model and cannot be deleted", code="model_not_deletable")
    row = store.get_model(who, model_id)
    if row is None:
        raise model_not_found(model_id)
    store.delete_model(who, model_id)
    request.app.state.engine.forget(model_id)
    # The whole run goes: weights, checkpoints (models of their own), lineage and metrics.
    shutil.rmtree(run_dir_of(Path(row["path"])), ignore_errors=True)
    return {"id": model_id, "object": "model", "deleted": True}


def _base_of_run(run_dir: Path) -> Path:
    lineage = json.loads((run_dir / "lineage.json").read_text())
    return Path(lineage["base_model_path"])


def own_handle(store, who: str, name: str) -> ModelHandle | None:
    """The caller's own fine-tuned model or LoRA checkpoint by name, or None."""
    row = store.get_model(who, name)
    if row is not None:
        path = Path(row["path"])
        if row["kind"] == "full":
            return ModelHandle(name=name, base_path=path, full_model_path=path)
        return ModelHandle(name=name, base_path=_base_of_run(run_dir_of(path)), adapter_path=path)
    ckpt = store.checkpoint_by_model(who, name)
    if ckpt is not None and (Path(ckpt["path"]) / "adapter_config.json").exists():
        path = Path(ckpt["path"])
        return ModelHandle(name=name, base_path=_base_of_run(run_dir_of(path)), adapter_path=path)
    return None


def handle_for(request: Request, who: str, name: str, *, convert: bool = True) -> ModelHandle:
    return resolve_handle(request.app.state.store, who, name, convert=convert)


def resolve_handle(store, who: str, name: str, *, convert: bool = True) -> ModelHandle:
    """A model name the caller may use: its own model or checkpoint, or a base model
    (built-in or registered). Anything else is the same 404 (param 'model').
    `convert=False` (GET routes): a GGUF base not yet converted to safetensors answers
    409 model_not_ready instead of converting inside the request."""
    own = own_handle(store, who, name)
    if own is not None:
        return own
    try:
        source = resolve_name(name)
    except ModelNotFound as e:
        if name in BUILTINS:  # a built-in whose package is missing: say which
            raise APIError(404, str(e), param="model", code="model_not_found") from None
        raise model_not_found(name) from None
    if not convert and not is_materialised(source):
        raise APIError(
            409,
            f"The model '{name}' is not ready yet: its GGUF weights are converted to safetensors once, by the "
            "first chat, estimate or fine-tuning job that uses it",
            param="model",
            code="model_not_ready",
        )
    return ModelHandle(name=name, base_path=materialise(source))

"""/v1/models: base models and the caller's fine-tuned models and checkpoints.

Also turns a model name into a `ModelHandle` for the inference engine.
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

from openft.models.load import materialise
from openft.models.registry import BUILTINS, builtin_gguf_path, resolve
from openft.serve import schemas as S
from openft.serve.auth import owner
from openft.serve.engine import ModelHandle
from openft.serve.errors import APIError, not_found
from openft.serve.schemas import ok

router = APIRouter(prefix="/v1/models", tags=["models"])
CREATED_BUILTIN = 1730419200  # 2024-11-01, SmolLM2's release


def model_object(mid: str, created: int, owned_by: str, **extra) -> dict:
    return {"id": mid, "object": "model", "created": created, "owned_by": owned_by, **extra}


def list_for(request: Request, who: str) -> list[dict]:
    store = request.app.state.store
    out = [
        model_object(b.name, CREATED_BUILTIN, "openft", kind="base") for b in BUILTINS.values() if builtin_gguf_path(b)
    ]
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


def _run_details(path: Path) -> dict:
    """Lineage, resolved config and training summary of the run behind a model."""
    run = path.parent if path.name in ("adapter", "model") else path.parent.parent
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
    raise not_found("model", model_id, "model")


def handle_path(request: Request, who: str, model_id: str) -> Path:
    h = handle_for(request, who, model_id)
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
    from openft.train.export import export

    if model_id in BUILTINS:
        raise APIError(
            400, "base models are not exported; export a fine-tuned model", param="model", code="model_not_exportable"
        )
    path = handle_path(request, who, model_id)
    tmp = Path(tempfile.mkdtemp(prefix="openft-export-"))
    if what == "merged" or not (path / "adapter_config.json").exists():
        run = path.parent if path.name in ("adapter", "model") else path.parent.parent
        src = export(run, tmp / "model") if (path.name in ("adapter", "model")) else None
        if src is None:
            shutil.rmtree(tmp, ignore_errors=True)
            raise APIError(
                400, "a checkpoint is exported as its adapter (what=adapter)", param="what", code="invalid_value"
            )
    else:
        src = shutil.copytree(path, tmp / "adapter")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id)
    archive = shutil.make_archive(str(tmp / safe), "zip", src)
    return FileResponse(
        archive,
        filename=f"{safe}-{what}.zip",
        media_type="application/zip",
        background=BackgroundTask(shutil.rmtree, tmp, ignore_errors=True),
    )


@router.delete("/{model_id}", responses=ok(S.Deleted))
def delete(request: Request, model_id: str, who: str = Depends(owner)):
    store = request.app.state.store
    if model_id in BUILTINS:
        raise APIError(403, f"{model_id} is a built-in base model and cannot be deleted", code="model_not_deletable")
    row = store.get_model(who, model_id)
    if row is None:
        raise not_found("model", model_id, "model")
    store.delete_model(who, model_id)
    request.app.state.engine.forget(model_id) if hasattr(request.app.state.engine, "forget") else None
    shutil.rmtree(Path(row["path"]).parent / "checkpoints", ignore_errors=True)
    shutil.rmtree(Path(row["path"]), ignore_errors=True)
    return {"id": model_id, "object": "model", "deleted": True}


def _base_of_run(run_dir: Path) -> Path:
    lineage = json.loads((run_dir / "lineage.json").read_text())
    return Path(lineage["base_model_path"])


def handle_for(request: Request, who: str, name: str) -> ModelHandle:
    """Resolve a model name the caller may use; anything else is 404 (param 'model')."""
    store = request.app.state.store
    if name in BUILTINS:
        return ModelHandle(name=name, base_path=materialise(resolve(name)))
    row = store.get_model(who, name)
    if row is not None:
        path = Path(row["path"])
        if row["kind"] == "full":
            return ModelHandle(name=name, base_path=path, full_model_path=path)
        return ModelHandle(name=name, base_path=_base_of_run(path.parent), adapter_path=path)
    ckpt = store.checkpoint_by_model(who, name)
    if ckpt is not None and (Path(ckpt["path"]) / "adapter_config.json").exists():
        path = Path(ckpt["path"])
        return ModelHandle(name=name, base_path=_base_of_run(path.parent.parent), adapter_path=path)
    raise not_found("model", name, "model")

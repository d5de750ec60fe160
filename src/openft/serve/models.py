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

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from openft.export import ExportRefused
from openft.export.formats import FILE_FORMATS, FORMATS, QUANT_FORMATS, default_quant, export_options
from openft.models import weightcache
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


def export_source(path: Path) -> Path:
    """What export_as takes for a model's weights: the run of a fine-tuned model, the
    checkpoint's own folder for a checkpoint."""
    return path.parent if path.name in ("adapter", "model") else path


def _run_details(path: Path) -> dict:
    """Lineage, resolved config and training summary of the run behind a model, and
    what it can be exported as."""
    run = run_dir_of(path)
    out = {"exports": export_options(export_source(path))}
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


BINARY = {"schema": {"type": "string", "format": "binary"}}
# Query choices are export_as's own, so a 400 for another one names them all.
ExportFormat = Literal[FORMATS]


@router.get(
    "/{model_id}/export",
    response_class=FileResponse,
    responses={
        200: {
            "description": "gguf and gguf-lora: the GGUF file itself; the other formats: a zip of their folder",
            "content": {"application/zip": BINARY, "application/octet-stream": BINARY},
        },
        409: {"model": S.Error, "description": "The base model the run was trained on is gone from this server"},
    },
)
def export_model(
    request: Request,
    model_id: str,
    fmt: ExportFormat | None = Query(None, alias="format"),
    what: Literal["adapter", "merged"] | None = None,
    quant: str | None = None,
    merge: bool = False,
    who: str = Depends(owner),
):
    """The model (or checkpoint) in `format`: hf (merged), adapter (the default), vllm,
    gguf, gguf-lora or ollama; `what=merged|adapter` is the older spelling of
    format=hf|adapter. `quant`: gguf, gguf-lora (default f16) and ollama (default
    q8_0). `merge`: vllm writes the merged model when vLLM would refuse the adapter."""
    if model_id in BUILTINS or model_id in registered():
        raise APIError(
            400, "base models are not exported; export a fine-tuned model", param="model", code="model_not_exportable"
        )
    path = handle_path(request, who, model_id)
    run_dir = export_source(path)
    fmt = _export_format(fmt, what, run_dir)
    quant = _export_quant(fmt, quant, merge)
    tmp = Path(tempfile.mkdtemp(prefix="openft-export-"))
    try:  # the temp folder goes with the response, or at once if the export fails
        out, filename = _write_export(fmt, run_dir, tmp, model_id, quant, merge)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return FileResponse(
        out,
        filename=filename,
        media_type="application/octet-stream" if fmt in FILE_FORMATS else "application/zip",
        background=BackgroundTask(shutil.rmtree, tmp, ignore_errors=True),
    )


def _export_format(fmt: str | None, what: str | None, run_dir: Path) -> str:
    """`format`, or what the older `what` (or nothing) asks for."""
    from openft.train.export import run_and_adapter

    has_adapter = run_and_adapter(run_dir)[1] is not None
    if fmt is None:
        # The older spelling gave a full fine-tune's model for what=adapter: it has no adapter.
        return "hf" if what == "merged" or not has_adapter else "adapter"
    if fmt == "adapter" and not has_adapter:
        raise APIError(
            400,
            "this model is a full fine-tune: it has no adapter; export format=hf",
            param="format",
            code="export_refused",
        )
    return fmt


def _export_quant(fmt: str, quant: str | None, merge: bool) -> str:
    """The quantisation to write, checked before any weights are loaded."""
    if merge and fmt != "vllm":
        raise APIError(400, f"merge applies to format=vllm, not {fmt}", param="merge", code="invalid_value")
    if fmt not in QUANT_FORMATS:
        if quant is not None:
            raise APIError(
                400, f"quant applies to {', '.join(QUANT_FORMATS)}, not {fmt}", param="quant", code="invalid_value"
            )
        return "f16"  # unused by these formats
    quant = quant or default_quant(fmt)
    from openft.export.gguf import check_quant
    from openft.export.gguf_lora import check_lora_quant

    try:
        (check_lora_quant if fmt == "gguf-lora" else check_quant)(quant)  # names what this server can write
    except ExportRefused as e:
        raise APIError(400, str(e), param="quant", code="export_refused") from None
    return quant


def _base_missing() -> APIError:
    # The exception's own message would name the base's path on this server.
    return APIError(
        409,
        "cannot export: the base model this run was trained on is no longer on this server; "
        "its adapter still exports (format=adapter)",
        param="model",
        code="base_model_missing",
    )


def _write_export(fmt: str, run_dir: Path, tmp: Path, model_id: str, quant: str, merge: bool) -> tuple[Path, str]:
    """(the file to send, its download name): a GGUF file itself, another format zipped."""
    from openft.export.formats import export_as
    from openft.export.vllm import AdapterRefused

    safe_name = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id)
    if fmt in FILE_FORMATS:
        filename = f"{safe_name}-{'lora-' if fmt == 'gguf-lora' else ''}{quant}.gguf"
        out = tmp / filename
    else:
        label = {"hf": "merged", "ollama": f"ollama-{quant}"}.get(fmt, fmt)
        filename, out = f"{safe_name}-{label}.zip", tmp / "export"
    # Named as the API names it (vLLM then serves it under the same model name), but for
    # Ollama, whose names take no colons: it keeps its default, the run's.
    name = None if fmt == "ollama" else model_id
    try:
        done = export_as(fmt, run_dir, out, quant=quant, name=name, merge=merge)
    except ModelNotFound:  # the base is gone: loaded to merge, or read for its config (gguf-lora)
        raise _base_missing() from None
    except AdapterRefused as e:
        raise APIError(
            400, f"{e}; merge=true exports the merged model instead", param="format", code="export_refused"
        ) from None
    except ExportRefused as e:
        raise APIError(400, str(e), param="format", code="export_refused") from None
    if fmt in FILE_FORMATS:
        return done.path, filename
    return Path(shutil.make_archive(str(tmp / safe_name), "zip", done.path)), filename


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
    # The whole run goes: weights, checkpoints (models of their own), lineage and metrics,
    # and any serving-dtype copy of its weights (openft.models.weightcache).
    run_dir = run_dir_of(Path(row["path"]))
    shutil.rmtree(run_dir, ignore_errors=True)
    weightcache.drop_for(run_dir)
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

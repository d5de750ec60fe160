"""/v1/files: upload (streamed to disk, size-limited), list, retrieve, delete, content."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse

from openft.data.load import load_dataset
from openft.jobs.store import new_id
from openft.serve import schemas as S
from openft.serve.auth import owner
from openft.serve.errors import APIError, not_found
from openft.serve.schemas import ok

router = APIRouter(prefix="/v1/files", tags=["files"])
PURPOSES = ("fine-tune", "evals", "user_data", "assistants", "batch", "vision")
CHUNK = 1 << 20


def file_object(row: dict) -> dict:
    out = {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": row["created_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": row["status"],
    }
    if row["status_details"]:
        out["status_details"] = row["status_details"]
    if row.get("validation") is not None:
        out["validation"] = row["validation"]  # openft extension: the dataset report
    return out


def display_name(name: str | None) -> str:
    """The name a client gave, kept only for display: no folders, no control
    characters (NUL included), at most 255 characters."""
    name = re.sub(r"[\x00-\x1f\x7f]", "", (name or "").replace("\\", "/")).split("/")[-1].strip()
    if name in ("", ".", ".."):
        name = "upload"
    return name[-255:]


def storage_name(filename: str) -> str:
    """Where an upload is kept inside its own folder: a fixed name, so nothing a
    client sends ever becomes part of a path; only the extension is kept (the
    dataset readers choose the format by it), and only a plain one."""
    suffix = Path(filename).suffix.lower()
    return "data" + (suffix if re.fullmatch(r"\.[a-z0-9]{1,16}", suffix) else ".jsonl")


def _validate(path: Path, filename: str) -> tuple[str, str | None, dict]:
    result = load_dataset(path)
    report = result.to_dict()
    # Name problems by the uploaded file's name, not the storage path.
    for p in report["errors"] + report["warnings"]:
        if "file" in p:
            p["file"] = filename
    report["usable"] = result.ok
    report["files"] = [filename]
    if result.ok:
        return "processed", None, report
    first = report["errors"][0] if report["errors"] else {"message": "no usable examples"}
    where = f"line {first['line']}" if "line" in first else (f"record {first['record']}" if "record" in first else "")
    details = f"{len(report['errors'])} error(s); first{(' at ' + where) if where else ''}: {first['message']}"
    return "error", details, report


@router.post("", responses=ok(S.FileObject))
def upload(request: Request, file: UploadFile = File(...), purpose: str = Form(...), who: str = Depends(owner)):
    if purpose not in PURPOSES:
        raise APIError(400, f"purpose must be one of {', '.join(PURPOSES)}", param="purpose", code="invalid_value")
    filename = display_name(file.filename)
    fid = new_id("file")
    store, limit = request.app.state.store, request.app.state.max_upload_bytes
    folder = request.app.state.files_dir / fid
    tmp = request.app.state.files_dir / f".{fid}.part"
    h, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as out:
            while chunk := file.file.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise APIError(
                        413,
                        f"file is larger than the {limit // (1 << 20)} MB limit (--max-upload-mb)",
                        param="file",
                        code="file_too_large",
                    )
                h.update(chunk)
                out.write(chunk)
        folder.mkdir(parents=True)
        final = folder / storage_name(filename)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    try:
        status, details, report = ("processed", None, None)
        if purpose == "fine-tune":
            status, details, report = _validate(final, filename)
        row = store.add_file(
            id=fid,
            owner=who,
            filename=filename,
            bytes=size,
            purpose=purpose,
            path=str(final),
            sha256=h.hexdigest(),
            status=status,
            status_details=details,
            validation=report,
        )
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # no file on disk without its row
        raise
    return file_object(row)


@router.get("", responses=ok(S.FileList))
def list_files(
    request: Request,
    purpose: str | None = None,
    limit: int = Query(10000, ge=1, le=10000),
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
    who: str = Depends(owner),
):
    rows = request.app.state.store.list_files(who, purpose, limit + 1, after, order)
    data = [file_object(r) for r in rows[:limit]]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(rows) > limit,
    }


def get_owned(request: Request, file_id: str, who: str, param: str | None = None) -> dict:
    row = request.app.state.store.get_file(who, file_id)
    if row is None:
        raise not_found("file", file_id, param)
    return row


@router.get("/{file_id}", responses=ok(S.FileObject))
def retrieve(request: Request, file_id: str, who: str = Depends(owner)):
    return file_object(get_owned(request, file_id, who))


@router.delete("/{file_id}", responses=ok(S.Deleted))
def delete(request: Request, file_id: str, who: str = Depends(owner)):
    row = get_owned(request, file_id, who)
    request.app.state.store.delete_file(who, file_id)
    shutil.rmtree(Path(row["path"]).parent, ignore_errors=True)
    return {"id": file_id, "object": "file", "deleted": True}


@router.get(
    "/{file_id}/content",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
)
def content(request: Request, file_id: str, who: str = Depends(owner)):
    row = get_owned(request, file_id, who)
    if not Path(row["path"]).exists():
        raise not_found("file", file_id)
    return FileResponse(row["path"], filename=row["filename"], media_type="application/octet-stream")

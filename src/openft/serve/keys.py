"""/v1/keys: a caller manages the API keys of its own owner."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from openft.serve import schemas as S
from openft.serve.auth import owner
from openft.serve.errors import not_found
from openft.serve.schemas import ok

router = APIRouter(prefix="/v1/keys", tags=["keys"])


@router.get("", responses=ok(S.ApiKeyList))
def list_keys(request: Request, who: str = Depends(owner)):
    rows = [k for k in request.app.state.store.list_keys() if k["owner"] == who]
    return {"object": "list", "data": [{"object": "api_key", **k} for k in rows]}


@router.post("", responses=ok(S.ApiKey))
def create_key(request: Request, who: str = Depends(owner)):
    """The secret is returned once. Creating the first key ends local mode: from
    then on every request needs a key."""
    new = request.app.state.store.create_key(who)
    return {"object": "api_key", "id": new.id, "owner": new.owner, "created_at": new.created_at, "key": new.key}


@router.delete("/{key_id}", responses=ok(S.Deleted))
def delete_key(request: Request, key_id: str, who: str = Depends(owner)):
    if not request.app.state.store.delete_key(who, key_id):
        raise not_found("api key", key_id)
    return {"object": "api_key", "id": key_id, "deleted": True}

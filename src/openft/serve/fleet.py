"""/v1/fleet (an openft extension): the API replicas and workers sharing this
server's store, what each runs and when each last reported, for the console."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from openft.jobs import fleet
from openft.serve import schemas as S
from openft.serve.auth import owner
from openft.serve.schemas import ok

router = APIRouter(prefix="/v1/fleet", tags=["fleet"])


@router.get("", responses=ok(S.Fleet))
def get_fleet(request: Request, who: str = Depends(owner)):
    """Every member is shown; a job is named only to its owner (another owner's
    job shows as busy, without its id or model)."""
    store = request.app.state.store
    view = fleet.view(store)
    for m in view["workers"]:
        job = m["job"]
        if job and (store.get_job(who, job["id"]) is None):
            m["job"] = {"id": None, "model": None, "ranks": job["ranks"]}
    keep = set(S.FleetMember.model_fields)
    for key in ("replicas", "workers"):
        view[key] = [{k: v for k, v in m.items() if k in keep} for m in view[key]]
    return view

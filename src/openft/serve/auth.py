"""Who is calling: a bearer API key names its owner.

With no keys created, the server runs in local mode: every caller is the owner
"local", and only loopback callers are accepted (the server also refuses to
listen on a non-loopback address in that mode; see `openft serve`).
"""

from __future__ import annotations

import ipaddress

from fastapi import Request

from openft.serve.errors import APIError

LOCAL_OWNER = "local"


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def owner(request: Request) -> str:
    store = request.app.state.store
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if store.has_keys():
        if not token:
            raise APIError(
                401,
                "Missing API key: send 'Authorization: Bearer <key>' (create one with 'openft keys create')",
                code="missing_api_key",
            )
        who = store.owner_for_key(token)
        if who is None:
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")
        return who
    client = request.client.host if request.client else None
    if not is_loopback(client):
        raise APIError(
            403, "No API keys are configured, so only local (loopback) callers are accepted", code="local_only"
        )
    return LOCAL_OWNER

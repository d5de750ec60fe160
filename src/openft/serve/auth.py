"""Who is calling: a bearer API key names its owner.

With no keys created, the server runs in local mode: every caller is the owner
"local", and only loopback callers are accepted (the server also refuses to
listen on a non-loopback address in that mode; see `openft serve`).

A loopback peer may still be a web page in the user's browser, so `BrowserGuard`
also refuses, with keys or without: a Host that is not one of this server's names
(a page that rebinds its own DNS name to 127.0.0.1 sends its own name), and a
state-changing request sent by a page of another origin (a form or a fetch that
needs no preflight, such as a body-less POST). No response carries CORS headers,
so a page of another origin cannot read what it gets either.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import Request
from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from openft.serve.errors import APIError, envelope

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


# Methods a page of another origin must not use on this server (GET, HEAD and
# OPTIONS change nothing, and their answers cannot be read cross-origin).
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Authority:
    host: str  # lowercased, without brackets or a trailing dot
    port: int | None


def parse_authority(value: str) -> Authority | None:
    """`host[:port]` as a Host header or a URL carries it; None if malformed."""
    if not value or "@" in value or any(c in value for c in "/?#\\ "):
        return None
    try:
        parts = urlsplit("//" + value)
        port = parts.port
    except ValueError:  # a port out of range, an unclosed bracket
        return None
    host = (parts.hostname or "").rstrip(".")
    return Authority(host, port) if host else None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class HostPolicy:
    """The names this server answers to: loopback names and addresses, the address
    it was told to listen on, and the names its operator allowed. Listening on every
    interface (0.0.0.0, ::), it also answers to any address literal: a browser sends
    an address as Host only when it connected to that very address, so an address
    cannot be rebound the way a DNS name can."""

    names: frozenset[str]
    any_address: bool = False

    @classmethod
    def for_server(cls, bind_host: str, allowed: Iterable[str] = ()) -> HostPolicy:
        names = set(LOOPBACK_NAMES)
        for name in allowed:
            parsed = _canonical(name.strip())
            if parsed is None:
                raise ValueError(f"--allowed-host {name!r}: give a host name or address, without a port or a scheme")
            names.add(parsed)
        wildcard = bind_host in ("0.0.0.0", "::", "")
        if not wildcard and (bound := _canonical(bind_host)):
            names.add(bound)  # a concrete address, or a name, it was told to listen on
        return cls(frozenset(names), any_address=wildcard)

    def accepts(self, host: str) -> bool:
        if _is_ip(host):
            address = ipaddress.ip_address(host)
            return address.is_loopback or self.any_address or str(address) in self.names
        return host in self.names


def _canonical(name: str) -> str | None:
    """A host name lowercased, or an address in its one written form (IPv6 with or
    without brackets); None for anything else (a port, a scheme, a path)."""
    if _is_ip(name.strip("[]")):
        return str(ipaddress.ip_address(name.strip("[]")))
    parsed = parse_authority(name)
    return parsed.host if parsed and parsed.port is None and ":" not in name else None


def host_refusal(policy: HostPolicy, headers: Headers) -> JSONResponse | None:
    value = headers.get("host", "")
    own = parse_authority(value)
    if own is None:
        return envelope(400, f"the Host header {value!r} is missing or malformed", param="Host", code="invalid_host")
    if policy.accepts(own.host):
        return None
    return envelope(
        421,
        f"this server does not answer to the name {own.host!r}; if it is one of its names, "
        f"start it with 'openft serve --allowed-host {own.host}'",
        param="Host",
        code="host_not_allowed",
    )


def origin_refusal(method: str, headers: Headers) -> JSONResponse | None:
    """A state-changing request whose Origin (or, where a browser sent none, Referer)
    is not this server's own. Clients other than browsers (curl, the openai client,
    the CLI) send neither, and are let through."""
    if method not in STATE_CHANGING:
        return None
    header = "origin" if "origin" in headers else "referer" if "referer" in headers else None
    if header is None or _same_origin(headers[header], headers.get("host", "")):
        return None
    return envelope(
        403,
        f"cross-origin request refused: {header.title()} {headers[header]!r} is not this server; "
        "only the server's own pages, and clients that send no Origin, may change anything",
        param=header.title(),
        code="cross_origin_request",
    )


def _same_origin(source: str, host_header: str) -> bool:
    """Whether a URL (an Origin, or a Referer) is the request's own host and port.
    A port left out means its scheme's default, on both sides: behind a TLS proxy
    the page is https://name and the Host header `name`. An opaque origin ("null",
    a sandboxed frame or a file:// page) is another site."""
    try:
        parts = urlsplit(source)
    except ValueError:
        return False
    default = DEFAULT_PORTS.get(parts.scheme)
    page, own = parse_authority(parts.netloc), parse_authority(host_header)
    if default is None or page is None or own is None:
        return False
    return (page.host, page.port or default) == (own.host, own.port or default)


class BrowserGuard:
    """ASGI middleware applying `host_refusal` and `origin_refusal` to every HTTP
    request, before any route (the console's static files included)."""

    def __init__(self, app, policy: HostPolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        refusal = host_refusal(self.policy, headers) or origin_refusal(scope["method"], headers)
        if refusal is not None:
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)

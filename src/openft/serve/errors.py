"""One error envelope everywhere: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("openft.serve")

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None, type: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or TYPES.get(status, "invalid_request_error")


def not_found(kind: str, ident: str, param: str | None = None) -> APIError:
    # The same answer whether the object is missing or belongs to another owner.
    return APIError(404, f"No such {kind}: {ident}", param=param, code=f"{kind.replace(' ', '_')}_not_found")


# EngineError codes that are about the request's prompt, or about no field at all.
_ENGINE_PARAM = {"context_length_exceeded": "prompt", "engine_stopped": None, "internal_error": None}


def engine_error(e, prompt_param: str = "messages") -> APIError:
    """The HTTP answer to an `EngineError`: its own status (`EngineError.status`:
    404 no such model, 422 a model whose files cannot be loaded, 503 the engine is
    stopped, 500 a bug) and the field it is about."""
    param = _ENGINE_PARAM.get(e.code, "model")
    if e.code == "invalid_request":
        param = None
    return APIError(e.status, str(e), param=prompt_param if param == "prompt" else param, code=e.code)


def envelope(status: int, message: str, *, param=None, code=None, type=None) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={
            "error": {
                "message": message,
                "type": type or TYPES.get(status, "invalid_request_error"),
                "param": param,
                "code": code,
            }
        },
    )


# Pydantic names the member of a Union that failed in the error's location
# (`n_epochs.literal['auto']`, `stop.list[str]`, `content.int`); those are not fields.
_UNION_TAG = re.compile(r"^(?:int|float|str|bool|bytes|none|dict|list|tuple|set)$|[\[\]'\"()]")


def _param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    parts = [p for i, p in enumerate(parts) if i == 0 or not _UNION_TAG.search(p)]
    return ".".join(parts) or None


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return envelope(exc.status, exc.message, param=exc.param, code=exc.code, type=exc.type)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        param = _param(tuple(first.get("loc", ())))
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', msg)}"
            param = None
        more = f" (and {len(errs) - 1} more problem(s))" if len(errs) > 1 else ""
        # A field OpenAI defines that this server does not implement, or one OpenAI does not define.
        code = {"unsupported_parameter": "unsupported_parameter", "extra_forbidden": "unknown_parameter"}.get(
            first.get("type"), "invalid_value"
        )
        if code == "unknown_parameter":
            msg = "this server does not know this parameter"
        return envelope(400, f"{param + ': ' if param else ''}{msg}{more}", param=param, code=code)

    from openft.models.templates import TemplateError

    @app.exception_handler(TemplateError)
    async def _template(request: Request, exc: TemplateError):
        # The model's chat template cannot render the data (tool calls through a
        # template without tools, one that does not render incrementally): the
        # model asked for is the wrong one for this file, not a server fault.
        return envelope(400, str(exc), param="model", code="unsupported_template")

    from openft.jobs.db import StoreUnavailable

    @app.exception_handler(StoreUnavailable)
    async def _store_down(request: Request, exc: StoreUnavailable):
        # The database stayed unreachable through the store's retries: a clean answer
        # the client can retry on, never a half-done write.
        return envelope(503, f"the job store is unavailable, try again shortly: {exc}", code="store_unavailable")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return envelope(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return envelope(500, f"internal error: {type(exc).__name__}", code="internal_error")

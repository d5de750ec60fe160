"""The web console: a static, framework-free client of the HTTP API.

`mount(app)` serves `static/index.html` at `/` and the assets under `/console/`.
The console holds no business logic: every figure it shows comes from the same
`/v1/...` endpoints the `openai` client and the CLI call.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"


def mount(app: FastAPI) -> None:
    index = STATIC / "index.html"

    def console_index():
        # no-cache: a browser revalidates (ETag), so an upgraded server never
        # pairs a stale page with new assets.
        return FileResponse(index, media_type="text/html", headers={"Cache-Control": "no-cache"})

    app.add_api_route("/", console_index, methods=["GET"], include_in_schema=False)
    app.add_api_route("/console", console_index, methods=["GET"], include_in_schema=False)
    app.mount("/console", StaticFiles(directory=STATIC), name="console")

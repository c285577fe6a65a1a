"""The dashboard page: static files shipped in ``cogen.coordinator/static`` and plotly.js from the
installed ``plotly`` package (no CDN: swarm machines may have no internet).

The page (``static/index.html`` + ``app.js`` + ``style.css``) is plain JavaScript that polls the
JSON API every two seconds and redraws; it uses nothing but ``/api/*``.
"""

from __future__ import annotations

import importlib.resources
from functools import cache
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles


def static_dir() -> Path:
    return Path(str(importlib.resources.files("cogen.coordinator") / "static"))


@cache
def plotly_js() -> Path | None:
    """The minified plotly.js bundle that the ``plotly`` Python package ships, if installed."""
    try:
        path = Path(str(importlib.resources.files("plotly") / "package_data" / "plotly.min.js"))
    except ModuleNotFoundError:
        return None
    return path if path.is_file() else None


def mount_dashboard(app: FastAPI) -> None:
    """Serve the page at ``/``, its assets at ``/static/`` and plotly.js at ``/vendor/plotly.min.js``."""
    static = static_dir()  # the strict editable install links each file: follow those links

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(static / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/vendor/plotly.min.js", include_in_schema=False)
    def plotly() -> FileResponse:
        path = plotly_js()
        if path is None:
            raise HTTPException(404, "plotly is not installed: pip install plotly")
        return FileResponse(path, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

    app.mount("/static", StaticFiles(directory=static, follow_symlink=True), name="static")

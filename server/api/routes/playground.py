"""The playground page: static files served at / and /playground (no build step, nothing remote)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parent.parent / "static" / "playground"
# Everything the page loads; any other name under /playground/ is a 404 (no directory walking).
_ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
# Served without the API key (see admission): the page asks for the key and sends it on API calls.
OPEN_PATHS = frozenset({"/", "/playground", *(f"/playground/{name}" for name in _ASSETS)})
_NO_CACHE = {"Cache-Control": "no-cache"}

router = APIRouter(tags=["playground"], include_in_schema=False)


@router.get("/")
@router.get("/playground")
async def page() -> FileResponse:
    """The playground page."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=_NO_CACHE)


@router.get("/playground/{name}")
async def asset(name: str) -> FileResponse:
    """A script or stylesheet of the page."""
    if name not in _ASSETS:
        raise HTTPException(status_code=404, detail=f"no such playground file: {name}")
    return FileResponse(STATIC_DIR / name, media_type=_ASSETS[name], headers=_NO_CACHE)

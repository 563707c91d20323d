"""The browser client: static files under ``/ui/`` (no build step), ``/`` redirects there.

Nothing here is part of the API: the routes are left out of the OpenAPI document. The client
talks to ``/v1`` with the key the user signs in with, like any other client.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

WEB_ROOT = Path(__file__).resolve().parent.parent / "web"

# The client is ES modules (app.js imports js/*.js), which browsers refuse unless served as
# JavaScript; Python's MIME table comes partly from the system (the Windows registry can say
# text/plain for .js), so the type is set here.
mimetypes.add_type("text/javascript", ".js")

router = APIRouter(include_in_schema=False)


class _Revalidated(StaticFiles):
    """Static files that the browser revalidates (ETag) on every load, so a new release's
    modules are never mixed with an old cached index.html or with each other."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


@router.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


# html=True serves index.html for /ui/; /ui (no slash) is redirected to /ui/ by the router.
# check_dir=False: an install without the web files still serves the API (the UI answers 404).
router.mount("/ui", _Revalidated(directory=WEB_ROOT, html=True, check_dir=False), name="ui")

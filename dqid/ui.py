"""The cluster dashboard: three static files served at ``GET /ui``.

The page (``dqid/ui/``: HTML, CSS and one plain script, nothing fetched
from elsewhere) holds no data: it reads ``/cluster``, ``/held`` and
``/messages/ID`` from the node that served it, with the bearer token the
user typed when the API asks for one.  So the files themselves are served
without a token (``UI_PATHS`` is in ``http_auth.OPEN``).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files

from twisted.web.iweb import IRequest
from werkzeug.exceptions import NotFound

from .http_io import answer


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: bytes


# URL path -> file in dqid/ui/ and its type.
_FILES = {
    "/ui": ("index.html", b"text/html; charset=utf-8"),
    "/ui/dashboard.js": ("dashboard.js", b"text/javascript; charset=utf-8"),
    "/ui/dashboard.css": ("dashboard.css", b"text/css; charset=utf-8"),
}

# What http_auth lets through without a token (GET only).
UI_PATHS = frozenset(path.encode("ascii") for path in _FILES)

# The page runs only its own script and style and talks only to its own
# origin; no other site may frame it (a framed "kick" button could be
# clicked by a trick).
_HEADERS = {
    b"Content-Security-Policy": (
        b"default-src 'none'; script-src 'self'; style-src 'self'; "
        b"connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
        b"form-action 'none'; frame-ancestors 'none'"
    ),
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"no-referrer",
    b"Cache-Control": b"no-cache",
}


def load_assets() -> dict[str, Asset]:
    """The dashboard's files, read from the installed package."""
    folder = files("dqid") / "ui"
    return {
        path: Asset((folder / name).read_bytes(), content_type)
        for path, (name, content_type) in _FILES.items()
    }


_assets: dict[str, Asset] | None = None


def serve_asset(request: IRequest, path: str) -> bytes:
    """Answer ``request`` with the dashboard file at URL ``path`` (read on
    first use, then kept); NotFound for any other path."""
    global _assets
    if _assets is None:
        _assets = load_assets()
    asset = _assets.get(path)
    if asset is None:
        raise NotFound()
    for name, value in _HEADERS.items():
        request.setHeader(name, value)
    return answer(request, 200, asset.body, asset.content_type)

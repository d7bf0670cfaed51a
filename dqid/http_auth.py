"""Bearer tokens for the HTTP API (``--http-token-file``).

:class:`BearerGate` stands in front of the API's resource: every request
except ``GET /health`` and ``GET /ready`` (what load balancers probe) and
``GET`` of the dashboard's files (``/ui``, ``/ui/dashboard.js``, ...) needs
``Authorization: Bearer TOKEN`` with one of the tokens, compared in
constant time; any other request is answered ``401 {"error":
"unauthorized"}`` with ``WWW-Authenticate: Bearer``, before it is routed.
"""

from __future__ import annotations

from typing import Protocol

from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from .http_io import json_body
from .ui import UI_PATHS

# What a load balancer may probe without a token, and the dashboard's
# static files (they hold no data; the page sends the token it is given).
OPEN = frozenset({(b"GET", b"/health"), (b"GET", b"/ready"),
                  *((b"GET", path) for path in UI_PATHS)})


class Tokens(Protocol):
    def check(self, header_value: bytes | None) -> bool: ...


class BearerGate(Resource):
    isLeaf = True

    def __init__(self, api: IResource, tokens: Tokens) -> None:
        super().__init__()
        self.api = api
        self.tokens = tokens

    def render(self, request: IRequest) -> bytes | int:
        if (request.method, request.path) in OPEN or self.tokens.check(
                request.getHeader(b"authorization")):
            return self.api.render(request)
        request.setHeader(b"WWW-Authenticate", b'Bearer realm="dqid"')
        body = json_body(request, 401, {
            "error": "unauthorized",
            "message": "this API needs Authorization: Bearer <token>",
        })
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return body

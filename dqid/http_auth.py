"""Bearer tokens for the HTTP API (``--http-token-file``).

:class:`BearerGate` stands in front of the API's resource: every request
except ``GET /health`` and ``GET /ready`` (what load balancers probe) needs
``Authorization: Bearer TOKEN`` with one of the tokens, compared in
constant time; any other request is answered ``401 {"error":
"unauthorized"}`` with ``WWW-Authenticate: Bearer``, before it is routed.
"""

from __future__ import annotations

from typing import Protocol

from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from .http_io import json_body

# What a load balancer may probe without a token.
OPEN = frozenset({(b"GET", b"/health"), (b"GET", b"/ready")})


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

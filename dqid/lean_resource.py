"""A twisted.web resource that serves a Klein app's routes with less machinery."""

from __future__ import annotations

from typing import Callable

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from werkzeug.exceptions import BadRequest
from werkzeug.routing import Rule


_log = Logger()


class LeanKleinResource(Resource):
    """Serves a Klein app: matched routes on a short path, the rest by Klein.

    Klein's own resource (``app.resource()``) spends more per request than
    the whole rest of twisted.web (host and port lookups for the URL, a
    MapAdapter, an adapter for ``url_for``, three Deferreds and a chunked
    answer).  Here a request that matches a route (``app.url_map``) runs its
    endpoint at once through the app (``app.execute_endpoint``, as Klein
    does): bytes are answered as twisted.web answers any resource, with a
    Content-Length; a Deferred is answered when it fires, and cancelled if
    the client goes away first; an error goes to ``on_error``, the app's
    error handler.  Everything else (HEAD, an unknown path, a wrong method,
    a redirect, an undecodable URL) is rendered by Klein's own resource, as
    before.  Not kept on the short path: the ``IKleinRequest`` mapper
    (``url_for``) and prepath rewriting, which this API does not use, and
    results other than bytes.

    Only Klein's public surface is used: ``url_map``, ``execute_endpoint``
    and ``resource()``.
    """

    isLeaf = True

    def __init__(self, app: Klein, on_error: Callable[[IRequest, Failure], bytes | None]) -> None:
        super().__init__()
        self.app = app
        self.klein_resource = app.resource()
        # Host, port and scheme only matter for redirects, which Klein renders.
        self.adapter = app.url_map.bind("localhost")
        # (method, path) -> rule, for the routes without variables: at most
        # one entry per such route and method, since only matches are kept.
        self.static_routes: dict[tuple[bytes, bytes], Rule] = {}
        self.on_error = on_error

    def render(self, request: IRequest) -> bytes | int:
        postpath = request.postpath
        if request.method == b"HEAD" or request.prepath or not postpath:
            return self._klein_render(request)
        path = b"/".join(postpath)  # the path_info Klein would route on
        if not path.startswith(b"/"):
            path = b"/" + path
        method = request.method
        known = self.static_routes.get((method, path))
        if known is not None:
            rule, kwargs = known, {}
        else:
            try:
                rule, kwargs = self.adapter.match(
                    path.decode("utf-8"), method.decode("ascii"), return_rule=True
                )
            except Exception:  # not found, not allowed, redirect, not UTF-8
                return self._klein_render(request)
            if not kwargs and not rule.arguments:  # a fixed path: remember it
                self.static_routes[method, path] = rule
        try:
            result = self.app.execute_endpoint(rule.endpoint, request, **kwargs)
        except Exception:
            return self._error_now(request, Failure())
        if isinstance(result, bytes):
            if request.code in NO_BODY_CODES:  # no Content-Length on a 204
                request.finish()
                return NOT_DONE_YET
            return result  # twisted.web adds its Content-Length
        if not isinstance(result, Deferred):
            result = succeed(result)
        return self._answer_later(request, result)

    def _klein_render(self, request: IRequest) -> bytes | int:
        """Klein renders the rest, once the URL and Host are known to be
        UTF-8 (Klein answers others 400 too, but logs a traceback for each:
        any client could fill the log)."""
        try:
            b"/".join([*request.prepath, *request.postpath]).decode("utf-8")  # unquoted
            (request.getHeader(b"host") or b"").decode("utf-8")
        except UnicodeDecodeError:
            return self._error_now(request, Failure(BadRequest("the URL or Host is not UTF-8")))
        return self.klein_resource.render(request)

    def _error_now(self, request: IRequest, failure: Failure) -> bytes | int:
        try:
            body = self.on_error(request, failure)
        except Exception:
            request.processingFailed(Failure())
            return NOT_DONE_YET
        return b"" if body is None else body

    def _answer_later(self, request: IRequest, result: Deferred) -> int:
        gone = False

        def finished(_: object) -> None:
            nonlocal gone
            gone = True

        def lost(_: Failure) -> None:
            finished(None)
            result.cancel()

        def failed(failure: Failure) -> bytes | None:
            if gone:  # nobody to answer
                if not failure.check(CancelledError):
                    _log.failure("unhandled error after the client left", failure)
                return None
            return self.on_error(request, failure)

        def write(body: bytes | str | None) -> None:
            if isinstance(body, str):
                body = body.encode("utf-8")
            if isinstance(body, bytes):
                if request.code not in NO_BODY_CODES and not request.startedWriting:
                    request.setHeader(b"Content-Length", b"%d" % len(body))
                request.write(body)
            if not gone:
                request.finish()

        request.notifyFinish().addCallbacks(finished, lost)
        result.addErrback(failed)
        result.addCallback(write)
        result.addErrback(lambda f: _log.failure("unhandled error writing an answer", f))
        return NOT_DONE_YET

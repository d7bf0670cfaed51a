"""The REST API (v1) of one node, as a Klein app over a QueueNode.

Every error leaves as JSON ``{"error": code, "message": text}``; the
translation from domain exceptions happens once, in ``handle_errors``.
"""

from __future__ import annotations

import json

from typing import Any, Protocol

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import BadRequest, MethodNotAllowed, NotFound

from .errors import NotReady, NotReplicated
from .http_io import (
    HEALTHY_BODY, MAX_BATCH, MAX_DELAY, MAX_GET_COUNT, MAX_HELD_COUNT, MAX_VISIBILITY,
    MAX_WAIT, READY_BODY, RETRY_AFTER_FULL, RETRY_AFTER_UNAVAILABLE, ApiError, answer,
    bad_request, batch_body_limit, content_type_header, content_type_text, decode_batch,
    encode_held, encode_message, int_arg, json_body, no_content, number_arg, read_body,
    text_arg,
)
from .cluster_view import local_view
from .idempotency import IdempotencyConflict
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, NodeMetrics
from .node import PushItem, PushResult, QueueNode
from .lean_resource import LeanKleinResource
from .openapi import openapi_document
from .queue import LeaseLost, Message, NotHeld, NotLeased, QueueFull, UnknownMessage
from .ui import serve_asset


DEFAULT_HELD_COUNT = 100


class ClusterStats(Protocol):
    """What ``GET /cluster`` asks of a cluster node (a ClusterView)."""

    def gather(self) -> Deferred: ...


def _translate(failure: Failure) -> ApiError:
    """Map a domain exception to its HTTP answer."""
    error = failure.value
    if isinstance(error, ApiError):
        return error
    if isinstance(error, QueueFull):
        return ApiError(
            429, "queue_full", "the queue is full; retry after some acks",
            {"Retry-After": RETRY_AFTER_FULL},
        )
    if isinstance(error, UnknownMessage):
        return ApiError(
            404, "unknown_message",
            f"message {error.args[0]!s} is not queued (acked, or never pushed)",
        )
    if isinstance(error, LeaseLost):  # before NotLeased: a kind of it
        return ApiError(
            409, "lease_lost",
            f"message {error.args[0]!s}: this receipt's lease is over (it ran out, was "
            "nacked, or the message was delivered again)")
    if isinstance(error, NotHeld):
        return ApiError(409, "not_held", f"message {error.args[0]!s} is not held")
    if isinstance(error, NotLeased):
        return ApiError(409, "not_leased", f"message {error.args[0]!s} is not leased")
    if isinstance(error, IdempotencyConflict):
        return ApiError(
            409, "idempotency_conflict",
            "this Idempotency-Key was used with another body",
            extra={"id": error.message_id},
        )
    if isinstance(error, NotReplicated):
        return ApiError(
            503, "not_replicated",
            "not enough nodes hold the message; it was not queued",
            {"Retry-After": RETRY_AFTER_UNAVAILABLE},
        )
    if isinstance(error, NotReady):
        return ApiError(
            503, "not_ready", f"this node does not take writes now: {error.reason}",
            {"Retry-After": RETRY_AFTER_UNAVAILABLE},
        )
    if isinstance(error, BadRequest):
        return ApiError(400, "bad_request", error.description or "bad request")
    if isinstance(error, NotFound):
        return ApiError(404, "not_found", "no such resource")
    if isinstance(error, MethodNotAllowed):
        allowed = ", ".join(error.valid_methods or [])
        return ApiError(
            405, "method_not_allowed", "method not allowed here",
            {"Allow": allowed} if allowed else None,
        )
    return ApiError(500, "internal", "internal error")


class HttpApi:
    """The Klein app: routes of DESIGN.md's HTTP API over one QueueNode."""

    app = Klein()
    log = Logger()

    def __init__(self, node: QueueNode, max_message_bytes: int, *,
                 cluster: ClusterStats | None = None,
                 metrics: NodeMetrics | None = None) -> None:
        self.node = node
        self.max_message_bytes = max_message_bytes
        self.cluster = cluster  # None: a standalone node
        self.metrics = metrics if metrics is not None else NodeMetrics(node)

    def resource(self) -> LeanKleinResource:
        return LeanKleinResource(self.app, self._error)

    # -- errors --------------------------------------------------------------

    @app.handle_errors(Exception)
    def _error(self, request: IRequest, failure: Failure) -> bytes | None:
        if failure.check(CancelledError):
            return None  # the client went away; nobody is listening
        error = _translate(failure)
        if error.code == "not_replicated":
            self.metrics.count_not_replicated()
        if error.status >= 500 and error.code == "internal":
            self.log.failure("unhandled error in {method} {path}", failure,
                             method=request.method, path=request.path)
        for name, value in error.headers.items():
            request.setHeader(name.encode("ascii"), value.encode("ascii"))
        payload = {"error": error.code, "message": error.message, **error.extra}
        body = json_body(request, error.status, payload)
        # Also when KleinResource answers (unknown path, wrong method): not chunked.
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return body

    # -- push ----------------------------------------------------------------

    # Handlers return bytes when they can answer at once, else a Deferred:
    # no coroutine for what never waits.

    @app.route("/push", methods=["POST"])
    def push(self, request: IRequest) -> bytes | Deferred:
        started = self.node.clock.seconds()
        try:
            result = self._push(request)
        except BaseException:
            self._push_answered(None, started)
            raise
        if isinstance(result, bytes):
            return self._push_answered(result, started)
        return result.addBoth(self._push_answered, started)

    def _push_answered(self, result: Any, started: float) -> Any:
        """dqid_push_seconds: from the request to its answer, any answer."""
        self.metrics.observe_push(self.node.clock.seconds() - started)
        return result

    def _push(self, request: IRequest) -> bytes | Deferred:
        body = read_body(request, self.max_message_bytes)
        if not body:
            raise bad_request("the message body is empty", "empty_message")
        key = self._idempotency_key(request)
        raw_type = request.getHeader(b"content-type")
        delay = number_arg(request, "delay", 0.0, 0.0, MAX_DELAY, False) if request.args else 0.0
        item = PushItem(body, content_type_text(raw_type) if raw_type else None, delay or None)
        result = self.node.push(item, key)
        if isinstance(result, PushResult):
            return self._pushed(result, request)
        return result.addCallback(self._pushed, request)

    @staticmethod
    def _pushed(result: PushResult, request: IRequest) -> bytes:
        # Ids are URL-safe ASCII: nothing to escape.
        return answer(request, 201 if result.created else 200,
                      b'{"id":"%s"}' % result.ids[0].encode("ascii"))

    @app.route("/push/batch", methods=["POST"])
    async def push_batch(self, request: IRequest) -> bytes:
        started = self.node.clock.seconds()
        try:
            raw = read_body(request, batch_body_limit(self.max_message_bytes))
            items = decode_batch(raw, self.max_message_bytes)
            result = await maybeDeferred(self.node.push_many, items)
        finally:
            self._push_answered(None, started)
        return json_body(request, 201, {"ids": result.ids})

    @staticmethod
    def _idempotency_key(request: IRequest) -> str | None:
        raw = request.getHeader(b"idempotency-key")
        if raw is None:
            return None
        try:
            key = raw.decode("ascii")
        except UnicodeDecodeError:
            key = ""
        if not 1 <= len(key) <= 255 or not key.isprintable():
            raise bad_request("Idempotency-Key must be 1-255 printable ASCII characters")
        return key

    # -- get -----------------------------------------------------------------

    @app.route("/get", methods=["GET", "POST"])
    def get(self, request: IRequest) -> bytes | Deferred:
        if request.method == b"HEAD":  # werkzeug adds HEAD; it must not lease
            raise MethodNotAllowed(valid_methods=["GET", "POST"])
        if request.args:
            visibility = number_arg(
                request, "visibility", self.node.default_visibility, 0.0, MAX_VISIBILITY,
                True,
            )
            wait = number_arg(request, "wait", 0.0, 0.0, MAX_WAIT, False)
            count = int_arg(request, "count", 1, MAX_GET_COUNT)
        else:
            visibility, wait, count = self.node.default_visibility, 0.0, None
        taken = self.node.get(visibility, wait, count or 1)
        if isinstance(taken, list):
            return self._deliver(taken, request, count)
        return taken.addCallback(self._deliver, request, count)

    @staticmethod
    def _deliver(taken: list[Message], request: IRequest, count: int | None) -> bytes:
        if not taken:
            return no_content(request)
        if count is not None:
            return json_body(request, 200, {"messages": [encode_message(m) for m in taken]})
        message = taken[0]
        request.setHeader(b"Dqid-Receipt", message.receipt.encode("ascii"))
        return HttpApi._message(request, message)

    @staticmethod
    def _message(request: IRequest, message: Message) -> bytes:
        request.setHeader(b"Dqid-Id", message.id.encode("ascii"))
        request.setHeader(b"Dqid-Deliveries", b"%d" % message.deliveries)
        return answer(request, 200, message.body, content_type_header(message.content_type))

    # -- ack, nack, touch ----------------------------------------------------

    @app.route("/ack/<message_id>", methods=["POST"])
    def ack(self, request: IRequest, message_id: str) -> bytes | Deferred:
        return self._done(request, self.node.ack(message_id))

    @app.route("/ack", methods=["POST"])
    async def ack_batch(self, request: IRequest) -> bytes:
        raw = read_body(request, batch_body_limit(self.max_message_bytes))
        try:
            ids = json.loads(raw).get("ids")
        except (ValueError, UnicodeDecodeError, AttributeError, RecursionError):
            ids = None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise bad_request('the body must be {"ids": ["...", ...]}')
        if len(ids) > MAX_BATCH:
            raise bad_request(f"at most {MAX_BATCH} ids at once")
        answers = await self.node.ack_many(ids)
        acked = [message_id for message_id, ok in zip(ids, answers) if ok]
        unknown = [message_id for message_id, ok in zip(ids, answers) if not ok]
        return json_body(request, 200, {"acked": acked, "unknown": unknown})

    @app.route("/nack/<message_id>", methods=["POST"])
    def nack(self, request: IRequest, message_id: str) -> bytes | Deferred:
        receipt = text_arg(request, "receipt")
        delay = number_arg(request, "delay", 0.0, 0.0, MAX_DELAY, False)
        return self._done(request, self.node.nack(message_id, receipt, delay))

    @app.route("/touch/<message_id>", methods=["POST"])
    def touch(self, request: IRequest, message_id: str) -> bytes | Deferred:
        receipt = text_arg(request, "receipt")
        visibility = number_arg(
            request, "visibility", self.node.default_visibility, 0.0, MAX_VISIBILITY, True
        )
        return self._done(request, self.node.touch(message_id, visibility, receipt))

    # -- held messages and peeks ----------------------------------------------

    @app.route("/kick/<message_id>", methods=["POST"])
    def kick(self, request: IRequest, message_id: str) -> bytes | Deferred:
        return self._done(request, self.node.kick(message_id))

    @app.route("/held", methods=["GET"])
    def held(self, request: IRequest) -> bytes | Deferred:
        count = int_arg(request, "count", 1, MAX_HELD_COUNT) or DEFAULT_HELD_COUNT
        found = self.node.held(count)

        def listed(messages: list[Message]) -> bytes:
            return json_body(request, 200, {"messages": [encode_held(m) for m in messages]})

        return listed(found) if isinstance(found, list) else found.addCallback(listed)

    @app.route("/messages/<message_id>", methods=["GET"])
    def peek(self, request: IRequest, message_id: str) -> bytes | Deferred:
        found = self.node.peek(message_id)

        def shown(found: tuple[Message, str]) -> bytes:
            message, state = found
            request.setHeader(b"Dqid-State", state.encode("ascii"))
            return self._message(request, message)

        return shown(found) if isinstance(found, tuple) else found.addCallback(shown)

    @staticmethod
    def _done(request: IRequest, waiting: Deferred | None) -> bytes | Deferred:
        """204 now, or when ``waiting`` fires."""
        if waiting is not None:
            return waiting.addCallback(lambda _: no_content(request))
        return no_content(request)

    # -- the dashboard (dqid/ui.py) --------------------------------------------

    @app.route("/ui", methods=["GET"], endpoint="ui_page")
    @app.route("/ui/<name>", methods=["GET"], endpoint="ui_file")
    def ui(self, request: IRequest, name: str | None = None) -> bytes:
        return serve_asset(request, "/ui" if name is None else "/ui/" + name)

    # -- introspection -------------------------------------------------------

    @app.route("/stats", methods=["GET"])
    def stats(self, request: IRequest) -> bytes:
        return json_body(request, 200, self.node.stats())

    @app.route("/metrics", methods=["GET"])
    def metrics_text(self, request: IRequest) -> bytes:
        return answer(request, 200, self.metrics.render(), METRICS_CONTENT_TYPE.encode("ascii"))

    @app.route("/cluster", methods=["GET"])
    def cluster_stats(self, request: IRequest) -> bytes | Deferred:
        if self.cluster is None:
            return json_body(request, 200, local_view(self.node.node_id, self.node.stats()))
        return self.cluster.gather().addCallback(
            lambda document: json_body(request, 200, document))

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        return answer(request, 200, openapi_document())

    @app.route("/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        return answer(request, 200, HEALTHY_BODY)

    @app.route("/ready", methods=["GET"])
    def ready(self, request: IRequest) -> bytes:
        reason = self.node.readiness.reason()
        if reason is None:
            return answer(request, 200, READY_BODY)
        return json_body(request, 503, {"status": "not_ready", "reason": reason})

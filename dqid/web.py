"""The REST API (v1) of one node, as a Klein app over a QueueNode.

Every error leaves as JSON ``{"error": code, "message": text}``; the
translation from domain exceptions happens once, in ``handle_errors``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed, NotFound

from .idempotency import IdempotencyConflict
from .node import NotReady, NotReplicated, PushItem, QueueNode
from .queue import Message, NotLeased, QueueFull, UnknownMessage

MAX_VISIBILITY = 43200.0
MAX_WAIT = 20.0
MAX_GET_COUNT = 100
MAX_BATCH = 1000
MAX_BATCH_BODY = 32 * 1024 * 1024  # bytes of JSON in one batch request
RETRY_AFTER_FULL = "1"
RETRY_AFTER_UNAVAILABLE = "1"


class ApiError(Exception):
    """An answer other than success, with its status and JSON code."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra or {}


def bad_request(message: str, code: str = "bad_request") -> ApiError:
    return ApiError(400, code, message)


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
    if isinstance(error, NotFound):
        return ApiError(404, "not_found", "no such resource")
    if isinstance(error, MethodNotAllowed):
        allowed = ", ".join(error.valid_methods or [])
        return ApiError(
            405, "method_not_allowed", "method not allowed here",
            {"Allow": allowed} if allowed else None,
        )
    return ApiError(500, "internal", "internal error")


# Reason phrases twisted.web does not know.
_PHRASES = {429: b"Too Many Requests"}


def json_body(request: IRequest, status: int, payload: Any) -> bytes:
    request.setResponseCode(status, _PHRASES.get(status))
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(payload, separators=(",", ":")).encode("utf-8")


def _arg(request: IRequest, name: str) -> str | None:
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    try:
        return values[-1].decode("ascii")
    except UnicodeDecodeError:
        raise bad_request(f"{name} must be a number") from None


def number_arg(
    request: IRequest, name: str, default: float, low: float, high: float,
    low_open: bool,
) -> float:
    """A query number in (low, high] when ``low_open`` else [low, high]."""
    text = _arg(request, name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise bad_request(f"{name} must be a number, got {text!r}") from None
    too_low = value <= low if low_open else value < low
    if math.isnan(value) or too_low or value > high:
        bracket = "(" if low_open else "["
        raise bad_request(f"{name} must be in {bracket}{low:g}, {high:g}], got {text}")
    return value


def int_arg(request: IRequest, name: str, low: int, high: int) -> int | None:
    text = _arg(request, name)
    if text is None:
        return None
    if not text.isdigit() or not low <= int(text) <= high:
        raise bad_request(f"{name} must be a whole number in [{low}, {high}], got {text!r}")
    return int(text)


def read_body(request: IRequest, limit: int) -> bytes:
    """The request body, or 413 if it is (or was announced) over ``limit``."""
    content = request.content
    if getattr(request, "body_too_large", False) or getattr(content, "overflowed", False):
        raise too_large(limit)
    content.seek(0)
    body = content.read(limit + 1)
    if len(body) > limit:
        raise too_large(limit)
    return body


def batch_body_limit(max_message_bytes: int) -> int:
    """Bytes a batch request may carry: one largest message, base64, at least."""
    return max(MAX_BATCH_BODY, max_message_bytes * 4 // 3 + 4096)


def too_large(limit: int, entry: int | None = None) -> ApiError:
    where = "" if entry is None else f"message {entry}: "
    return ApiError(
        413, "message_too_large", f"{where}a message may have at most {limit} bytes",
        extra={} if entry is None else {"index": entry},
    )


def encode_message(message: Message) -> dict[str, Any]:
    """A delivered message as a JSON object (batch get)."""
    entry: dict[str, Any] = {"id": message.id}
    try:
        entry["body"] = message.body.decode("utf-8")
    except UnicodeDecodeError:
        entry["body"] = base64.b64encode(message.body).decode("ascii")
        entry["encoding"] = "base64"
    entry["content_type"] = message.content_type or "application/octet-stream"
    entry["deliveries"] = message.deliveries
    return entry


def decode_batch(raw: bytes, limit: int) -> list[PushItem]:
    """``{"messages": [{"body", "encoding"?, "content_type"?}, ...]}``."""
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise bad_request("the body must be JSON") from None
    entries = document.get("messages") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise bad_request('the body must be {"messages": [...]} with at least one message')
    if len(entries) > MAX_BATCH:
        raise bad_request(f"a batch holds at most {MAX_BATCH} messages")
    items = []
    for index, entry in enumerate(entries):
        items.append(_decode_entry(index, entry, limit))
    return items


def _is_header_value(text: str) -> bool:
    return text.isprintable() and all(ord(c) < 256 for c in text)


def _decode_entry(index: int, entry: Any, limit: int) -> PushItem:
    def bad(what: str) -> ApiError:
        error = bad_request(f"message {index}: {what}")
        error.extra["index"] = index
        return error

    if not isinstance(entry, dict) or not isinstance(entry.get("body"), str):
        raise bad('needs a "body" string')
    encoding = entry.get("encoding")
    content_type = entry.get("content_type")
    if content_type is not None and not isinstance(content_type, str):
        raise bad('"content_type" must be a string')
    if content_type is not None and not _is_header_value(content_type):
        # It goes back out as a header of GET /get: latin-1, no controls.
        raise bad('"content_type" must be printable text that fits a header')
    if encoding is None:
        try:
            body = entry["body"].encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate such as "\ud800"
            raise bad("the body is not valid Unicode text") from None
    elif encoding == "base64":
        try:
            body = base64.b64decode(entry["body"], validate=True)
        except (binascii.Error, ValueError):
            raise bad("the body is not valid base64") from None
    else:
        raise bad(f'unknown encoding {encoding!r} (only "base64")')
    if not body:
        error = bad("the body is empty")
        error.code = "empty_message"
        raise error
    if len(body) > limit:
        raise too_large(limit, index)
    return PushItem(body, content_type)


class HttpApi:
    """The Klein app: routes of DESIGN.md's HTTP API over one QueueNode."""

    app = Klein()
    log = Logger()

    def __init__(self, node: QueueNode, max_message_bytes: int) -> None:
        self.node = node
        self.max_message_bytes = max_message_bytes

    def resource(self):
        return self.app.resource()

    # -- errors --------------------------------------------------------------

    @app.handle_errors(Exception)
    def _error(self, request: IRequest, failure: Failure) -> bytes | None:
        if failure.check(CancelledError):
            return None  # the client went away; nobody is listening
        error = _translate(failure)
        if error.status >= 500 and error.code == "internal":
            self.log.failure("unhandled error in {method} {path}", failure,
                             method=request.method, path=request.path)
        for name, value in error.headers.items():
            request.setHeader(name.encode("ascii"), value.encode("ascii"))
        payload = {"error": error.code, "message": error.message, **error.extra}
        return json_body(request, error.status, payload)

    # -- push ----------------------------------------------------------------

    @app.route("/push", methods=["POST"])
    async def push(self, request: IRequest) -> bytes:
        body = read_body(request, self.max_message_bytes)
        if not body:
            raise bad_request("the message body is empty", "empty_message")
        key = self._idempotency_key(request)
        content_type = request.getHeader(b"content-type")
        item = PushItem(body, content_type.decode("latin-1") if content_type else None)
        result = await self.node.push(item, key)
        return json_body(request, 201 if result.created else 200, {"id": result.ids[0]})

    @app.route("/push/batch", methods=["POST"])
    async def push_batch(self, request: IRequest) -> bytes:
        raw = read_body(request, batch_body_limit(self.max_message_bytes))
        items = decode_batch(raw, self.max_message_bytes)
        result = await self.node.push_many(items)
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
    async def get(self, request: IRequest) -> bytes:
        if request.method == b"HEAD":  # werkzeug adds HEAD; it must not lease
            raise MethodNotAllowed(valid_methods=["GET", "POST"])
        visibility = number_arg(
            request, "visibility", self.node.default_visibility, 0.0, MAX_VISIBILITY, True
        )
        wait = number_arg(request, "wait", 0.0, 0.0, MAX_WAIT, False)
        count = int_arg(request, "count", 1, MAX_GET_COUNT)
        taken = await self.node.get(visibility, wait, count or 1)
        if not taken:
            request.setResponseCode(204)
            return b""
        if count is not None:
            return json_body(request, 200, {"messages": [encode_message(m) for m in taken]})
        message = taken[0]
        request.setHeader(b"Dqid-Id", message.id.encode("ascii"))
        request.setHeader(b"Dqid-Deliveries", str(message.deliveries).encode("ascii"))
        request.setHeader(
            b"Content-Type",
            (message.content_type or "application/octet-stream").encode("latin-1"),
        )
        return message.body

    # -- ack, nack, touch ----------------------------------------------------

    @app.route("/ack/<message_id>", methods=["POST"])
    async def ack(self, request: IRequest, message_id: str) -> bytes:
        await self.node.ack(message_id)
        request.setResponseCode(204)
        return b""

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
        acked, unknown = [], []
        for message_id in ids:
            try:
                await self.node.ack(message_id)
            except UnknownMessage:
                unknown.append(message_id)
            else:
                acked.append(message_id)
        return json_body(request, 200, {"acked": acked, "unknown": unknown})

    @app.route("/nack/<message_id>", methods=["POST"])
    async def nack(self, request: IRequest, message_id: str) -> bytes:
        await self.node.nack(message_id)
        request.setResponseCode(204)
        return b""

    @app.route("/touch/<message_id>", methods=["POST"])
    async def touch(self, request: IRequest, message_id: str) -> bytes:
        visibility = number_arg(
            request, "visibility", self.node.default_visibility, 0.0, MAX_VISIBILITY, True
        )
        await self.node.touch(message_id, visibility)
        request.setResponseCode(204)
        return b""

    # -- introspection -------------------------------------------------------

    @app.route("/stats", methods=["GET"])
    def stats(self, request: IRequest) -> bytes:
        return json_body(request, 200, self.node.stats())

    @app.route("/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        return json_body(request, 200, {"status": "ok"})

    @app.route("/ready", methods=["GET"])
    def ready(self, request: IRequest) -> bytes:
        reason = self.node.readiness()
        if reason is None:
            return json_body(request, 200, {"status": "ready"})
        return json_body(request, 503, {"status": "not_ready", "reason": reason})

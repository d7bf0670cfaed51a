"""Reading requests and writing answers for the HTTP API: query values,
bodies and their limits, JSON and batch encodings, API errors."""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from typing import Any

from twisted.web.iweb import IRequest

from .node import PushItem
from .queue import Message


MAX_VISIBILITY = 43200.0
MAX_WAIT = 20.0
MAX_DELAY = 43200.0
MAX_HELD_COUNT = 1000
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


_PHRASES = {429: b"Too Many Requests"}

_encode_json = json.JSONEncoder(separators=(",", ":")).encode
# Constant answers of GET /health and GET /ready, encoded once.
HEALTHY_BODY = _encode_json({"status": "ok"}).encode("ascii")
READY_BODY = _encode_json({"status": "ready"}).encode("ascii")


def json_body(request: IRequest, status: int, payload: Any) -> bytes:
    return answer(request, status, _encode_json(payload).encode("utf-8"))


def answer(request: IRequest, status: int, body: bytes,
           content_type: bytes = b"application/json") -> bytes:
    """Status and type of an answer; returns its body (the resource adds
    its Content-Length)."""
    if status != 200:
        request.setResponseCode(status, _PHRASES.get(status))
    request.setHeader(b"Content-Type", content_type)
    return body


def no_content(request: IRequest) -> bytes:
    request.setResponseCode(204)
    return b""


# Content types, decoded or encoded once: a queue holds one copy of each.
_MAX_TYPES = 1024
_type_text: dict[bytes, str] = {}
_type_bytes: dict[str | None, bytes] = {None: b"application/octet-stream"}
_type_interned: dict[str, str] = {}


def content_type_text(raw: bytes) -> str:
    text = _type_text.get(raw)
    if text is None:
        text = intern_content_type(raw.decode("latin-1"))
        if len(_type_text) < _MAX_TYPES:
            _type_text[raw] = text
    return text


def intern_content_type(text: str) -> str:
    known = _type_interned.get(text)
    if known is not None:
        return known
    if len(_type_interned) < _MAX_TYPES:
        _type_interned[text] = text
    return text


def content_type_header(text: str | None) -> bytes:
    raw = _type_bytes.get(text)
    if raw is None:
        try:
            raw = text.encode("latin-1")  # type: ignore[union-attr]
        except UnicodeEncodeError:  # only a peer could send one: not a header value
            return b"application/octet-stream"
        if not _is_header_value(text):  # type: ignore[arg-type]
            return b"application/octet-stream"
        if len(_type_bytes) < _MAX_TYPES:
            _type_bytes[text] = raw
    return raw


def _arg(request: IRequest, name: str) -> str | None:
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    try:
        return values[-1].decode("ascii")
    except UnicodeDecodeError:
        raise bad_request(f"{name} must be ASCII") from None


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


def text_arg(request: IRequest, name: str) -> str:
    """A query value that must be there (a receipt)."""
    text = _arg(request, name)
    if not text:
        raise bad_request(f"{name} is required (the {name} of the delivery)")
    return text


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
    if isinstance(content, io.BytesIO):
        body = content.getvalue()  # the buffer itself, not a copy
    else:
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
    receipt = message.receipt
    if receipt is not None:
        entry["receipt"] = receipt
    return entry


def encode_held(message: Message) -> dict[str, Any]:
    """A held message as listed by GET /held (no body: peek for it)."""
    return {"id": message.id, "deliveries": message.deliveries,
            "content_type": message.content_type or "application/octet-stream",
            "bytes": len(message.body)}


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
    if content_type is not None:
        content_type = intern_content_type(content_type)
    delay = entry.get("delay")
    if delay is not None:
        if (isinstance(delay, bool) or not isinstance(delay, (int, float))
                or not 0 <= delay <= MAX_DELAY):
            raise bad(f'"delay" must be seconds in [0, {MAX_DELAY:g}]')
        delay = float(delay) or None
    return PushItem(body, content_type, delay)

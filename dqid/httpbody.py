"""A twisted.web Site whose requests never buffer a body over the size limit.

The limit depends on the request target (the batch endpoints take more),
and is known before the body: ``BoundedChannel`` keeps the request line of
the request whose head it is reading.  The announced Content-Length is
checked as soon as the headers are in: a body announced too large is
discarded as it arrives instead of being stored; a chunked body is stored
up to the limit and then discarded.  The handler answers 413 in both cases.
"""

from __future__ import annotations

import io
from typing import Any

from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site


BATCH_PATHS = (b"/push/batch", b"/ack")


class _CappedBody(io.BytesIO):
    """Keeps at most ``limit + 1`` bytes and remembers whether more came."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.overflowed = False

    def write(self, data: Any) -> int:
        if self.overflowed:
            return len(data)
        room = self.limit + 1 - self.tell()
        if len(data) > room:
            self.overflowed = True
            super().write(bytes(data[: max(room, 0)]))
            return len(data)
        return super().write(data)


class BoundedChannel(HTTPChannel):
    """An HTTPChannel that keeps the request line of the request whose head
    it is reading in ``request_line``, for the request to see before its
    body arrives (HTTPChannel keeps the target only in private attributes
    until the body is in).

    A request's head is its request line, its header lines and a blank
    line, each passed to ``lineReceived``; so the line after a blank one (or
    the first) is a request line.  (A stray blank line between requests is
    kept, then replaced by the request line after it.)
    """

    request_line = b""
    head_done = True  # the last line read ended a head: a request line is next

    def lineReceived(self, line: bytes) -> None:
        if self.head_done:
            self.request_line = line
        self.head_done = not line
        HTTPChannel.lineReceived(self, line)


def target_of(request_line: bytes) -> bytes:
    """The path of ``METHOD TARGET VERSION``, without its query (b"" if none)."""
    parts = request_line.split(b" ")
    return parts[1].split(b"?", 1)[0] if len(parts) == 3 else b""


class BoundedRequest(Request):
    """A request that keeps at most ``body_limit()`` bytes of its body.

    The limit is ``max_batch_body`` for the batch endpoints and ``max_body``
    for everything else, by the request line its channel is reading
    (``BoundedChannel.request_line``; another channel, such as a test's,
    gives ``max_body``).  It is looked up only for a body that could be
    over ``max_body``: chunked, or announced longer.
    """

    max_body: int = 262144
    max_batch_body: int = 262144
    body_too_large: bool = False

    def body_limit(self) -> int:
        if target_of(getattr(self.channel, "request_line", b"")) in BATCH_PATHS:
            return self.max_batch_body
        return self.max_body

    def gotLength(self, length: int | None) -> None:
        if length is not None and length <= self.max_body and length <= self.max_batch_body:
            limit = length  # within every limit: no need to know which applies
        else:
            limit = self.body_limit()
        if length is None:  # chunked: the size is known only at the end
            self.content = _CappedBody(limit)
        elif length > limit:
            self.body_too_large = True
            self.content = _CappedBody(0)
            self.content.overflowed = True
        else:  # no more than the announced length arrives: nothing to cap
            self.content = content = io.BytesIO()
            content.overflowed = False


class QuietSite(Site):
    """A Site of BoundedChannels, without the per-request access log
    (counters say enough).

    The channel is the protocol itself, not twisted.web's default wrapper
    that could switch a TLS connection to HTTP/2 (h2 is no dependency of
    dqid: the wrapper would always speak HTTP/1.1 anyway).
    """

    protocol = BoundedChannel

    def log(self, request: Request) -> None:
        pass


def bounded_site(resource: Any, max_body: int, max_batch_body: int) -> Site:
    """A Site whose requests keep at most ``max_body`` bytes of a body
    (``max_batch_body`` for the batch endpoints)."""
    request_class = type(
        "DqidRequest",
        (BoundedRequest,),
        {"max_body": max_body, "max_batch_body": max_batch_body},
    )
    # A body is a message, never a form: no form parsing (it would cost an
    # email-header parse per request with a Content-Type, and refuse a push
    # typed multipart/form-data whose body is not a valid form).
    site = QuietSite(resource, requestFactory=request_class, parsePOSTFormSubmission=False)
    site.displayTracebacks = False
    return site

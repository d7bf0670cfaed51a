"""A twisted.web Request that never buffers a body over the size limit.

The announced Content-Length is checked as soon as the headers are in: a
body announced too large is discarded as it arrives instead of being
stored; a chunked body is stored up to the limit and then discarded.  The
handler answers 413 in both cases.
"""

from __future__ import annotations

import io
from typing import Any

from twisted.web.server import Request, Site


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


class BoundedRequest(Request):
    max_body: int = 262144
    max_batch_body: int = 262144
    body_too_large: bool = False

    def _limit(self) -> int:
        # The request line is parsed before the headers; the channel holds
        # its path until the body is in.
        path = getattr(self.channel, "_path", b"") or b""
        if path.split(b"?", 1)[0] in (b"/push/batch", b"/ack"):
            return self.max_batch_body
        return self.max_body

    def gotLength(self, length: int | None) -> None:
        limit = self._limit()
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
    """A Site without the per-request access log (counters say enough)."""

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

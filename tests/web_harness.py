"""What the HTTP API tests share (tests/test_web_*.py): one standalone node
driven through StubTreq, and the same node's site over the real HTTP protocol.

No sockets and no reactor time: the node runs on a ``Clock`` that the tests
advance, and requests go through ``treq.testing.StubTreq`` (``flush()``
delivers answers that come later, such as long polls), or through the
server protocol of ``bounded_site`` over a ``StringTransport`` (:class:`Wire`).
Each test checks what an HTTP client relies on: status, headers and JSON
bodies of DESIGN.md's "HTTP API (v1)" and "Batches" tables, and that a
refused or abandoned request leaves the queue as it was.

A test module imports the fixtures it uses by name, and ``make`` with ``h``
(``h`` is built by ``make``, which checks for stray timers at the end).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterator

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.http_headers import Headers

from dqid.httpbody import bounded_site
from dqid.node import QueueNode
from dqid.web import MAX_VISIBILITY, HttpApi, batch_body_limit

from .helpers import successResultOf


BASE = "http://dqid.test"
URL_SAFE = re.compile(r"\A[A-Za-z0-9._~-]+\Z")


@dataclass
class Reply:
    code: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name.encode("ascii"))
        return values[-1].decode("latin-1") if values else None

    def json(self) -> Any:
        assert self.header("Content-Type") == "application/json", self
        return json.loads(self.body)


class Harness:
    """One standalone node on a Clock, its Klein app, and a StubTreq client."""

    def __init__(self, size: int = 5, max_message_bytes: int = 64,
                 max_deliveries: int = 0) -> None:
        self.clock = Clock()
        self.node = QueueNode(
            node_id="n1", size=size, clock=self.clock, epoch=1, visibility=30,
            max_deliveries=max_deliveries,
        )
        self.api = HttpApi(self.node, max_message_bytes=max_message_bytes)
        self.stub = StubTreq(self.api.resource())

    # -- requests ------------------------------------------------------------

    def send(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, Any] | None = None,
    ) -> Deferred:
        """Start a request; the Deferred fires with a Reply."""
        d = self.stub.request(method, BASE + path, data=body, headers=headers)

        def read(response: Any) -> Deferred:
            return self.stub.content(response).addCallback(
                lambda content: Reply(response.code, response.headers, content)
            )

        return d.addCallback(read)

    def call(self, method: str, path: str, body: bytes | None = None,
             headers: dict[str, Any] | None = None) -> Reply:
        """A request that must be answered at once."""
        return successResultOf(self.send(method, path, body, headers))

    def flush(self) -> None:
        self.stub.flush()

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.flush()

    # -- shortcuts -------------------------------------------------------------

    def push(self, body: bytes = b"work", content_type: str | None = None,
             key: str | None = None) -> str:
        headers = {}
        if content_type is not None:
            headers["Content-Type"] = content_type
        if key is not None:
            headers["Idempotency-Key"] = key
        reply = self.call("POST", "/push", body, headers)
        assert reply.code == 201, reply
        return reply.json()["id"]

    def take(self, query: str = "") -> Reply:
        reply = self.call("GET", "/get" + query)
        assert reply.code == 200, reply
        return reply

    def push_batch(self, messages: list[dict[str, Any]]) -> Reply:
        return self.call("POST", "/push/batch", json.dumps({"messages": messages}).encode())

    def stats(self) -> dict[str, Any]:
        reply = self.call("GET", "/stats")
        assert reply.code == 200, reply
        return reply.json()

    # -- end of test -----------------------------------------------------------

    def assert_no_stray_timers(self) -> None:
        """No parked gets and no timer that outlives its purpose: while a
        message is leased on a live node there is exactly the lease timer;
        otherwise at most a stale one, which fires once, changes nothing
        and leaves nothing behind."""
        stats = self.node.stats()
        assert stats["waiting_gets"] == 0
        pending = self.clock.getDelayedCalls()
        timed = stats["leased"] or stats["delayed"]  # the one timer is due
        if timed and self.node.readiness.refusal() is None:
            assert len(pending) == 1, pending
        elif not timed:
            assert len(pending) <= 1, pending
            self.clock.advance(MAX_VISIBILITY + 1)
            assert self.clock.getDelayedCalls() == []
            ageless = lambda stats: {k: v for k, v in stats.items()  # noqa: E731
                                     if k != "oldest_ready_age"}  # time passed
            assert ageless(self.node.stats()) == ageless(stats)


@pytest.fixture
def make() -> Iterator[Any]:
    made: list[Harness] = []

    def factory(**kw: Any) -> Harness:
        harness = Harness(**kw)
        made.append(harness)
        return harness

    yield factory
    for harness in made:
        harness.assert_no_stray_timers()


@pytest.fixture
def h(make: Any) -> Harness:
    return make()


def assert_error(reply: Reply, status: int, code: str) -> dict[str, Any]:
    """A JSON error body ``{"error": code, "message": text}`` with ``status``."""
    assert reply.code == status, reply
    assert reply.header("Content-Type") == "application/json", reply
    document = json.loads(reply.body)
    assert document["error"] == code, document
    assert isinstance(document["message"], str) and document["message"], document
    return document


def assert_retry_after(reply: Reply) -> None:
    value = reply.header("Retry-After")
    assert value is not None and value.isdigit(), reply


def bodies_in_order(h: Harness) -> list[bytes]:
    """Take every ready message (default lease) and return the bodies."""
    taken = []
    while (reply := h.call("GET", "/get")).code == 200:
        taken.append(reply.body)
    assert reply.code == 204
    return taken



class Wire:
    """The real HTTP server protocol of ``bounded_site`` over a StringTransport."""

    def __init__(self, max_message_bytes: int) -> None:
        self.clock = Clock()
        self.node = QueueNode(node_id="n1", size=5, clock=self.clock, epoch=1)
        api = HttpApi(self.node, max_message_bytes=max_message_bytes)
        self.site = bounded_site(
            api.resource(), max_message_bytes, batch_body_limit(max_message_bytes)
        )
        self.site.reactor = Clock()  # connection timeouts: never run

    def exchange(self, head: bytes, *body_parts: bytes) -> tuple[int, bytes]:
        status, _, body = self.exchange_raw(head, *body_parts)
        return status, body

    def exchange_raw(self, head: bytes, *body_parts: bytes) -> tuple[int, bytes, bytes]:
        """Status, raw header block (lower case) and body of one exchange."""
        protocol = self.site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(head + b"\r\n")
        for part in body_parts:
            protocol.dataReceived(part)
        raw = transport.value()
        protocol.connectionLost(None)
        head_part, _, body = raw.partition(b"\r\n\r\n")
        status_line, _, headers = head_part.partition(b"\r\n")
        if b"transfer-encoding: chunked" in headers.lower():
            body = dechunk(body)
        return int(status_line.split()[1]), headers.lower(), body


def dechunk(data: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out += data[:size]
        data = data[size + 2:]


def chunked(*parts: bytes) -> bytes:
    encoded = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)
    return encoded + b"0\r\n\r\n"

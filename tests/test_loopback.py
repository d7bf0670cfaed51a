"""One standalone node in this process, driven with real treq over a real
TCP port on 127.0.0.1, in the reactor that pytest-twisted runs.

The other HTTP tests (tests/test_web_*.py) use StubTreq and a Clock; these
check the same API through the whole stack a client meets: a listening
socket, Twisted's HTTP server and client, the bounded Site, and the node
on the real reactor's time.  Each test leaves no port, connection or timer
behind.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.protocols.policies import WrappingFactory
from twisted.web.client import Agent, HTTPConnectionPool

from dqid.httpbody import bounded_site
from dqid.ids import parse_id
from dqid.node import QueueNode
from dqid.web import HttpApi, batch_body_limit

MAX_MESSAGE_BYTES = 1024
# A test that gets no answer within this many seconds fails instead of hanging.
ANSWER_WITHIN = 5.0


async def pause(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


@dataclass
class Answer:
    code: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type") == "application/json", self
        return json.loads(self.body)


@dataclass
class Loopback:
    """A node listening on 127.0.0.1 and a treq client for it."""

    node: QueueNode
    port: IListeningPort
    client: HTTPClient

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"

    def request(self, method: str, path: str, body: bytes | None = None) -> Deferred:
        """Start a request; the Deferred fires with the whole Answer."""

        async def exchange() -> Answer:
            response = await self.client.request(method, self.url + path, data=body)
            content = await response.content()
            headers = {
                name.decode("ascii").lower(): values[-1].decode("latin-1")
                for name, values in response.headers.getAllRawHeaders()
            }
            return Answer(response.code, headers, content)

        return Deferred.fromCoroutine(exchange()).addTimeout(ANSWER_WITHIN, reactor)

    async def push(self, body: bytes) -> str:
        answer = await self.request("POST", "/push", body)
        assert answer.code == 201, answer
        return answer.json()["id"]

    async def stats(self) -> dict[str, Any]:
        answer = await self.request("GET", "/stats")
        assert answer.code == 200, answer
        return answer.json()


async def close_server_connections(wrapper: WrappingFactory) -> None:
    """Drop every connection the server still holds and wait until it is gone."""
    for protocol in list(wrapper.protocols):
        protocol.transport.loseConnection()
    deadline = time.monotonic() + ANSWER_WITHIN
    while wrapper.protocols:
        assert time.monotonic() < deadline, f"connections still open: {wrapper.protocols}"
        await pause(0.01)


@pytest_twisted.async_yield_fixture
async def loopback() -> AsyncIterator[Loopback]:
    timers_before = set(reactor.getDelayedCalls())
    node = QueueNode("n1", 5, reactor, epoch=1, visibility=30)
    api = HttpApi(node, max_message_bytes=MAX_MESSAGE_BYTES)
    site = bounded_site(
        api.resource(),
        max_body=MAX_MESSAGE_BYTES,
        max_batch_body=batch_body_limit(MAX_MESSAGE_BYTES),
    )
    # The wrapper keeps the server's open connections, to close them at the end.
    wrapper = WrappingFactory(site)
    port = reactor.listenTCP(0, wrapper, interface="127.0.0.1")
    pool = HTTPConnectionPool(reactor, persistent=True)
    client = HTTPClient(Agent(reactor, pool=pool))
    try:
        yield Loopback(node, port, client)
    finally:
        await pool.closeCachedConnections()
        await close_server_connections(wrapper)
        await port.stopListening()
        node.shutdown()
        # Lease timers and the like that the node left: they belong to no one now.
        for call in reactor.getDelayedCalls():
            if call not in timers_before and call.active():
                call.cancel()


@pytest_twisted.ensureDeferred
async def test_push_get_and_ack_over_a_real_socket(loopback):
    message_id = await loopback.push(b"real work")
    assert parse_id(message_id).node == "n1"

    answer = await loopback.request("GET", "/get")
    assert answer.code == 200
    assert answer.body == b"real work"
    assert answer.headers["dqid-id"] == message_id
    assert answer.headers["dqid-deliveries"] == "1"
    assert answer.headers["content-type"] == "application/octet-stream"
    stats = await loopback.stats()
    assert (stats["ready"], stats["leased"]) == (0, 1)

    acked = await loopback.request("POST", f"/ack/{message_id}")
    assert (acked.code, acked.body) == (204, b"")
    stats = await loopback.stats()
    assert (stats["depth"], stats["leased"]) == (0, 0)
    assert (await loopback.request("GET", "/get")).code == 204


@pytest_twisted.ensureDeferred
async def test_a_nacked_message_comes_back_with_two_deliveries(loopback):
    message_id = await loopback.push(b"again")
    first = await loopback.request("GET", "/get")
    assert first.headers["dqid-deliveries"] == "1"
    receipt = first.headers["dqid-receipt"]
    assert (await loopback.request("POST", f"/nack/{message_id}?receipt={receipt}")).code == 204
    answer = await loopback.request("GET", "/get")
    assert (answer.headers["dqid-id"], answer.headers["dqid-deliveries"]) == (
        message_id, "2",
    )
    assert (await loopback.request("POST", f"/ack/{message_id}")).code == 204


@pytest_twisted.ensureDeferred
async def test_a_long_poll_is_woken_by_a_push(loopback):
    polling = loopback.request("GET", "/get?wait=20")
    deadline = time.monotonic() + ANSWER_WITHIN
    while (await loopback.stats())["waiting_gets"] == 0:
        assert time.monotonic() < deadline, "the long poll never reached the node"
        await pause(0.01)
    assert not polling.called

    started = time.monotonic()
    message_id = await loopback.push(b"wake up")
    answer = await polling
    assert time.monotonic() - started < ANSWER_WITHIN  # woken, not timed out (20 s)
    assert answer.code == 200
    assert answer.body == b"wake up"
    assert answer.headers["dqid-id"] == message_id
    assert answer.headers["dqid-deliveries"] == "1"
    assert (await loopback.stats())["waiting_gets"] == 0
    assert (await loopback.request("POST", f"/ack/{message_id}")).code == 204


@pytest_twisted.ensureDeferred
async def test_ack_of_an_unknown_id_is_404(loopback):
    answer = await loopback.request("POST", "/ack/n1.1.zz")
    assert answer.code == 404
    document = answer.json()
    assert document["error"] == "unknown_message"
    assert isinstance(document["message"], str) and document["message"]

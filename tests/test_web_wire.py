"""The API over the real HTTP server protocol (no socket): bodies never
parsed as forms, answers framed by Content-Length, a long poll whose
client leaves.

See :mod:`tests.web_harness` for the harness."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.testing import StringTransport

from .web_harness import Wire


@pytest.mark.parametrize(
    "content_type",
    [b"multipart/form-data; boundary=zz", b"application/x-www-form-urlencoded"],
)
def test_wire_push_with_a_form_content_type_keeps_the_body_as_it_is(content_type):
    """Any bytes, any Content-Type: a body is never parsed as a form."""
    wire = Wire(max_message_bytes=64)
    status, _ = wire.exchange(
        b"POST /push HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\nContent-Length: 9\r\n"
        % content_type,
        b"count=abc",
    )
    assert status == 201
    status, body = wire.exchange(b"GET /get HTTP/1.1\r\nHost: x\r\n")
    assert (status, body) == (200, b"count=abc")
    message = next(wire.node.queue.messages())
    assert message.content_type == content_type.decode()


def test_wire_get_takes_its_parameters_from_the_query_only():
    wire = Wire(max_message_bytes=64)
    status, _ = wire.exchange(b"POST /push HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n", b"a")
    assert status == 201
    status, body = wire.exchange(
        b"POST /get HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 9\r\n",
        b"count=abc",
    )
    assert (status, body) == (200, b"a")


def test_wire_answers_carry_a_content_length_and_a_204_none():
    """Answers are framed by Content-Length, not chunked; 204 has no length."""
    wire = Wire(max_message_bytes=64)
    push = b"POST /push HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
    status, headers, body = wire.exchange_raw(push, b"abc")
    assert status == 201 and b"content-length: %d\r\n" % len(body) in headers + b"\r\n"
    message_id = json.loads(body)["id"].encode()
    status, headers, body = wire.exchange_raw(b"GET /get HTTP/1.1\r\nHost: x\r\n")
    assert (status, body) == (200, b"abc")
    assert b"content-length: 3" in headers and b"chunked" not in headers
    for request in (
        b"POST /ack/%s HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n" % message_id,
        b"GET /get HTTP/1.1\r\nHost: x\r\n",
    ):
        status, headers, body = wire.exchange_raw(request)
        assert (status, body) == (204, b"")
        assert b"content-length" not in headers and b"chunked" not in headers
    for request, code in (
        (b"GET /nope HTTP/1.1\r\nHost: x\r\n", 404),  # rendered by Klein itself
        (b"DELETE /push HTTP/1.1\r\nHost: x\r\n", 405),
        (b"POST /ack/nope HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n", 404),
    ):
        status, headers, body = wire.exchange_raw(request)
        assert status == code and json.loads(body)["error"]
        assert b"content-length: %d" % len(body) in headers and b"chunked" not in headers


def test_wire_long_poll_is_answered_by_a_push_and_forgotten_when_the_client_leaves():
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    wire = Wire(max_message_bytes=64)

    def connect(request: bytes) -> tuple[Any, StringTransport]:
        protocol = wire.site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(request)
        return protocol, transport

    poll, poll_transport = connect(b"GET /get?wait=10 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert poll_transport.value() == b"" and wire.node.stats()["waiting_gets"] == 1
    wire.exchange(b"POST /push HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n", b"work")
    answer = poll_transport.value()
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\nwork")
    assert b"content-length: 4\r\n" in answer.lower()
    poll.connectionLost(Failure(ConnectionDone()))

    gone, gone_transport = connect(b"GET /get?wait=10 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert wire.node.stats()["waiting_gets"] == 1
    gone.connectionLost(Failure(ConnectionDone()))
    assert wire.node.stats()["waiting_gets"] == 0
    wire.exchange(b"POST /push HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n", b"more")
    assert wire.node.queue.ready == 1  # not leased to the client that left

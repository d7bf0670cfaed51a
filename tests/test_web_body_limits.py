"""Bounded request bodies (dqid.httpbody): what a request stores of a body
over its limit, and the 413 a client gets over the real HTTP protocol.

See :mod:`tests.web_harness` for the harness."""

from __future__ import annotations

import json

import pytest
from twisted.web.test.requesthelper import DummyChannel

from dqid.httpbody import BoundedRequest, bounded_site

from .web_harness import Wire, chunked


# -- bounded request bodies (dqid.httpbody) -----------------------------------------------------


def bounded_request(max_body: int, max_batch_body: int, path: bytes) -> BoundedRequest:
    site = bounded_site(None, max_body=max_body, max_batch_body=max_batch_body)
    channel = DummyChannel()
    channel.request_line = b"POST %s HTTP/1.1" % path  # what BoundedChannel keeps of the request
    return site.requestFactory(channel)


def test_announced_length_over_the_limit_is_not_stored():
    request = bounded_request(8, 64, b"/push")
    request.gotLength(9)
    assert request.body_too_large
    request.handleContentChunk(b"x" * 9)
    assert request.content.getvalue() == b""


def test_announced_length_at_the_limit_is_stored():
    request = bounded_request(8, 64, b"/push")
    request.gotLength(8)
    assert not request.body_too_large
    request.handleContentChunk(b"x" * 8)
    assert request.content.getvalue() == b"x" * 8
    assert not request.content.overflowed


def test_chunked_body_over_the_limit_is_capped():
    request = bounded_request(8, 64, b"/push")
    request.gotLength(None)
    for _ in range(100):
        request.handleContentChunk(b"0123456789")
    assert request.content.overflowed
    assert len(request.content.getvalue()) <= 9


@pytest.mark.parametrize("path", [b"/push/batch", b"/ack", b"/push/batch?x=1"])
def test_batch_endpoints_get_the_batch_limit(path):
    request = bounded_request(8, 64, path)
    request.gotLength(64)
    assert not request.body_too_large
    request.handleContentChunk(b"x" * 64)
    assert request.content.getvalue() == b"x" * 64
    request = bounded_request(8, 64, path)
    request.gotLength(65)
    assert request.body_too_large



def test_wire_push_with_content_length_over_the_limit_is_413():
    wire = Wire(max_message_bytes=16)
    status, body = wire.exchange(
        b"POST /push HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\n", b"x" * 17
    )
    assert status == 413
    assert json.loads(body)["error"] == "message_too_large"
    assert wire.node.queue.depth == 0


def test_wire_push_chunked_over_the_limit_is_413():
    wire = Wire(max_message_bytes=16)
    status, body = wire.exchange(
        b"POST /push HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n",
        chunked(b"x" * 10, b"y" * 10),
    )
    assert status == 413
    assert json.loads(body)["error"] == "message_too_large"
    assert wire.node.queue.depth == 0


def test_wire_push_chunked_within_the_limit_is_201():
    wire = Wire(max_message_bytes=16)
    status, body = wire.exchange(
        b"POST /push HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n",
        chunked(b"x" * 8, b"y" * 8),
    )
    assert status == 201
    assert wire.node.queue.depth == 1
    message_id = json.loads(body)["id"]
    assert wire.node.lookup(message_id).body == b"x" * 8 + b"y" * 8


def test_wire_batch_may_be_larger_than_one_message():
    wire = Wire(max_message_bytes=16)
    document = json.dumps({"messages": [{"body": "x" * 16}] * 3}).encode()
    assert len(document) > 16
    status, body = wire.exchange(
        b"POST /push/batch HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % len(document),
        document,
    )
    assert status == 201, body
    assert len(json.loads(body)["ids"]) == 3

"""GET /get and POST /get without waiting: the message and its headers,
FIFO order, query ranges, leases that expire.

See :mod:`tests.web_harness` for the harness."""

from __future__ import annotations

import pytest

from dqid.replica import Record

from .web_harness import assert_error, bodies_in_order, h, make


# -- GET /get and POST /get ---------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_get_answers_the_message_with_its_headers(h, method):
    body = "héllo wörld".encode()
    message_id = h.push(body, content_type="text/plain; charset=utf-8")
    reply = h.call(method, "/get")
    assert reply.code == 200
    assert reply.body == body
    assert reply.header("Dqid-Id") == message_id
    assert reply.header("Dqid-Deliveries") == "1"
    assert reply.header("Content-Type") == "text/plain; charset=utf-8"
    stats = h.stats()
    assert (stats["ready"], stats["leased"]) == (0, 1)
    assert stats["counters"]["delivered"] == 1


def test_get_without_a_pushed_content_type_is_octet_stream(h):
    h.push(b"\x00\x01binary\xff")
    reply = h.take()
    assert reply.body == b"\x00\x01binary\xff"
    assert reply.header("Content-Type") == "application/octet-stream"


@pytest.mark.parametrize("content_type", ["caf\u20ac/x", "text/plain\r\nX-Evil: 1"])
def test_a_content_type_no_header_can_carry_comes_back_as_octet_stream(h, content_type):
    # Only a peer could hand one over (HTTP pushes are checked): never a 500.
    h.node.restore([Record("n1.1.9", b"from a peer", content_type)])
    reply = h.take()
    assert reply.body == b"from a peer"
    assert reply.header("Content-Type") == "application/octet-stream"


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_get_on_an_empty_queue_is_204(h, method):
    reply = h.call(method, "/get")
    assert reply.code == 204
    assert reply.body == b""
    assert h.stats()["counters"]["delivered"] == 0


def test_first_deliveries_are_fifo(h):
    for body in (b"1", b"2", b"3"):
        h.push(body)
    assert bodies_in_order(h) == [b"1", b"2", b"3"]


@pytest.mark.parametrize(
    "query",
    [
        "visibility=0", "visibility=-1", "visibility=43201", "visibility=abc",
        "visibility=nan", "visibility=inf", "visibility=",
        "wait=-1", "wait=20.5", "wait=abc", "wait=nan",
        "count=0", "count=101", "count=abc", "count=-1", "count=1.5",
    ],
)
def test_get_with_a_bad_query_is_400_and_leases_nothing(h, query):
    h.push(b"a")
    name = query.split("=")[0]
    for method in ("GET", "POST"):
        document = assert_error(h.call(method, "/get?" + query), 400, "bad_request")
        assert name in document["message"]
    stats = h.stats()
    assert (stats["ready"], stats["leased"]) == (1, 0)


@pytest.mark.parametrize(
    "query", ["visibility=43200", "visibility=0.5", "wait=0", "wait=20", "count=100"]
)
def test_get_accepts_the_ends_of_the_ranges(h, query):
    message_id = h.push(b"a")
    reply = h.take("?" + query)
    if query.startswith("count="):
        assert [m["id"] for m in reply.json()["messages"]] == [message_id]
    else:
        assert reply.header("Dqid-Id") == message_id
    assert h.call("POST", f"/ack/{message_id}").code == 204


def test_an_expired_lease_makes_the_message_ready_again(h):
    message_id = h.push(b"a")
    h.take()  # default visibility: 30 s
    h.clock.advance(29.9)
    assert h.call("GET", "/get").code == 204
    h.clock.advance(0.1)
    stats = h.stats()
    assert (stats["ready"], stats["leased"]) == (1, 0)
    reply = h.take()
    assert reply.header("Dqid-Id") == message_id
    assert reply.header("Dqid-Deliveries") == "2"
    assert h.stats()["counters"]["redelivered"] == 1


def test_the_visibility_query_sets_the_lease(h):
    message_id = h.push(b"a")
    h.take("?visibility=5")
    h.clock.advance(4.9)
    assert h.call("GET", "/get").code == 204
    h.clock.advance(0.1)
    assert h.take().header("Dqid-Id") == message_id

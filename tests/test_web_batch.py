"""Batches: POST /push/batch, GET /get?count=K and POST /ack with a list
of ids.

See :mod:`tests.web_harness` for the harness."""

from __future__ import annotations

import base64
import json

import pytest

from dqid.ids import parse_id

from .helpers import successResultOf
from .web_harness import (
    URL_SAFE,
    assert_error,
    assert_retry_after,
    bodies_in_order,
    h,
    make,
)


# -- POST /push/batch -------------------------------------------------------------------


def test_push_batch_answers_201_with_ids_in_order(h):
    reply = h.push_batch([
        {"body": "first"},
        {"body": base64.b64encode(b"\xff\x00second").decode(), "encoding": "base64",
         "content_type": "application/x-thing"},
        {"body": "third", "content_type": "text/plain"},
    ])
    assert reply.code == 201
    ids = reply.json()["ids"]
    assert len(ids) == 3 and len(set(ids)) == 3
    assert all(URL_SAFE.match(i) and parse_id(i).node == "n1" for i in ids)

    taken = [h.take() for _ in range(3)]
    assert [r.header("Dqid-Id") for r in taken] == ids
    assert [r.body for r in taken] == [b"first", b"\xff\x00second", b"third"]
    assert [r.header("Content-Type") for r in taken] == [
        "application/octet-stream", "application/x-thing", "text/plain",
    ]


def test_push_batch_is_all_or_nothing_when_full(make):
    h = make(size=3)
    h.push(b"already")
    reply = h.push_batch([{"body": "a"}, {"body": "b"}, {"body": "c"}])
    assert_error(reply, 429, "queue_full")
    assert_retry_after(reply)
    assert h.stats()["depth"] == 1
    assert h.push_batch([{"body": "a"}, {"body": "b"}]).code == 201
    assert bodies_in_order(h) == [b"already", b"a", b"b"]


@pytest.mark.parametrize(
    "bad_entry, code",
    [
        ({"body": 5}, "bad_request"),
        ({"nobody": "x"}, "bad_request"),
        ("just a string", "bad_request"),
        ({"body": "!!not base64!!", "encoding": "base64"}, "bad_request"),
        ({"body": "x", "encoding": "rot13"}, "bad_request"),
        ({"body": "x", "content_type": 7}, "bad_request"),
        # It must go back out as the Content-Type header of GET /get.
        ({"body": "x", "content_type": "text/plain; x=\u20ac"}, "bad_request"),
        ({"body": "x", "content_type": "text/plain\r\nX-Evil: 1"}, "bad_request"),
        ({"body": "\ud800"}, "bad_request"),  # a lone surrogate: not text
        ({"body": ""}, "empty_message"),
        ({"body": "", "encoding": "base64"}, "empty_message"),
    ],
)
def test_push_batch_names_the_bad_entry_and_queues_nothing(h, bad_entry, code):
    reply = h.push_batch([{"body": "ok"}, {"body": "ok too"}, bad_entry])
    document = assert_error(reply, 400, code)
    assert document["index"] == 2
    assert "2" in document["message"]
    assert h.stats()["depth"] == 0


def test_push_batch_oversized_entry_is_413_naming_it(make):
    h = make(max_message_bytes=10)
    reply = h.push_batch([{"body": "x" * 10}, {"body": "y" * 11}])
    document = assert_error(reply, 413, "message_too_large")
    assert document["index"] == 1
    assert h.stats()["depth"] == 0


def test_push_batch_limit_applies_to_decoded_bytes(make):
    h = make(max_message_bytes=10)
    ten = base64.b64encode(b"\x00" * 10).decode()  # 16 characters of base64
    assert h.push_batch([{"body": ten, "encoding": "base64"}]).code == 201
    eleven = base64.b64encode(b"\x00" * 11).decode()
    document = assert_error(
        h.push_batch([{"body": eleven, "encoding": "base64"}]), 413, "message_too_large"
    )
    assert document["index"] == 0


@pytest.mark.parametrize(
    "raw",
    [b"not json", b"[]", b'{"messages": []}', b'{"messages": "a"}', b"{}",
     b'{"messages": [{"body": "a"}]', b"\xff\xfe"],
)
def test_push_batch_with_a_bad_document_is_400(h, raw):
    assert_error(h.call("POST", "/push/batch", raw), 400, "bad_request")
    assert h.stats()["depth"] == 0


def test_push_batch_nested_too_deep_is_400_not_500(h):
    assert_error(
        h.call("POST", "/push/batch", b"[" * 100000 + b"]" * 100000), 400, "bad_request"
    )


def test_push_batch_content_type_comes_back_on_get(h):
    reply = h.push_batch([{"body": "x", "content_type": "text/plain; name=caf\u00e9"}])
    assert reply.code == 201
    assert h.take().headers.getRawHeaders(b"Content-Type") == [b"text/plain; name=caf\xe9"]


def test_push_batch_of_more_than_1000_is_400(make):
    h = make(size=2000)
    assert_error(h.push_batch([{"body": "a"}] * 1001), 400, "bad_request")
    assert h.stats()["depth"] == 0
    assert len(h.push_batch([{"body": "a"}] * 1000).json()["ids"]) == 1000


# -- GET /get?count=K -----------------------------------------------------------------------


def test_get_with_count_answers_json_messages(h):
    first = h.push("näive".encode(), content_type="text/plain; charset=utf-8")
    second = h.push(b"\xff\xfe\x00raw")
    third = h.push(b"third")

    reply = h.call("GET", "/get?count=2")
    assert reply.code == 200
    messages = reply.json()["messages"]
    assert [m["id"] for m in messages] == [first, second]

    text, binary = messages
    assert text["body"] == "näive"
    assert text.get("encoding") is None
    assert text["content_type"] == "text/plain; charset=utf-8"
    assert text["deliveries"] == 1
    assert binary["encoding"] == "base64"
    assert base64.b64decode(binary["body"]) == b"\xff\xfe\x00raw"
    assert binary["content_type"] == "application/octet-stream"
    assert binary["deliveries"] == 1

    rest = h.call("POST", "/get?count=100")
    assert [m["id"] for m in rest.json()["messages"]] == [third]
    assert h.call("GET", "/get?count=5").code == 204
    assert h.stats()["leased"] == 3


def test_get_with_count_1_is_still_json(h):
    message_id = h.push(b"a")
    reply = h.call("GET", "/get?count=1")
    assert [m["id"] for m in reply.json()["messages"]] == [message_id]


def test_get_with_count_reports_redeliveries(h):
    message_id = h.push(b"a")
    h.take("?visibility=1")
    h.clock.advance(1)
    (message,) = h.call("GET", "/get?count=10").json()["messages"]
    assert (message["id"], message["deliveries"]) == (message_id, 2)


def test_long_poll_with_count_gets_the_whole_batch(h):
    polling = h.send("GET", "/get?wait=5&count=3")
    h.flush()
    ids = h.push_batch([{"body": "a"}, {"body": "b"}]).json()["ids"]
    h.flush()
    reply = successResultOf(polling)
    assert [m["id"] for m in reply.json()["messages"]] == ids


# -- POST /ack (batch) ---------------------------------------------------------------------------


def test_batch_ack_reports_acked_and_unknown(h):
    ids = h.push_batch([{"body": "a"}, {"body": "b"}, {"body": "c"}]).json()["ids"]
    h.call("GET", "/get?count=2")
    reply = h.call(
        "POST", "/ack", json.dumps({"ids": [ids[0], "n1.1.zz", ids[2], ids[0]]}).encode()
    )
    assert reply.code == 200
    assert reply.json() == {"acked": [ids[0], ids[2]], "unknown": ["n1.1.zz", ids[0]]}
    stats = h.stats()
    assert (stats["depth"], stats["leased"], stats["ready"]) == (1, 1, 0)
    assert stats["counters"]["acked"] == 2


def test_batch_ack_of_nothing_is_fine(h):
    reply = h.call("POST", "/ack", b'{"ids": []}')
    assert (reply.code, reply.json()) == (200, {"acked": [], "unknown": []})


@pytest.mark.parametrize(
    "raw",
    [b"", b"nope", b"[]", b'{"ids": "n1.1.1"}', b'{"ids": [1]}', b"{}",
     b"[" * 100000 + b"]" * 100000],
)
def test_batch_ack_with_a_bad_document_is_400(h, raw):
    message_id = h.push(b"a")
    assert_error(h.call("POST", "/ack", raw), 400, "bad_request")
    assert h.stats()["depth"] == 1
    h.call("POST", f"/ack/{message_id}")

"""POST /push: ids, empty and oversized bodies, a full queue.

See :mod:`tests.web_harness` for the harness."""

from __future__ import annotations

from dqid.ids import parse_id

from .web_harness import URL_SAFE, assert_error, assert_retry_after, h, make


# -- POST /push ---------------------------------------------------------------


def test_push_answers_201_with_a_url_safe_id_naming_the_node(h):
    reply = h.call("POST", "/push", b"hello")
    assert reply.code == 201
    message_id = reply.json()["id"]
    assert URL_SAFE.match(message_id)
    assert parse_id(message_id).node == "n1"
    stats = h.stats()
    assert (stats["depth"], stats["ready"], stats["leased"]) == (1, 1, 0)
    assert stats["counters"]["pushed"] == 1


def test_push_gives_every_message_its_own_id(h):
    first, second = h.push(b"same"), h.push(b"same")
    assert first != second
    assert h.stats()["depth"] == 2


def test_push_empty_body_is_400_empty_message(h):
    assert_error(h.call("POST", "/push", b""), 400, "empty_message")
    assert h.stats()["depth"] == 0


def test_push_over_max_message_bytes_is_413(make):
    h = make(max_message_bytes=10)
    assert h.call("POST", "/push", b"x" * 10).code == 201
    assert_error(h.call("POST", "/push", b"x" * 11), 413, "message_too_large")
    assert h.stats()["depth"] == 1


def test_push_to_a_full_queue_is_429_and_evicts_nothing(make):
    h = make(size=2)
    first, second = h.push(b"a"), h.push(b"b")
    reply = h.call("POST", "/push", b"c")
    assert_error(reply, 429, "queue_full")
    assert_retry_after(reply)
    stats = h.stats()
    assert stats["depth"] == 2
    assert stats["counters"]["rejected_full"] == 1
    assert [h.take().header("Dqid-Id") for _ in range(2)] == [first, second]
    assert h.call("GET", "/get").code == 204


def test_leased_messages_count_against_the_size(make):
    h = make(size=1)
    message_id = h.push(b"a")
    h.take()
    assert_error(h.call("POST", "/push", b"b"), 429, "queue_full")
    assert h.call("POST", f"/ack/{message_id}").code == 204
    h.push(b"b")  # room again once acked

"""What workers rely on: receipts, held poison messages, delays and peeks
(DESIGN.md, "Workers").  See :mod:`tests.web_harness` for the harness."""

from __future__ import annotations

import json

import pytest

from .helpers import assertNoResult, successResultOf
from .web_harness import assert_error, h, make


def lease(h, query: str = "") -> tuple[str, str]:
    reply = h.take(query)
    return reply.header("Dqid-Id"), reply.header("Dqid-Receipt")


# -- receipts -------------------------------------------------------------------------


def test_every_delivery_has_a_new_receipt(h):
    message_id = h.push(b"a")
    first_id, first = lease(h, "?visibility=5")
    assert first_id == message_id and first
    h.clock.advance(5)  # the lease runs out
    second_id, second = lease(h)
    assert second_id == message_id and second != first


def test_batch_get_carries_receipts(h):
    h.push(b"a")
    h.push(b"b")
    messages = h.call("GET", "/get?count=2").json()["messages"]
    receipts = [m["receipt"] for m in messages]
    assert all(receipts) and len(set(receipts)) == 2


@pytest.mark.parametrize("verb", ["nack", "touch"])
def test_nack_and_touch_need_a_receipt(h, verb):
    message_id = h.push(b"a")
    h.take()
    document = assert_error(h.call("POST", f"/{verb}/{message_id}"), 400, "bad_request")
    assert "receipt" in document["message"]
    assert h.stats()["leased"] == 1


@pytest.mark.parametrize("verb", ["nack", "touch"])
def test_a_late_worker_cannot_touch_the_next_lease(h, verb):
    """Worker A's lease ran out, B took the message: A's nack or touch is
    409 lease_lost and B keeps its lease."""
    message_id = h.push(b"a")
    _, late = lease(h, "?visibility=5")
    h.clock.advance(5)
    _, current = lease(h, "?visibility=30")
    assert_error(h.call("POST", f"/{verb}/{message_id}?receipt={late}"), 409, "lease_lost")
    stats = h.stats()
    assert (stats["leased"], stats["ready"]) == (1, 0)
    h.clock.advance(29.9)  # B's lease is as long as B took it
    assert h.call("GET", "/get").code == 204
    assert h.call("POST", f"/ack/{message_id}").code == 204  # an ack needs no receipt


def test_a_nacked_receipt_is_spent(h):
    message_id = h.push(b"a")
    _, receipt = lease(h)
    assert h.call("POST", f"/nack/{message_id}?receipt={receipt}").code == 204
    assert_error(h.call("POST", f"/nack/{message_id}?receipt={receipt}"), 409, "lease_lost")
    assert_error(h.call("POST", f"/touch/{message_id}?receipt={receipt}"), 409, "lease_lost")


# -- delays ---------------------------------------------------------------------------


def test_a_delayed_push_is_not_delivered_early_and_then_joins_the_end(h):
    late = h.call("POST", "/push?delay=10", b"later").json()["id"]
    first = h.push(b"first")
    stats = h.stats()
    assert (stats["delayed"], stats["ready"], stats["depth"]) == (1, 1, 2)
    assert lease(h)[0] == first
    h.clock.advance(9.9)
    assert h.call("GET", "/get").code == 204
    h.push(b"second")
    h.clock.advance(0.1)
    # Due now: it joins the end of the line, behind what was queued before.
    assert [lease(h)[0] for _ in range(2)][1] == late
    assert h.stats()["delayed"] == 0


def test_a_delayed_push_answers_a_long_poll_when_it_is_due(h):
    message_id = h.call("POST", "/push?delay=3", b"later").json()["id"]
    polling = h.send("GET", "/get?wait=5")
    h.advance(2.9)
    assertNoResult(polling)
    h.advance(0.1)
    reply = successResultOf(polling)
    assert reply.header("Dqid-Id") == message_id


def test_batch_entries_take_a_delay(h):
    reply = h.push_batch([{"body": "now"}, {"body": "later", "delay": 60}])
    now, later = reply.json()["ids"]
    assert h.stats()["delayed"] == 1
    assert lease(h)[0] == now
    assert h.call("POST", f"/ack/{now}").code == 204
    assert h.call("GET", "/get").code == 204
    h.clock.advance(60)
    assert lease(h)[0] == later


@pytest.mark.parametrize("entry", [{"body": "x", "delay": -1}, {"body": "x", "delay": "5"},
                                   {"body": "x", "delay": 43201}, {"body": "x", "delay": True}])
def test_a_bad_batch_delay_is_400_naming_the_entry(h, entry):
    document = assert_error(h.push_batch([{"body": "ok"}, entry]), 400, "bad_request")
    assert document["index"] == 1
    assert h.stats()["depth"] == 0


@pytest.mark.parametrize("delay", ["-1", "43201", "soon", "nan"])
def test_a_bad_delay_is_400(h, delay):
    assert_error(h.call("POST", f"/push?delay={delay}", b"x"), 400, "bad_request")
    message_id = h.push(b"a")
    _, receipt = lease(h)
    assert_error(h.call("POST", f"/nack/{message_id}?receipt={receipt}&delay={delay}"),
                 400, "bad_request")
    assert h.stats()["leased"] == 1


def test_a_nack_with_a_delay_backs_off(h):
    message_id = h.push(b"a")
    _, receipt = lease(h)
    assert h.call("POST", f"/nack/{message_id}?receipt={receipt}&delay=30").code == 204
    assert h.stats()["delayed"] == 1
    h.clock.advance(29.9)
    assert h.call("GET", "/get").code == 204
    h.clock.advance(0.1)
    again = h.take()
    assert (again.header("Dqid-Id"), again.header("Dqid-Deliveries")) == (message_id, "2")


# -- held poison messages ---------------------------------------------------------------


def test_a_message_delivered_max_deliveries_times_is_held_not_dropped(make):
    h = make(max_deliveries=2)
    message_id = h.push(b"poison", content_type="text/plain")
    _, receipt = lease(h)
    h.call("POST", f"/nack/{message_id}?receipt={receipt}")
    lease(h, "?visibility=5")
    h.clock.advance(5)  # the second lease runs out: held
    assert h.call("GET", "/get").code == 204
    stats = h.stats()
    assert (stats["held"], stats["depth"], stats["ready"]) == (1, 1, 0)
    listed = h.call("GET", "/held").json()["messages"]
    assert listed == [{"id": message_id, "deliveries": 2, "content_type": "text/plain",
                       "bytes": 6}]
    # A held message takes room: --size still bounds everything kept.
    for _ in range(4):
        h.push(b"fill")
    assert_error(h.call("POST", "/push", b"over"), 429, "queue_full")
    # A person decides: kick it back into the line.
    assert h.call("POST", f"/kick/{message_id}").code == 204
    assert h.stats()["held"] == 0
    assert_error(h.call("POST", f"/kick/{message_id}"), 409, "not_held")
    assert_error(h.call("POST", "/kick/n1.1.zz"), 404, "unknown_message")
    again = h.take()
    assert (again.header("Dqid-Id"), again.header("Dqid-Deliveries")) == (message_id, "3")


def test_a_held_message_is_removed_by_an_ack(make):
    h = make(max_deliveries=1)
    message_id = h.push(b"poison")
    _, receipt = lease(h)
    h.call("POST", f"/nack/{message_id}?receipt={receipt}")
    assert h.stats()["held"] == 1
    assert h.call("POST", f"/ack/{message_id}").code == 204
    assert h.stats()["depth"] == 0
    assert h.call("GET", "/held").json() == {"messages": []}


def test_held_lists_at_most_count(make):
    h = make(max_deliveries=1, size=10)
    for n in range(3):
        h.push(b"%d" % n)
    for _ in range(3):
        message_id, receipt = lease(h)
        h.call("POST", f"/nack/{message_id}?receipt={receipt}")
    assert len(h.call("GET", "/held?count=2").json()["messages"]) == 2
    assert len(h.call("GET", "/held").json()["messages"]) == 3
    for count in ("0", "1001", "x"):
        assert_error(h.call("GET", f"/held?count={count}"), 400, "bad_request")


def test_no_limit_by_default(h):
    message_id = h.push(b"a")
    for _ in range(20):
        _, receipt = lease(h)
        h.call("POST", f"/nack/{message_id}?receipt={receipt}")
    assert h.stats()["held"] == 0 and h.stats()["ready"] == 1


# -- peek -------------------------------------------------------------------------------


def test_peek_shows_a_message_in_every_state_and_changes_nothing(make):
    h = make(max_deliveries=1)
    message_id = h.push(b"look", content_type="text/plain")

    def peek():
        reply = h.call("GET", f"/messages/{message_id}")
        assert reply.code == 200 and reply.body == b"look"
        assert reply.header("Dqid-Id") == message_id
        assert reply.header("Content-Type") == "text/plain"
        return reply.header("Dqid-State"), reply.header("Dqid-Deliveries")

    assert peek() == ("ready", "0")
    assert h.stats()["counters"]["delivered"] == 0  # no delivery counted
    _, receipt = lease(h)
    assert peek() == ("leased", "1")
    h.call("POST", f"/nack/{message_id}?receipt={receipt}")
    assert peek() == ("held", "1")
    h.call("POST", f"/kick/{message_id}")
    assert peek() == ("ready", "1")
    delayed = h.call("POST", "/push?delay=5", b"look").json()["id"]
    assert h.call("GET", f"/messages/{delayed}").header("Dqid-State") == "delayed"
    h.clock.advance(5)
    assert h.stats()["ready"] == 2 and h.stats()["leased"] == 0


def test_peek_of_an_unknown_message_is_404(h):
    assert_error(h.call("GET", "/messages/n1.1.zz"), 404, "unknown_message")
    assert_error(h.call("GET", "/messages/nonsense"), 404, "unknown_message")

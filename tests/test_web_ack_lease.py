"""POST /ack/{id}, /nack/{id} and /touch/{id}: ending, returning and
changing a lease.

See :mod:`tests.web_harness` for the harness."""

from __future__ import annotations

import pytest

from .web_harness import assert_error, h, make


# -- ack, nack, touch ---------------------------------------------------------------


def test_ack_removes_the_message(h):
    message_id = h.push(b"a")
    h.take()
    reply = h.call("POST", f"/ack/{message_id}")
    assert (reply.code, reply.body) == (204, b"")
    stats = h.stats()
    assert (stats["depth"], stats["leased"]) == (0, 0)
    assert stats["counters"]["acked"] == 1
    h.clock.advance(60)  # no lease left to expire
    assert h.call("GET", "/get").code == 204


def test_ack_twice_is_404_unknown_message(h):
    message_id = h.push(b"a")
    h.take()
    assert h.call("POST", f"/ack/{message_id}").code == 204
    assert_error(h.call("POST", f"/ack/{message_id}"), 404, "unknown_message")
    assert h.stats()["counters"]["acked"] == 1


@pytest.mark.parametrize("verb", ["ack", "nack", "touch"])
@pytest.mark.parametrize("message_id", ["n1.1.zz", "not-an-id", "other.1.1"])
def test_unknown_ids_are_404_unknown_message(h, verb, message_id):
    query = "" if verb == "ack" else "?receipt=r1"
    assert_error(h.call("POST", f"/{verb}/{message_id}{query}"), 404, "unknown_message")


def test_ack_of_a_ready_message_removes_it(h):
    message_id = h.push(b"a")
    assert h.call("POST", f"/ack/{message_id}").code == 204
    assert h.stats()["depth"] == 0
    assert h.call("GET", "/get").code == 204


def test_nack_makes_the_message_ready_now(h):
    message_id = h.push(b"a")
    receipt = h.take().header("Dqid-Receipt")
    reply = h.call("POST", f"/nack/{message_id}?receipt={receipt}")
    assert (reply.code, reply.body) == (204, b"")
    stats = h.stats()
    assert (stats["ready"], stats["leased"]) == (1, 0)
    again = h.take()
    assert again.header("Dqid-Id") == message_id
    assert again.header("Dqid-Deliveries") == "2"


def test_nack_of_a_ready_message_is_409_lease_lost_and_changes_nothing(h):
    first, second = h.push(b"a"), h.push(b"b")
    assert_error(h.call("POST", f"/nack/{second}?receipt=r1"), 409, "lease_lost")
    stats = h.stats()
    assert (stats["ready"], stats["leased"]) == (2, 0)
    assert [h.take().header("Dqid-Id") for _ in range(2)] == [first, second]


def test_nack_after_ack_is_404(h):
    message_id = h.push(b"a")
    receipt = h.take().header("Dqid-Receipt")
    h.call("POST", f"/ack/{message_id}")
    assert_error(h.call("POST", f"/nack/{message_id}?receipt={receipt}"), 404,
                 "unknown_message")


def test_touch_extends_the_lease(h):
    message_id = h.push(b"a")
    receipt = h.take("?visibility=10").header("Dqid-Receipt")
    h.clock.advance(5)
    reply = h.call("POST", f"/touch/{message_id}?visibility=20&receipt={receipt}")
    assert (reply.code, reply.body) == (204, b"")
    h.clock.advance(5)  # the old deadline (10 s) passes
    assert h.call("GET", "/get").code == 204
    assert h.stats()["leased"] == 1
    h.clock.advance(14.9)  # just before the new deadline (25 s)
    assert h.call("GET", "/get").code == 204
    h.clock.advance(0.1)
    reply = h.take()
    assert reply.header("Dqid-Id") == message_id
    assert reply.header("Dqid-Deliveries") == "2"


def test_touch_can_shorten_the_lease(h):
    message_id = h.push(b"a")
    receipt = h.take("?visibility=30").header("Dqid-Receipt")
    assert h.call("POST", f"/touch/{message_id}?visibility=1&receipt={receipt}").code == 204
    h.clock.advance(1)
    assert h.take().header("Dqid-Id") == message_id


def test_touch_without_visibility_uses_the_default_lease(h):
    message_id = h.push(b"a")
    receipt = h.take("?visibility=5").header("Dqid-Receipt")
    assert h.call("POST", f"/touch/{message_id}?receipt={receipt}").code == 204
    h.clock.advance(29.9)
    assert h.call("GET", "/get").code == 204
    h.clock.advance(0.1)
    assert h.take().header("Dqid-Id") == message_id


def test_touch_on_a_ready_message_is_409_lease_lost(h):
    message_id = h.push(b"a")
    assert_error(h.call("POST", f"/touch/{message_id}?receipt=r1"), 409, "lease_lost")
    assert h.stats()["ready"] == 1


@pytest.mark.parametrize("visibility", ["0", "43201", "soon"])
def test_touch_with_a_bad_visibility_is_400(h, visibility):
    message_id = h.push(b"a")
    receipt = h.take("?visibility=10").header("Dqid-Receipt")
    assert_error(
        h.call("POST", f"/touch/{message_id}?visibility={visibility}&receipt={receipt}"),
        400, "bad_request"
    )
    h.clock.advance(10)  # the lease was not changed
    assert h.take().header("Dqid-Id") == message_id

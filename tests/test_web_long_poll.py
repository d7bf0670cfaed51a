"""Long polls (GET /get?wait=N): answered by a push, a nack or an expired
lease, by 204 when the wait is over or at shutdown, forgotten when the
client hangs up.

See :mod:`tests.web_harness` for the harness."""

from __future__ import annotations

from .helpers import assertNoResult, failureResultOf, successResultOf
from .web_harness import h, make


# -- long polls -------------------------------------------------------------------


def test_long_poll_is_answered_by_a_later_push(h):
    polling = h.send("GET", "/get?wait=5")
    h.flush()
    assertNoResult(polling)
    assert h.stats()["waiting_gets"] == 1

    h.clock.advance(2)
    message_id = h.push(b"late", content_type="text/plain")
    h.flush()
    reply = successResultOf(polling)
    assert reply.code == 200
    assert reply.body == b"late"
    assert reply.header("Dqid-Id") == message_id
    assert reply.header("Content-Type") == "text/plain"
    stats = h.stats()
    assert (stats["waiting_gets"], stats["ready"], stats["leased"]) == (0, 0, 1)
    # The wait timer is gone; only the lease timer is left.
    assert len(h.clock.getDelayedCalls()) == 1


def test_long_poll_takes_the_lease_it_asked_for(h):
    polling = h.send("GET", "/get?wait=5&visibility=3")
    message_id = h.push(b"late")
    h.flush()
    assert successResultOf(polling).code == 200
    h.clock.advance(3)
    assert h.take().header("Dqid-Id") == message_id


def test_long_poll_answers_204_when_the_wait_is_over(h):
    polling = h.send("POST", "/get?wait=5")
    h.advance(4.9)
    assertNoResult(polling)
    h.advance(0.1)
    reply = successResultOf(polling)
    assert reply.code == 204
    assert reply.body == b""
    assert h.stats()["waiting_gets"] == 0
    assert h.clock.getDelayedCalls() == []
    # A message pushed now stays ready for the next get.
    h.push(b"a")
    assert h.stats()["ready"] == 1


def test_long_poll_abandoned_by_the_client_is_forgotten(h):
    polling = h.send("GET", "/get?wait=5")
    h.flush()
    assert h.stats()["waiting_gets"] == 1
    polling.cancel()  # the client hangs up
    h.flush()
    failureResultOf(polling)
    assert h.stats()["waiting_gets"] == 0
    assert h.clock.getDelayedCalls() == []  # its wait timer is cancelled

    message_id = h.push(b"a")
    h.flush()
    stats = h.stats()
    assert (stats["ready"], stats["leased"]) == (1, 0)
    assert stats["counters"]["delivered"] == 0
    reply = h.take()
    assert reply.header("Dqid-Id") == message_id
    assert reply.header("Dqid-Deliveries") == "1"


def test_two_long_polls_each_get_one_message(h):
    first = h.send("GET", "/get?wait=10")
    second = h.send("GET", "/get?wait=10")
    h.flush()
    assert h.stats()["waiting_gets"] == 2
    reply = h.push_batch([{"body": "a"}, {"body": "b"}])
    assert reply.code == 201
    h.flush()
    replies = [successResultOf(first), successResultOf(second)]
    assert sorted(r.body for r in replies) == [b"a", b"b"]
    assert {r.header("Dqid-Id") for r in replies} == set(reply.json()["ids"])
    assert h.stats()["waiting_gets"] == 0


def test_long_poll_is_answered_by_a_nack(h):
    message_id = h.push(b"a")
    receipt = h.take().header("Dqid-Receipt")
    polling = h.send("GET", "/get?wait=5")
    h.flush()
    assertNoResult(polling)
    assert h.call("POST", f"/nack/{message_id}?receipt={receipt}").code == 204
    h.flush()
    reply = successResultOf(polling)
    assert reply.header("Dqid-Id") == message_id
    assert reply.header("Dqid-Deliveries") == "2"


def test_long_poll_is_answered_by_an_expired_lease(h):
    message_id = h.push(b"a")
    h.take("?visibility=2")
    polling = h.send("GET", "/get?wait=5")
    h.advance(2)
    reply = successResultOf(polling)
    assert reply.header("Dqid-Id") == message_id
    assert reply.header("Dqid-Deliveries") == "2"


def test_long_polls_waiting_at_shutdown_are_answered_204(h):
    polls = [h.send("GET", "/get?wait=20"), h.send("POST", "/get?wait=5&count=3")]
    h.flush()
    assert h.stats()["waiting_gets"] == 2
    h.node.shutdown()
    h.flush()
    assert [successResultOf(p).code for p in polls] == [204, 204]
    assert h.clock.getDelayedCalls() == []


def test_a_long_poll_after_shutdown_does_not_wait(h):
    h.node.shutdown()
    reply = h.call("GET", "/get?wait=20")
    assert reply.code == 204
    assert h.clock.getDelayedCalls() == []

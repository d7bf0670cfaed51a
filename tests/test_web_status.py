"""GET /stats, /health and /ready, and what a node that shut down answers.

See :mod:`tests.web_harness` for the harness."""

from __future__ import annotations

from .web_harness import assert_error, assert_retry_after, h, make


# -- stats, health, ready -----------------------------------------------------------


def test_stats_reports_the_queue(make):
    h = make(size=7)
    first = h.push(b"a")
    h.push(b"b")
    h.push(b"c")
    receipt = h.take().header("Dqid-Receipt")
    h.call("POST", f"/nack/{first}?receipt={receipt}")
    h.take()  # first again: a redelivery
    h.call("POST", f"/ack/{first}")
    h.take()
    for _ in range(5):
        h.push(b"fill")
    assert h.call("POST", "/push", b"over").code == 429

    stats = h.stats()
    assert stats["node"] == "n1"
    assert stats["size"] == 7
    assert (stats["depth"], stats["ready"], stats["leased"]) == (7, 6, 1)
    assert stats["min_copies"] == 1
    counters = stats["counters"]
    assert {k: counters[k] for k in
            ("pushed", "delivered", "redelivered", "acked", "rejected_full")} == {
        "pushed": 8, "delivered": 3, "redelivered": 1, "acked": 1, "rejected_full": 1,
    }
    assert stats["peers"] == {}


def test_health_is_ok(h):
    reply = h.call("GET", "/health")
    assert (reply.code, reply.json()) == (200, {"status": "ok"})


def test_ready_is_200_while_serving(h):
    reply = h.call("GET", "/ready")
    assert (reply.code, reply.json()) == (200, {"status": "ready"})


def test_after_shutdown_ready_is_503_and_pushes_are_refused(h):
    h.node.shutdown()
    reply = h.call("GET", "/ready")
    assert reply.code == 503
    document = reply.json()
    assert document["status"] == "not_ready"
    assert isinstance(document["reason"], str) and document["reason"]

    for path, body in (("/push", b"a"),
                       ("/push/batch", b'{"messages": [{"body": "a"}]}')):
        refused = h.call("POST", path, body)
        assert_error(refused, 503, "not_ready")
        assert_retry_after(refused)
    assert h.stats()["depth"] == 0
    # The process is still alive.
    assert h.call("GET", "/health").code == 200

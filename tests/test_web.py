"""The HTTP API (v1) of one standalone node, driven through StubTreq.

No sockets and no reactor time: the node runs on a ``Clock`` that the tests
advance, and requests go through ``treq.testing.StubTreq`` (``flush()``
delivers answers that come later, such as long polls).  Each test checks
what an HTTP client relies on: status, headers and JSON bodies of
DESIGN.md's "HTTP API (v1)" and "Batches" tables, and that a refused or
abandoned request leaves the queue as it was.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from typing import Any, Iterator

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyChannel

from dqid.httpbody import BoundedRequest, bounded_site
from dqid.ids import parse_id
from dqid.node import QueueNode
from dqid.web import MAX_VISIBILITY, HttpApi, batch_body_limit

from .helpers import assertNoResult, failureResultOf, successResultOf

BASE = "http://dqid.test"
URL_SAFE = re.compile(r"\A[A-Za-z0-9._~-]+\Z")


@dataclass
class Reply:
    code: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name.encode("ascii"))
        return values[-1].decode("latin-1") if values else None

    def json(self) -> Any:
        assert self.header("Content-Type") == "application/json", self
        return json.loads(self.body)


class Harness:
    """One standalone node on a Clock, its Klein app, and a StubTreq client."""

    def __init__(self, size: int = 5, max_message_bytes: int = 64) -> None:
        self.clock = Clock()
        self.node = QueueNode(
            node_id="n1", size=size, clock=self.clock, epoch=1, visibility=30
        )
        self.api = HttpApi(self.node, max_message_bytes=max_message_bytes)
        self.stub = StubTreq(self.api.resource())

    # -- requests ------------------------------------------------------------

    def send(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, Any] | None = None,
    ) -> Deferred:
        """Start a request; the Deferred fires with a Reply."""
        d = self.stub.request(method, BASE + path, data=body, headers=headers)

        def read(response: Any) -> Deferred:
            return self.stub.content(response).addCallback(
                lambda content: Reply(response.code, response.headers, content)
            )

        return d.addCallback(read)

    def call(self, method: str, path: str, body: bytes | None = None,
             headers: dict[str, Any] | None = None) -> Reply:
        """A request that must be answered at once."""
        return successResultOf(self.send(method, path, body, headers))

    def flush(self) -> None:
        self.stub.flush()

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.flush()

    # -- shortcuts -------------------------------------------------------------

    def push(self, body: bytes = b"work", content_type: str | None = None,
             key: str | None = None) -> str:
        headers = {}
        if content_type is not None:
            headers["Content-Type"] = content_type
        if key is not None:
            headers["Idempotency-Key"] = key
        reply = self.call("POST", "/push", body, headers)
        assert reply.code == 201, reply
        return reply.json()["id"]

    def take(self, query: str = "") -> Reply:
        reply = self.call("GET", "/get" + query)
        assert reply.code == 200, reply
        return reply

    def push_batch(self, messages: list[dict[str, Any]]) -> Reply:
        return self.call("POST", "/push/batch", json.dumps({"messages": messages}).encode())

    def stats(self) -> dict[str, Any]:
        reply = self.call("GET", "/stats")
        assert reply.code == 200, reply
        return reply.json()

    # -- end of test -----------------------------------------------------------

    def assert_no_stray_timers(self) -> None:
        """No parked gets and no timer that outlives its purpose: while a
        message is leased on a live node there is exactly the lease timer;
        otherwise at most a stale one, which fires once, changes nothing
        and leaves nothing behind."""
        stats = self.node.stats()
        assert stats["waiting_gets"] == 0
        pending = self.clock.getDelayedCalls()
        if stats["leased"] and self.node.is_ready:
            assert len(pending) == 1, pending
        elif not stats["leased"]:
            assert len(pending) <= 1, pending
            self.clock.advance(MAX_VISIBILITY + 1)
            assert self.clock.getDelayedCalls() == []
            assert self.node.stats() == stats


@pytest.fixture
def make() -> Iterator[Any]:
    made: list[Harness] = []

    def factory(**kw: Any) -> Harness:
        harness = Harness(**kw)
        made.append(harness)
        return harness

    yield factory
    for harness in made:
        harness.assert_no_stray_timers()


@pytest.fixture
def h(make: Any) -> Harness:
    return make()


def assert_error(reply: Reply, status: int, code: str) -> dict[str, Any]:
    """A JSON error body ``{"error": code, "message": text}`` with ``status``."""
    assert reply.code == status, reply
    assert reply.header("Content-Type") == "application/json", reply
    document = json.loads(reply.body)
    assert document["error"] == code, document
    assert isinstance(document["message"], str) and document["message"], document
    return document


def assert_retry_after(reply: Reply) -> None:
    value = reply.header("Retry-After")
    assert value is not None and value.isdigit(), reply


def bodies_in_order(h: Harness) -> list[bytes]:
    """Take every ready message (default lease) and return the bodies."""
    taken = []
    while (reply := h.call("GET", "/get")).code == 200:
        taken.append(reply.body)
    assert reply.code == 204
    return taken


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


# -- Idempotency-Key ------------------------------------------------------------


def test_idempotent_retry_answers_200_with_the_first_id(h):
    message_id = h.push(b"body", key="k1")
    reply = h.call("POST", "/push", b"body", {"Idempotency-Key": "k1"})
    assert reply.code == 200
    assert reply.json() == {"id": message_id}
    stats = h.stats()
    assert stats["depth"] == 1
    assert stats["counters"]["pushed"] == 1


def test_idempotent_retry_is_answered_even_when_the_queue_is_now_full(make):
    h = make(size=1)
    message_id = h.push(b"body", key="k1")
    assert_error(h.call("POST", "/push", b"other"), 429, "queue_full")
    reply = h.call("POST", "/push", b"body", {"Idempotency-Key": "k1"})
    assert reply.code == 200
    assert reply.json() == {"id": message_id}
    assert h.stats()["depth"] == 1


def test_idempotency_key_with_another_body_is_409(h):
    h.push(b"body", key="k1")
    assert_error(
        h.call("POST", "/push", b"another body", {"Idempotency-Key": "k1"}),
        409, "idempotency_conflict",
    )
    assert h.stats()["depth"] == 1


def test_different_keys_make_different_messages(h):
    assert h.push(b"body", key="k1") != h.push(b"body", key="k2")
    assert h.stats()["depth"] == 2


def test_idempotency_key_is_remembered_while_the_message_is_queued(h):
    message_id = h.push(b"body", key="k1")
    h.clock.advance(3600)
    reply = h.call("POST", "/push", b"body", {"Idempotency-Key": "k1"})
    assert (reply.code, reply.json()) == (200, {"id": message_id})
    assert h.stats()["depth"] == 1


def test_idempotency_key_is_forgotten_five_minutes_after_the_ack(h):
    message_id = h.push(b"body", key="k1")
    assert h.take().header("Dqid-Id") == message_id
    assert h.call("POST", f"/ack/{message_id}").code == 204

    h.clock.advance(299)
    reply = h.call("POST", "/push", b"body", {"Idempotency-Key": "k1"})
    assert (reply.code, reply.json()) == (200, {"id": message_id})
    assert_error(
        h.call("POST", "/push", b"other", {"Idempotency-Key": "k1"}),
        409, "idempotency_conflict",
    )
    assert h.stats()["depth"] == 0  # the retry queued nothing

    h.clock.advance(2)
    reply = h.call("POST", "/push", b"body", {"Idempotency-Key": "k1"})
    assert reply.code == 201
    assert reply.json()["id"] != message_id
    assert h.stats()["depth"] == 1


def test_a_push_refused_as_full_does_not_claim_its_key(make):
    h = make(size=1)
    first = h.push(b"a")
    assert_error(
        h.call("POST", "/push", b"b", {"Idempotency-Key": "k2"}), 429, "queue_full"
    )
    assert h.call("POST", f"/ack/{first}").code == 204
    # The refused push left no trace: the key takes a new body.
    assert h.call("POST", "/push", b"c", {"Idempotency-Key": "k2"}).code == 201


@pytest.mark.parametrize("key", [b"", b"k" * 256, b"caf\xc3\xa9", b"tab\there"])
def test_bad_idempotency_key_is_400(h, key):
    assert_error(
        h.call("POST", "/push", b"body", {b"Idempotency-Key": [key]}), 400, "bad_request"
    )
    assert h.stats()["depth"] == 0


def test_longest_idempotency_key_is_accepted(h):
    h.push(b"body", key="k" * 255)


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
    h.take()
    polling = h.send("GET", "/get?wait=5")
    h.flush()
    assertNoResult(polling)
    assert h.call("POST", f"/nack/{message_id}").code == 204
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
    assert_error(h.call("POST", f"/{verb}/{message_id}"), 404, "unknown_message")


def test_ack_of_a_ready_message_removes_it(h):
    message_id = h.push(b"a")
    assert h.call("POST", f"/ack/{message_id}").code == 204
    assert h.stats()["depth"] == 0
    assert h.call("GET", "/get").code == 204


def test_nack_makes_the_message_ready_now(h):
    message_id = h.push(b"a")
    h.take()
    reply = h.call("POST", f"/nack/{message_id}")
    assert (reply.code, reply.body) == (204, b"")
    stats = h.stats()
    assert (stats["ready"], stats["leased"]) == (1, 0)
    again = h.take()
    assert again.header("Dqid-Id") == message_id
    assert again.header("Dqid-Deliveries") == "2"


def test_nack_of_a_ready_message_is_a_no_op(h):
    first, second = h.push(b"a"), h.push(b"b")
    assert h.call("POST", f"/nack/{second}").code == 204
    stats = h.stats()
    assert (stats["ready"], stats["leased"]) == (2, 0)
    assert [h.take().header("Dqid-Id") for _ in range(2)] == [first, second]


def test_nack_after_ack_is_404(h):
    message_id = h.push(b"a")
    h.call("POST", f"/ack/{message_id}")
    assert_error(h.call("POST", f"/nack/{message_id}"), 404, "unknown_message")


def test_touch_extends_the_lease(h):
    message_id = h.push(b"a")
    h.take("?visibility=10")
    h.clock.advance(5)
    reply = h.call("POST", f"/touch/{message_id}?visibility=20")
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
    h.take("?visibility=30")
    assert h.call("POST", f"/touch/{message_id}?visibility=1").code == 204
    h.clock.advance(1)
    assert h.take().header("Dqid-Id") == message_id


def test_touch_without_visibility_uses_the_default_lease(h):
    message_id = h.push(b"a")
    h.take("?visibility=5")
    assert h.call("POST", f"/touch/{message_id}").code == 204
    h.clock.advance(29.9)
    assert h.call("GET", "/get").code == 204
    h.clock.advance(0.1)
    assert h.take().header("Dqid-Id") == message_id


def test_touch_on_a_ready_message_is_409_not_leased(h):
    message_id = h.push(b"a")
    assert_error(h.call("POST", f"/touch/{message_id}"), 409, "not_leased")
    assert h.stats()["ready"] == 1


@pytest.mark.parametrize("visibility", ["0", "43201", "soon"])
def test_touch_with_a_bad_visibility_is_400(h, visibility):
    message_id = h.push(b"a")
    h.take("?visibility=10")
    assert_error(
        h.call("POST", f"/touch/{message_id}?visibility={visibility}"), 400, "bad_request"
    )
    h.clock.advance(10)  # the lease was not changed
    assert h.take().header("Dqid-Id") == message_id


# -- stats, health, ready -----------------------------------------------------------


def test_stats_reports_the_queue(make):
    h = make(size=7)
    first = h.push(b"a")
    h.push(b"b")
    h.push(b"c")
    h.take()
    h.call("POST", f"/nack/{first}")
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


# -- routing errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, path",
    [("GET", "/"), ("GET", "/nope"), ("POST", "/push/nope"), ("GET", "/v2/get"),
     ("POST", "/ack/a/b"), ("GET", "/stats/x")],
)
def test_unknown_path_is_404_not_found(h, method, path):
    assert_error(h.call(method, path), 404, "not_found")


@pytest.mark.parametrize(
    "method, path, allowed",
    [
        ("GET", "/push", {"POST"}),
        ("PUT", "/push", {"POST"}),
        ("GET", "/push/batch", {"POST"}),
        ("DELETE", "/get", {"GET", "POST"}),
        ("GET", "/ack/n1.1.1", {"POST"}),
        ("GET", "/nack/n1.1.1", {"POST"}),
        ("GET", "/touch/n1.1.1", {"POST"}),
        ("POST", "/stats", {"GET"}),
        ("POST", "/health", {"GET"}),
        ("POST", "/ready", {"GET"}),
    ],
)
def test_wrong_method_is_405_method_not_allowed(h, method, path, allowed):
    reply = h.call(method, path, b"x" if method in ("POST", "PUT") else None)
    assert_error(reply, 405, "method_not_allowed")
    allow = {m.strip() for m in (reply.header("Allow") or "").split(",")}
    assert allowed <= allow
    assert h.stats()["depth"] == 0


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


# -- bounded request bodies (dqid.httpbody) -----------------------------------------------------


def bounded_request(max_body: int, max_batch_body: int, path: bytes) -> BoundedRequest:
    site = bounded_site(None, max_body=max_body, max_batch_body=max_batch_body)
    channel = DummyChannel()
    channel._path = path  # what HTTPChannel holds while the body comes in
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


class Wire:
    """The real HTTP server protocol of ``bounded_site`` over a StringTransport."""

    def __init__(self, max_message_bytes: int) -> None:
        self.clock = Clock()
        self.node = QueueNode(node_id="n1", size=5, clock=self.clock, epoch=1)
        api = HttpApi(self.node, max_message_bytes=max_message_bytes)
        self.site = bounded_site(
            api.resource(), max_message_bytes, batch_body_limit(max_message_bytes)
        )
        self.site.reactor = Clock()  # connection timeouts: never run

    def exchange(self, head: bytes, *body_parts: bytes) -> tuple[int, bytes]:
        status, _, body = self.exchange_raw(head, *body_parts)
        return status, body

    def exchange_raw(self, head: bytes, *body_parts: bytes) -> tuple[int, bytes, bytes]:
        """Status, raw header block (lower case) and body of one exchange."""
        protocol = self.site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(head + b"\r\n")
        for part in body_parts:
            protocol.dataReceived(part)
        raw = transport.value()
        protocol.connectionLost(None)
        head_part, _, body = raw.partition(b"\r\n\r\n")
        status_line, _, headers = head_part.partition(b"\r\n")
        if b"transfer-encoding: chunked" in headers.lower():
            body = dechunk(body)
        return int(status_line.split()[1]), headers.lower(), body


def dechunk(data: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out += data[:size]
        data = data[size + 2:]


def chunked(*parts: bytes) -> bytes:
    encoded = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)
    return encoded + b"0\r\n\r\n"


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

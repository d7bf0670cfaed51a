"""dqid.client and dqid.worker against a real HttpApi + QueueNode, in memory.

Requests go through ``treq.testing.StubTreq`` over the node's real Klein
resource (tests/web_harness.py); the node, the client's retries and the
worker's timers all run on one ``Clock`` that the tests advance.  Wrappers
around the resource stand in for what a network or a proxy does: drop or
hold an answer, refuse with 503, record what was asked.
"""

from __future__ import annotations

import json
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.web.resource import IResource, Resource

from dqid.client import (
    BadRequest, Client, DqidError, Entry, IdempotencyConflict, LeaseLost, MessageTooLarge,
    NotLeased, QueueFull, Retry, Unauthorized, Unavailable, Unreachable, UnknownMessage,
    retry_after_seconds,
)
from dqid.readiness import Phase
from dqid.worker import Worker

from .helpers import assertNoResult, failureResultOf, successResultOf
from .web_harness import BASE, Harness, h, make  # noqa: F401  (fixtures)

class Recorder(Resource):
    """Passes every request to ``inner`` and keeps (method, path, query,
    headers) of each; ``before`` may answer instead (return the body) or
    return None to pass the request on."""

    isLeaf = True

    def __init__(self, inner: IResource,
                 before: Callable[[Any], bytes | int | None] | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.before = before
        self.seen: list[tuple[str, str, dict[str, list[str]], Any]] = []

    def render(self, request: Any) -> bytes | int:
        query = parse_qs(urlsplit(request.uri.decode()).query)
        self.seen.append((request.method.decode(), request.path.decode(), query,
                          request.requestHeaders))
        if self.before is not None:
            answered = self.before(request)
            if answered is not None:
                return answered
        return self.inner.render(request)

    def paths(self, prefix: str = "") -> list[str]:
        return [path for _, path, _, _ in self.seen if path.startswith(prefix)]

    def queries(self, prefix: str) -> list[dict[str, list[str]]]:
        return [query for _, path, query, _ in self.seen if path.startswith(prefix)]


class Rig:
    """A harness node, a Recorder in front of it, and a Client on its Clock."""

    def __init__(self, h: Harness, before: Callable[[Any], bytes | int | None] | None = None,
                 retry: Retry = Retry(), token: str | None = None, inner: Any = None,
                 timeout: float = 30.0) -> None:
        self.h = h
        self.recorder = Recorder(inner or h.api.resource(), before)
        self.stub = StubTreq(self.recorder)
        self.client = Client(BASE, token=token, reactor=h.clock, http_client=self.stub,
                             retry=retry, timeout=timeout)

    def settle(self) -> None:
        for _ in range(5):
            self.stub.flush()

    def advance(self, seconds: float, step: float = 0.05) -> None:
        """Move the clock in small steps, delivering answers as they come."""
        remaining = seconds
        while remaining > 1e-9:
            move = min(step, remaining)
            self.h.clock.advance(move)
            self.settle()
            remaining -= move

    def depth(self) -> int:
        return self.h.node.stats()["depth"]


def refuse(request: Any, status: int, code: str, retry_after: str | None = "1") -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    if retry_after is not None:
        request.setHeader(b"Retry-After", retry_after.encode())
    return json.dumps({"error": code, "message": "refused by the test"}).encode()


def first_n(n: int, path: str, answer: Callable[[Any], bytes | int]) -> Callable:
    """A ``before`` that answers the first ``n`` requests to ``path``."""
    left = [n]

    def before(request: Any) -> bytes | int | None:
        if request.path.decode() == path and left[0] > 0:
            left[0] -= 1
            return answer(request)
        return None

    return before


# -- the happy paths -----------------------------------------------------------


def test_push_get_ack(h):
    rig = Rig(h)
    message_id = successResultOf(rig.client.push(b"resize 42", content_type="text/x-job"))
    delivery = successResultOf(rig.client.get(visibility=10))
    assert (delivery.id, delivery.body, delivery.deliveries, delivery.content_type) == (
        message_id, b"resize 42", 1, "text/x-job")
    assert successResultOf(rig.client.ack(delivery)) is True
    assert successResultOf(rig.client.get()) is None
    assert rig.depth() == 0


def test_a_text_body_goes_as_utf8_text_and_binary_as_octets(h):
    rig = Rig(h)
    successResultOf(rig.client.push("grüße"))
    successResultOf(rig.client.push(b"\xff\x00"))
    text, octets = successResultOf(rig.client.get()), successResultOf(rig.client.get())
    assert (text.body, text.content_type) == ("grüße".encode(), "text/plain; charset=utf-8")
    assert (octets.body, octets.content_type) == (b"\xff\x00", "application/octet-stream")
    for delivery in (text, octets):
        successResultOf(rig.client.ack(delivery.id))


def test_get_long_polls_until_a_push(h):
    rig = Rig(h)
    polling = rig.client.get(wait=20)
    assertNoResult(polling)
    assert rig.recorder.queries("/get") == [{"wait": ["20"]}]
    message_id = successResultOf(rig.client.push(b"wake up"))
    rig.settle()
    delivery = successResultOf(polling)
    assert (delivery.id, delivery.body) == (message_id, b"wake up")
    successResultOf(rig.client.ack(delivery))


def test_a_long_poll_that_sees_nothing_is_none(h):
    rig = Rig(h)
    polling = rig.client.get(wait=2)
    rig.advance(1.9)
    assertNoResult(polling)
    rig.advance(0.2)
    assert successResultOf(polling) is None


def test_batches_round_trip_in_order(h):
    rig = Rig(h)
    ids = successResultOf(rig.client.push_batch(
        [b"one", "two", Entry(b"\xfe\xff", content_type="application/x-bin")]))
    assert len(ids) == 3
    deliveries = successResultOf(rig.client.get_many(10, visibility=5))
    assert [d.id for d in deliveries] == ids
    assert [d.body for d in deliveries] == [b"one", b"two", b"\xfe\xff"]
    assert deliveries[2].content_type == "application/x-bin"
    assert all(d.deliveries == 1 for d in deliveries)
    assert len({d.receipt for d in deliveries}) == 3 and all(d.receipt for d in deliveries)
    assert successResultOf(rig.client.get_many(10)) == []
    assert [successResultOf(rig.client.ack(d)) for d in deliveries] == [True] * 3


def test_a_second_ack_counts_as_done(h):
    rig = Rig(h)
    successResultOf(rig.client.push(b"work"))
    delivery = successResultOf(rig.client.get())
    assert successResultOf(rig.client.ack(delivery)) is True
    assert successResultOf(rig.client.ack(delivery)) is False  # 404: gone already
    assert successResultOf(rig.client.ack("n1.1.999")) is False


def test_nack_makes_it_ready_again(h):
    rig = Rig(h)
    successResultOf(rig.client.push(b"again"))
    first = successResultOf(rig.client.get())
    successResultOf(rig.client.nack(first))
    second = successResultOf(rig.client.get())
    assert (second.id, second.deliveries) == (first.id, 2)
    successResultOf(rig.client.ack(second))


def test_touch_extends_the_lease(h):
    rig = Rig(h)
    successResultOf(rig.client.push(b"long job"))
    delivery = successResultOf(rig.client.get(visibility=10))
    rig.advance(8)
    successResultOf(rig.client.touch(delivery, 10))
    assert rig.recorder.queries("/touch")[-1]["visibility"] == ["10"]
    rig.advance(8)  # 16 s after the get: the first lease would have run out
    assert successResultOf(rig.client.get()) is None
    rig.advance(3)
    again = successResultOf(rig.client.get())
    assert (again.id, again.deliveries) == (delivery.id, 2)
    successResultOf(rig.client.ack(again))


def test_stats(h):
    rig = Rig(h)
    successResultOf(rig.client.push(b"x"))
    stats = successResultOf(rig.client.stats())
    assert (stats["node"], stats["depth"], stats["ready"]) == ("n1", 1, 1)


def test_the_bearer_token_is_sent(h):
    rig = Rig(h, token="s3cret")
    successResultOf(rig.client.push(b"x"))
    headers = rig.recorder.seen[-1][3]
    assert headers.getRawHeaders(b"authorization") == [b"Bearer s3cret"]


# -- receipts, delays and peek -------------------------------------------------


def test_deliveries_carry_receipts_that_nack_and_touch_send(h):
    rig = Rig(h)
    successResultOf(rig.client.push(b"job"))
    delivery = successResultOf(rig.client.get())
    assert delivery.receipt
    successResultOf(rig.client.touch(delivery, 30))
    successResultOf(rig.client.nack(delivery))
    assert rig.recorder.queries("/touch")[-1]["receipt"] == [delivery.receipt]
    assert rig.recorder.queries("/nack")[-1]["receipt"] == [delivery.receipt]
    again = successResultOf(rig.client.get())
    assert again.receipt and again.receipt != delivery.receipt
    # The first delivery's lease is over: its nack and touch are refused.
    assert failureResultOf(rig.client.nack(delivery), LeaseLost).value.status == 409
    failureResultOf(rig.client.touch(delivery, 30), LeaseLost)
    successResultOf(rig.client.ack(again))


def test_delays_and_peek(h):
    rig = Rig(h)
    message_id = successResultOf(rig.client.push(b"later", delay=5))
    assert successResultOf(rig.client.get()) is None
    peeked = successResultOf(rig.client.peek(message_id))
    assert (peeked.body, peeked.state, peeked.deliveries) == (b"later", "delayed", 0)
    rig.advance(5.1)
    delivery = successResultOf(rig.client.get())
    successResultOf(rig.client.nack(delivery, delay=3))
    rig.advance(2)
    assert successResultOf(rig.client.get()) is None
    rig.advance(1.1)
    successResultOf(rig.client.ack(successResultOf(rig.client.get())))
    assert successResultOf(rig.client.peek(message_id)) is None


# -- error mapping -------------------------------------------------------------


def test_json_errors_become_typed_exceptions(make):
    h = make(size=5, max_message_bytes=8)
    rig = Rig(h)
    empty = failureResultOf(rig.client.push(b""), BadRequest).value
    assert (empty.status, empty.code) == (400, "empty_message")
    assert empty.message
    big = failureResultOf(rig.client.push(b"x" * 9), MessageTooLarge).value
    assert (big.status, big.code) == (413, "message_too_large")
    first = successResultOf(rig.client.push(b"a", key="k1"))
    conflict = failureResultOf(rig.client.push(b"b", key="k1"), IdempotencyConflict).value
    assert (conflict.status, conflict.document["id"]) == (409, first)
    failureResultOf(rig.client.nack(_delivery("n1.1.77")), UnknownMessage)
    successResultOf(rig.client.ack(first))


def test_lease_errors_unauthorized_and_plain_text_errors(h):
    answers = {
        "/nack/x": lambda r: refuse(r, 409, "lease_lost", None),
        "/touch/y": lambda r: refuse(r, 409, "not_leased", None),
        "/stats": lambda r: refuse(r, 401, "unauthorized", None),
        "/touch/x": lambda r: (r.setResponseCode(500), b"<html>oops</html>")[1],
    }
    rig = Rig(h, before=lambda r: answers.get(r.path.decode(), lambda r: None)(r))
    lost = failureResultOf(rig.client.nack(_delivery("x")), LeaseLost).value
    assert (lost.status, lost.code) == (409, "lease_lost")
    not_leased = failureResultOf(rig.client.touch(_delivery("y"), 5), NotLeased).value
    assert (not_leased.status, not_leased.code) == (409, "not_leased")
    failureResultOf(rig.client.stats(), Unauthorized)
    other = failureResultOf(rig.client.touch(_delivery("x"), 5), DqidError).value
    assert (type(other), other.status, other.code) == (DqidError, 500, "http_500")
    assert "oops" in other.message


def test_retry_after_values():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(" 0 ") == 0.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None


def _delivery(message_id: str) -> Any:
    from dqid.client import Delivery

    return Delivery(message_id, b"", "r-1", 1, "application/octet-stream")


# -- Retry-After and bounded retries -------------------------------------------


def test_a_full_queue_is_retried_after_retry_after(make):
    h = make(size=1)
    rig = Rig(h)
    first = successResultOf(rig.client.push(b"first"))
    waiting = rig.client.push(b"second")
    assert rig.recorder.paths("/push") == ["/push", "/push"]
    rig.advance(0.9)
    assertNoResult(waiting)
    assert len(rig.recorder.paths("/push")) == 2  # Retry-After: 1 is honoured
    successResultOf(rig.client.ack(first))
    rig.advance(0.2)
    second = successResultOf(waiting)
    assert len(rig.recorder.paths("/push")) == 3
    assert rig.depth() == 1
    successResultOf(rig.client.ack(second))


def test_retries_are_bounded_by_attempts(make):
    h = make(size=1)
    rig = Rig(h, retry=Retry(attempts=3, total=100))
    first = successResultOf(rig.client.push(b"first"))
    refused = rig.client.push(b"second")
    rig.advance(5)
    error = failureResultOf(refused, QueueFull).value
    assert (error.status, error.code, error.retry_after) == (429, "queue_full", 1.0)
    assert len(rig.recorder.paths("/push")) == 1 + 3
    successResultOf(rig.client.ack(first))


def test_retries_are_bounded_in_time(h):
    before = first_n(1000, "/push", lambda r: refuse(r, 503, "not_ready", "2"))
    rig = Rig(h, before=before, retry=Retry(attempts=100, total=5, max_delay=10))
    refused = rig.client.push(b"x")
    rig.advance(4.5)  # tries at 0, 2, 4; one at 6 would pass the 5 s
    failureResultOf(refused, Unavailable)
    assert len(rig.recorder.paths("/push")) == 3
    assert rig.depth() == 0


def test_a_node_that_is_not_ready_is_waited_for(h):
    h.node.readiness.set(Phase.RECOVERING, "recovering its queue from peers")
    rig = Rig(h)
    waiting = rig.client.push(b"patient")
    rig.advance(3)
    assertNoResult(waiting)
    tries = len(rig.recorder.paths("/push"))
    assert 3 <= tries <= 4  # Retry-After: 1 each time
    h.node.readiness.set(Phase.SERVING)
    rig.advance(1)
    message_id = successResultOf(waiting)
    assert successResultOf(rig.client.get()).id == message_id
    successResultOf(rig.client.ack(message_id))


def test_other_errors_are_not_retried(h):
    rig = Rig(h)
    failureResultOf(rig.client.push(b""), BadRequest)
    assert len(rig.recorder.paths("/push")) == 1


# -- a push retried after a lost answer is queued once --------------------------


def drop_first_push_answer(request: Any) -> None:
    """The node handles the push; its answer never reaches the client."""
    request.write = lambda data: None
    request.finish = lambda: request.channel.transport.abortConnection()


@pytest.mark.parametrize("key", [None, "order-17"])
def test_a_push_whose_answer_was_lost_is_queued_once(h, key):
    state = {"dropped": False}

    def before(request: Any) -> None:
        if request.path == b"/push" and not state["dropped"]:
            state["dropped"] = True
            drop_first_push_answer(request)

    rig = Rig(h, before=before)
    pushing = rig.client.push(b"exactly once", key=key)
    assert rig.depth() == 1  # queued, but the client does not know
    assertNoResult(pushing)
    rig.advance(1)
    message_id = successResultOf(pushing)
    assert rig.depth() == 1
    keys = [hdrs.getRawHeaders(b"idempotency-key") for _, p, _, hdrs in rig.recorder.seen
            if p == "/push"]
    assert len(keys) == 2 and keys[0] == keys[1]
    if key is not None:
        assert keys[0] == [key.encode()]
    assert successResultOf(rig.client.get()).id == message_id
    successResultOf(rig.client.ack(message_id))


def test_a_push_whose_answer_never_comes_is_retried_after_the_timeout(h):
    held: list[Any] = []

    def before(request: Any) -> int | None:
        if request.path == b"/push" and not held:
            held.append(request)  # the node queues it; the answer is held back
            drop_first_push_answer(request)
            request.finish = lambda: None
        return None

    rig = Rig(h, before=before, timeout=5)
    pushing = rig.client.push(b"slow answer")
    rig.advance(4.9)
    assertNoResult(pushing)
    rig.advance(1)
    message_id = successResultOf(pushing)
    assert rig.depth() == 1 and len(rig.recorder.paths("/push")) == 2
    successResultOf(rig.client.ack(message_id))


def test_a_batch_whose_answer_was_lost_is_not_sent_again(h):
    def before(request: Any) -> None:
        if request.path == b"/push/batch":
            drop_first_push_answer(request)

    rig = Rig(h, before=before)
    error = failureResultOf(rig.client.push_batch([b"a", b"b"]), Unreachable).value
    assert error.status is None
    assert len(rig.recorder.paths("/push/batch")) == 1
    assert rig.depth() == 2
    for delivery in successResultOf(rig.client.get_many(2)):
        successResultOf(rig.client.ack(delivery))


# -- the worker ----------------------------------------------------------------


class Jobs:
    """A handler that records deliveries; ``outcomes`` says, per message
    body, what each delivery does: "ok", "fail", or "hold" (a Deferred the
    test fires through :attr:`holding`)."""

    def __init__(self, style: str = "plain", outcomes: dict[bytes, list[str]] | None = None
                 ) -> None:
        self.style = style
        self.outcomes = outcomes or {}
        self.seen: list[Any] = []
        self.holding: dict[bytes, Deferred[None]] = {}

    def _outcome(self, delivery: Any) -> Deferred[None] | None:
        """None for a job done at once, else a Deferred; raises for "fail"."""
        self.seen.append(delivery)
        plan = self.outcomes.get(delivery.body, [])
        what = plan.pop(0) if plan else "ok"
        if what == "fail":
            raise RuntimeError(f"job {delivery.body!r} failed")
        if what == "hold":
            self.holding[delivery.body] = Deferred()
            return self.holding[delivery.body]
        return None

    def handler(self) -> Callable[[Any], Any]:
        if self.style == "plain":
            return self._outcome  # a plain function (a Deferred only for "hold")

        if self.style == "deferred":
            def deferred(delivery: Any) -> Deferred[None]:
                try:
                    result = self._outcome(delivery)
                except RuntimeError as problem:
                    return fail(problem)
                return result if result is not None else succeed(None)

            return deferred

        async def coroutine(delivery: Any) -> None:
            result = self._outcome(delivery)
            if result is not None:
                await result

        return coroutine


def make_worker(rig: Rig, jobs: Jobs, **kw: Any) -> Worker:
    kw.setdefault("visibility", 30)
    return Worker(rig.client, jobs.handler(), reactor=rig.h.clock, **kw)


def stop(rig: Rig, worker: Worker) -> None:
    stopping = worker.stop()
    rig.settle()
    successResultOf(stopping)


@pytest.mark.parametrize("style", ["plain", "deferred", "coroutine"])
def test_the_worker_acks_what_it_handled(make, style):
    h = make(size=10)
    rig = Rig(h)
    successResultOf(rig.client.push_batch([b"1", b"2", b"3"]))
    jobs = Jobs(style)
    worker = make_worker(rig, jobs, concurrency=2)
    worker.start()
    rig.settle()
    assert sorted(d.body for d in jobs.seen) == [b"1", b"2", b"3"]
    assert (worker.counts.acked, worker.counts.failed) == (3, 0)
    assert rig.depth() == 0
    assert rig.recorder.queries("/get")[0] == {"visibility": ["30"], "wait": ["20"]}
    stop(rig, worker)


def test_a_failed_job_is_nacked_with_a_growing_delay(make):
    h = make(size=10)
    rig = Rig(h)
    successResultOf(rig.client.push(b"flaky"))
    jobs = Jobs(outcomes={b"flaky": ["fail", "fail", "fail", "fail", "ok"]})
    taken_at: list[float] = []
    handler = jobs.handler()

    def timed(delivery: Any) -> Any:
        taken_at.append(h.clock.seconds())
        return handler(delivery)

    worker = Worker(rig.client, timed, visibility=30, backoff=(1, 2, 5), reactor=h.clock)
    worker.start()
    rig.advance(30)
    assert [d.deliveries for d in jobs.seen] == [1, 2, 3, 4, 5]
    delays = [q["delay"] for q in rig.recorder.queries("/nack")]
    assert delays == [["1"], ["2"], ["5"], ["5"]]  # capped at the last
    gaps = [later - earlier for earlier, later in zip(taken_at, taken_at[1:])]
    assert [round(gap, 1) for gap in gaps] == [1.0, 2.0, 5.0, 5.0]  # not before the delay
    assert (worker.counts.failed, worker.counts.nacked, worker.counts.acked) == (4, 4, 1)
    assert rig.depth() == 0
    stop(rig, worker)


def test_the_worker_touches_the_lease_while_the_job_runs(make):
    h = make(size=10)
    rig = Rig(h)
    successResultOf(rig.client.push(b"long"))
    jobs = Jobs(outcomes={b"long": ["hold"]})
    worker = make_worker(rig, jobs, visibility=9)  # a touch every 3 s
    worker.start()
    rig.settle()
    rig.advance(20)  # more than twice the lease
    touches = rig.recorder.queries("/touch")
    assert len(touches) == 6 and all(q["visibility"] == ["9"] for q in touches)
    stats = h.node.stats()
    assert (stats["leased"], stats["counters"]["delivered"]) == (1, 1)  # never lost
    jobs.holding[b"long"].callback(None)
    rig.settle()
    assert worker.counts.acked == 1 and rig.depth() == 0
    rig.advance(10)
    assert len(rig.recorder.queries("/touch")) == 6  # no touch after the job
    stop(rig, worker)


def test_a_lost_lease_stops_the_touches_and_the_finished_job_is_still_acked(make):
    h = make(size=10)
    rig = Rig(h)
    message_id = successResultOf(rig.client.push(b"slow"))
    jobs = Jobs(outcomes={b"slow": ["hold"]})
    worker = make_worker(rig, jobs, visibility=3, touch_every=5)  # touches too late
    worker.start()
    rig.advance(12)
    assert len(rig.recorder.queries("/touch")) == 1  # refused: no second touch
    assert worker.counts.lost_leases == 1
    jobs.holding[b"slow"].callback(None)
    rig.settle()
    assert rig.recorder.paths("/ack/") == [f"/ack/{message_id}"]  # finished is finished
    assert worker.counts.acked == 1 and rig.depth() == 0
    stop(rig, worker)


def test_a_late_failure_after_the_lease_ran_out_changes_nothing(make):
    h = make(size=10)
    rig = Rig(h)
    successResultOf(rig.client.push(b"slow"))
    jobs = Jobs(outcomes={b"slow": ["hold", "ok"]})
    worker = make_worker(rig, jobs, concurrency=2, visibility=3, touch_every=5)
    worker.start()
    rig.advance(6)  # the lease ran out; the other slot took it again and acked it
    assert [d.deliveries for d in jobs.seen] == [1, 2]
    assert jobs.seen[0].receipt != jobs.seen[1].receipt
    assert worker.counts.acked == 1 and rig.depth() == 0
    jobs.holding[b"slow"].errback(RuntimeError("too late"))
    rig.settle()
    nacks = rig.recorder.queries("/nack")
    assert [q["receipt"] for q in nacks] == [[jobs.seen[0].receipt]]
    assert (worker.counts.nacked, worker.counts.lost_leases) == (0, 2)  # touch and nack
    assert len(rig.recorder.paths("/ack/")) == 1
    stop(rig, worker)


def test_stop_waits_for_running_jobs_and_takes_no_new_work(make):
    h = make(size=10)
    rig = Rig(h)
    successResultOf(rig.client.push_batch([b"running", b"waiting"]))
    jobs = Jobs(outcomes={b"running": ["hold"]})
    worker = make_worker(rig, jobs)
    worker.start()
    rig.settle()
    stopping = worker.stop()
    rig.settle()
    assertNoResult(stopping)
    gets = len(rig.recorder.paths("/get"))
    jobs.holding[b"running"].callback(None)
    rig.settle()
    successResultOf(stopping)
    assert len(rig.recorder.paths("/get")) == gets
    assert [d.body for d in jobs.seen] == [b"running"]
    assert worker.counts.acked == 1
    assert h.node.stats()["ready"] == 1  # "waiting" stays queued


def test_stop_cancels_an_idle_long_poll(h):
    rig = Rig(h)
    worker = make_worker(rig, Jobs())
    worker.start()
    rig.settle()
    assert h.node.stats()["waiting_gets"] == 1
    stop(rig, worker)
    assert h.node.stats()["waiting_gets"] == 0


def test_server_errors_never_end_the_loop(h):
    before = first_n(6, "/get", lambda r: refuse(r, 503, "not_ready", "1"))
    rig = Rig(h, before=before, retry=Retry(attempts=2))
    successResultOf(rig.client.push(b"after the outage"))
    jobs = Jobs()
    worker = make_worker(rig, jobs, error_backoff=(0.5, 1))
    worker.start()
    rig.advance(10)
    assert [d.body for d in jobs.seen] == [b"after the outage"]
    assert worker.counts.poll_errors == 3 and worker.counts.acked == 1
    stop(rig, worker)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    plans=st.lists(st.lists(st.sampled_from(["ok", "fail"]), max_size=3), min_size=1,
                   max_size=6),
    concurrency=st.integers(1, 3),
)
def test_every_delivery_is_acked_at_most_once_and_every_job_finishes(plans, concurrency):
    h = Harness(size=10)
    rig = Rig(h)
    bodies = [b"job-%d" % i for i in range(len(plans))]
    successResultOf(rig.client.push_batch(bodies))
    jobs = Jobs(outcomes={body: list(plan) for body, plan in zip(bodies, plans)})
    worker = make_worker(rig, jobs, concurrency=concurrency, backoff=(0.5,))
    worker.start()
    rig.advance(10, step=0.25)
    acks = rig.recorder.paths("/ack/")
    assert sorted(acks) == sorted(set(acks))  # one ack per message: one per delivery
    assert len(acks) == len(bodies) == worker.counts.acked
    # A job fails until its first "ok" (or the end of its plan).
    failures = sum((plan + ["ok"]).index("ok") for plan in plans)
    assert worker.counts.nacked == worker.counts.failed == failures
    assert len(jobs.seen) == len(bodies) + failures
    assert rig.depth() == 0
    stop(rig, worker)
    h.assert_no_stray_timers()

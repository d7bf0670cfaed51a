"""Idempotency-Keys across the cluster (DESIGN.md: "in a cluster a retry
that lands on another node is recognised too"), over iosim AMP pairs.

A node that does not know a key asks its peers before it queues a push
under it: the retry of a push whose copy has not reached this node yet is
answered with the first id, not queued a second time.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError

from dqid.errors import NotReady
from dqid.idempotency import IdempotencyConflict
from dqid.timings import DEFAULT_TIMINGS

from .amp_harness import Net
from .helpers import assertNoResult, failureResultOf, successResultOf
from .test_cluster_amp import got, make, nets  # noqa: F401


def first_push_copied_to_b_only(net: Net, key: str, body: bytes = b"first"):
    """A pushes under ``key``; its copy reaches B, C's is held back (the
    links A-C are paused): the push waits for C."""
    a = net["a"]
    first = a.push(body, key=key)
    net.deliver_until(lambda: a.node.queue.depth == 1)  # the peers answered
    net.pause("a", "c")
    net.settle()
    assert net["b"].held("a") == 1 and net["c"].held("a") == 0
    assertNoResult(first)
    return first


def test_a_retry_that_overtakes_the_first_copy_is_answered_with_the_first_id(make):
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    first = first_push_copied_to_b_only(net, "k1")
    retry = c.push(b"first", key="k1")  # C has no copy: it asks A and B
    net.settle()
    assertNoResult(retry)  # A's answer waits for its push to settle
    net.resume("a", "c")
    net.settle()
    (first_id,) = successResultOf(first).ids
    answer = successResultOf(retry)
    assert answer.ids == [first_id] and answer.created is False
    # Queued once: nothing of C's own, one copy of A's everywhere.
    assert c.node.queue.depth == 0 and a.node.queue.depth == 1
    assert b.held("c") == a.held("c") == 0
    assert [m.id for m in got(net, c, count=10)] == [first_id]


def test_a_retry_of_a_push_that_was_withdrawn_is_queued_anew(make):
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    first = first_push_copied_to_b_only(net, "k1")
    net.run_until(lambda: first.called, limit=DEFAULT_TIMINGS.replication_timeout + 1)
    failureResultOf(first)  # withdrawn: C never got its copy
    net.cut("a", "c")
    net.connect("a", "c")
    net.settle()
    assert a.connected("c") and c.connected("a")
    # C does not know the key; A answers that its push under it was
    # withdrawn, and C queues the retry itself.
    retry = c.push(b"first", key="k1")
    net.settle()
    answer = successResultOf(retry)
    assert answer.created is True and answer.ids[0].startswith("c.")
    assert a.node.queue.depth == 0 and b.held("a") == c.held("a") == 0
    assert [m.id for m in got(net, a, count=10)] == answer.ids


def test_a_key_a_peer_holds_for_another_body_is_a_conflict_naming_the_first_id(make):
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    first = first_push_copied_to_b_only(net, "k1")
    other = c.push(b"another body", key="k1")
    net.resume("a", "c")
    net.settle()
    (first_id,) = successResultOf(first).ids
    conflict = failureResultOf(other, IdempotencyConflict)
    assert conflict.value.message_id == first_id
    assert c.node.queue.depth == 0


def test_a_peer_that_does_not_answer_does_not_stop_keyed_pushes(make):
    # Two copies are enough: with C stalled, a keyed push at A goes on
    # once C is found dead, not after the ask's own timeout.
    net = make("abc", min_copies=2)
    a, b, c = net.start_all()
    net.pause("c")
    pushed = a.push(b"job", key="k1")
    took = net.run_until(lambda: pushed.called, limit=DEFAULT_TIMINGS.call_timeout)
    assert successResultOf(pushed).created is True
    assert took <= DEFAULT_TIMINGS.dead_after + 2 * DEFAULT_TIMINGS.heartbeat_interval
    assert b.held("a") == 1


def test_two_pushes_under_one_new_key_on_one_node_queue_one_message(make):
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    pushes = [c.push(b"same", key="k1"), c.push(b"same", key="k1")]
    net.settle()
    first, second = (successResultOf(d) for d in pushes)
    assert [first.created, second.created] == [True, False]
    assert second.ids == first.ids
    assert c.node.queue.depth == 1 and a.held("c") == b.held("c") == 1


def test_a_keyed_push_whose_client_leaves_while_asking_queues_nothing(make):
    # The client's retry may be on its way to another node: going on here
    # would queue the message twice.
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    net.pause("a", "c")
    left = a.push(b"job", key="k1")
    net.settle()
    assertNoResult(left)  # C has not answered
    left.cancel()
    failureResultOf(left, CancelledError)
    net.resume("a", "c")
    net.settle()
    assert a.node.queue.depth == 0 and b.held("a") == c.held("a") == 0
    retry = b.push(b"job", key="k1")
    net.settle()
    assert successResultOf(retry).created is True


@pytest.mark.parametrize("order", ["ab", "ba", "cab", "cba"])
def test_nodes_asking_about_one_key_at_once_queue_it_once(make, order):
    # Each node asks the others while they ask it: the lowest id queues.
    net = make("abc", min_copies=3)
    net.start_all()
    pushes = [net[name].push(b"same", key="k1") for name in order]
    net.settle()
    answers = [successResultOf(d) for d in pushes]
    assert {tuple(r.ids) for r in answers} == {(answers[0].ids[0],)}
    assert sum(r.created for r in answers) == 1
    assert answers[0].ids[0].startswith("a.")
    assert sum(net[name].node.queue.depth for name in "abc") == 1



def test_a_node_that_answered_a_lower_asker_while_asking_asks_again(make):
    net = make("abc", min_copies=2)
    a, b, c = net.start_all()
    late = b.push(b"same", key="k1")  # B asks A and C; C's answer is late
    net.pause("b", "c")
    net.settle()  # A, not asking yet, answers B: unknown
    early = a.push(b"same", key="k1")  # B, still asking, answers A: unknown
    net.deliver_until(lambda: a.node.queue.depth == 1)
    net.pause("a", "b")  # A's copy does not reach B
    net.settle()
    first = successResultOf(early)  # A and C hold it
    assert first.created is True and first.ids[0].startswith("a.")
    assertNoResult(late)
    net.resume("b", "c")
    net.settle()
    # C knows of no push of its own under the key, but B had answered a
    # lower asker while asking: it asks again, and waits for A.
    assertNoResult(late)
    net.resume("a", "b")
    net.settle()
    assert successResultOf(late) == first._replace(created=False)
    assert b.node.queue.depth == 0


def test_an_ask_held_for_a_push_that_is_then_withdrawn_is_not_answered_its_id(make):
    # A (lower id) holds B's ask until A's push under the key is queued;
    # then B must wait for that push's outcome, not take its id at once:
    # it is withdrawn, and B's client would be told an id never delivered.
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    first = a.push(b"same", key="k1")
    retry = b.push(b"same", key="k1")
    net.deliver_until(lambda: a.node.queue.depth == 1)  # A asked, queued
    net.pause("a", "c")  # A's copy never reaches C
    net.run_until(lambda: first.called, limit=DEFAULT_TIMINGS.replication_timeout + 1)
    failureResultOf(first)
    net.run_until(lambda: retry.called, limit=DEFAULT_TIMINGS.call_timeout)
    answer = successResultOf(retry)
    assert answer.created is True and answer.ids[0].startswith("b.")
    assert a.node.queue.depth == 0
    assert [m.id for m in got(net, b, count=10)] == answer.ids


def test_when_every_node_must_hold_a_push_a_peer_that_cannot_answer_refuses_it(make):
    # The push could not be accepted without C; going on would let a push
    # under the key on C be queued too, were C back before this one is
    # replicated.
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    net.pause("c")
    stalled = a.push(b"job", key="k1")
    net.run_until(lambda: stalled.called, limit=DEFAULT_TIMINGS.call_timeout)
    failure = failureResultOf(stalled, NotReady)
    assert "did not say" in str(failure.value) and "c" in str(failure.value)
    assert a.node.queue.depth == 0 and b.held("a") == 0
    net.cut("c")
    refused = b.push(b"job", key="k2")  # C is known down: refused at once
    net.settle()
    assert "cannot ask c" in str(failureResultOf(refused, NotReady).value)

"""Receipts, held messages, delays and peeks across a cluster (iosim, one
Clock): the owner decides, and what it decides reaches the replicas, so a
replacement keeps it."""

from __future__ import annotations

from twisted.internet.defer import maybeDeferred

from dqid.node import LeaseChange
from dqid.queue import HELD, LeaseLost, NotHeld, UnknownMessage
from dqid.timings import DEFAULT_TIMINGS

from .amp_harness import Net
from .helpers import failureResultOf, successResultOf
from .test_cluster_amp import _replace_a, got, make, nets, pushed_id  # noqa: F401


def call(net: Net, method, *args):
    d = maybeDeferred(method, *args)
    net.settle()
    return d


def replica(member, message_id):
    return member.cluster.store.get(message_id)


def states_sent(net: Net) -> None:
    """Let changed states reach the replicas (they wait for a box going
    anyway, ``states_linger`` at most)."""
    net.advance(DEFAULT_TIMINGS.states_linger)


def test_nack_and_touch_through_a_peer_need_the_current_receipt(make):
    net = make("abc")
    a, b, c = net.start_all()
    message_id = pushed_id(net, a)
    (taken,) = got(net, b, count=1, visibility=5.0)  # leased from a, through b
    assert taken.id == message_id and taken.receipt
    successResultOf(call(net, c.node.touch, message_id, 30.0, taken.receipt))
    failureResultOf(call(net, c.node.touch, message_id, 30.0, "not-it"), LeaseLost)
    successResultOf(call(net, b.node.nack, message_id, taken.receipt))
    assert a.node.queue.ready == 1
    # The spent receipt acts no more, through any node.
    failureResultOf(call(net, c.node.nack, message_id, taken.receipt), LeaseLost)
    failureResultOf(call(net, b.node.kick, message_id), NotHeld)
    failureResultOf(call(net, b.node.nack, "a.1.999", "r"), UnknownMessage)


def test_delivery_counts_held_state_and_due_times_reach_the_replicas(make):
    net = make("abc", max_deliveries=2)
    a, b, c = net.start_all()
    message_id = pushed_id(net, a)
    (first,) = got(net, a, count=1)
    states_sent(net)
    assert replica(b, message_id).deliveries == replica(c, message_id).deliveries == 1
    successResultOf(call(net, a.node.nack, message_id, first.receipt, 10.0))
    due = a.node.queue.get(message_id).due
    states_sent(net)
    assert due is not None and replica(b, message_id).due == due
    net.advance(10.0)
    (second,) = got(net, a, count=1)
    successResultOf(call(net, a.node.nack, message_id, second.receipt))  # 2nd: held
    assert a.node.queue.get(message_id).state == HELD
    states_sent(net)
    for peer in (b, c):
        record = replica(peer, message_id)
        assert (record.deliveries, record.held, record.due) == (2, True, None)
    successResultOf(call(net, c.node.kick, message_id))  # through a peer
    assert a.node.queue.ready == 1
    states_sent(net)
    assert not replica(b, message_id).held and not replica(c, message_id).held


def test_a_held_message_stays_held_after_its_owner_is_replaced(make):
    net = make("abc", max_deliveries=1)
    a, b, c = net.start_all()
    poison = pushed_id(net, a, b"poison")
    later = pushed_id(net, a, b"later")
    (taken,) = got(net, a, count=1)
    successResultOf(call(net, a.node.nack, poison, taken.receipt))  # held
    (taken,) = got(net, a, count=1)
    assert taken.id == later
    successResultOf(call(net, a.node.nack, later, taken.receipt, 3600.0))  # held too: 1
    net.advance(0.5)
    _, a2 = _replace_a(net, keep_old=False)
    for peer in "bc":
        net.connect("a", peer)
    net.settle()
    assert a2.node.readiness.reason() is None
    queue = a2.node.queue
    assert queue.held == 2 and queue.ready == 0 and queue.depth == 2
    assert got(net, a2, count=10) == []  # never delivered while held
    held = successResultOf(call(net, b.node.held, 10))
    assert sorted(m.id for m in held) == sorted([poison, later])
    successResultOf(call(net, b.node.kick, poison))
    (again,) = got(net, a2, count=1)
    assert (again.id, again.deliveries) == (poison, 2)


def test_a_delayed_message_keeps_its_due_time_after_its_owner_is_replaced(make):
    net = make("abc")
    a, b, c = net.start_all()
    d = a.push(b"later", delay=60.0)
    net.settle()
    message_id = successResultOf(d).ids[0]
    due = a.node.queue.get(message_id).due
    assert replica(b, message_id).due == due  # replicated with the push
    net.advance(0.5)
    _, a2 = _replace_a(net, keep_old=False)
    for peer in "bc":
        net.connect("a", peer)
    net.settle()
    message = a2.node.queue.get(message_id)
    assert message.due == due and a2.node.queue.delayed == 1
    assert got(net, a2, count=1) == []
    net.advance(due - net.clock.seconds() + 0.1, step=0.2)
    (taken,) = got(net, a2, count=1)
    assert taken.id == message_id


def test_peek_through_a_peer_asks_the_owner_or_reads_a_replica(make):
    net = make("abc", min_copies=2)
    a, b, c = net.start_all()
    message_id = pushed_id(net, a, b"look")
    got(net, a, count=1)
    message, state = successResultOf(call(net, b.node.peek, message_id))
    assert (message.body, state, message.deliveries) == (b"look", "leased", 1)
    assert a.node.queue.leased == 1 and a.node.queue.get(message_id).deliveries == 1
    net.cut("a")
    net.advance(1.5)
    message, state = successResultOf(call(net, b.node.peek, message_id))
    assert (message.body, state) == (b"look", "ready")  # the copy here; a is down
    failureResultOf(call(net, b.node.peek, "a.1.999"), UnknownMessage)

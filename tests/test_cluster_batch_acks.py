"""``POST /ack`` with many ids on a node that holds copies (DESIGN.md,
"Replication": acks are tombstones; :meth:`QueueNode.ack_many`).

The acks of one batch for one owner become one set of tombstone ranges:
merged into the node's copies at once, sent to every peer with the turn's
box (numbered to the owner), and answered with one confirmation, once the
owner has them.  Each id is answered as it would be on its own.  Over the
AMP harness (iosim, a Clock).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred

from dqid import amp_commands as cmd
from dqid.amp_protocol import PeerProtocol
from dqid.datadir import DiskFailed
from dqid.errors import NotReady
from dqid.ids import format_id
from dqid.replica import Record
from dqid.readiness import Phase
from dqid.wire import decode_tombstones

from .helpers import assertNoResult, failureResultOf, successResultOf
from .test_cluster_amp import ids_in_queue, make, nets, take_all  # noqa: F401
from .test_cluster_runs import push_batch, settled

COUNT = 40


def boxes_from(monkeypatch, sender: str) -> list[tuple[str | None, dict]]:
    """The Stream boxes ``sender`` writes from now on: (peer, arguments)."""
    boxes: list[tuple[str | None, dict]] = []
    send = PeerProtocol.send

    def sending(self, command, **kw):
        if command is cmd.Stream and self.handlers.me == sender:
            boxes.append((self.peer_id, kw))
        return send(self, command, **kw)

    monkeypatch.setattr(PeerProtocol, "send", sending)
    return boxes


def test_a_batch_of_acks_on_a_replica_is_one_range_to_every_peer(make, monkeypatch):
    net = make("abc")
    a, b, c = net.start_all()
    ids = push_batch(net, a)
    assert take_all(net, b, COUNT) == ids  # leased through b, from a
    boxes = boxes_from(monkeypatch, "b")
    d = b.node.ack_many(ids)
    assert len(b.cluster.replicator._lanes["a"].confirmations) == 1  # for all
    net.clock.advance(0)  # the turn's box is written ...
    assertNoResult(d)  # ... and nothing is answered before the owner has it
    net.settle()
    assert successResultOf(d) == [True] * COUNT
    assert a.node.queue.depth == 0
    assert b.held("a") == c.held("a") == 0
    first = int(ids[0].rsplit(".", 1)[1], 36)
    for peer, numbered in (("a", True), ("c", False)):
        (box,) = [kw for to, kw in boxes if to == peer]
        assert (box["seq"] is not None) is numbered  # the owner confirms it
        assert decode_tombstones(box["tombstones"]).as_dict() == {
            "a": {a.node.epoch: [(first, first + COUNT)]}}


def test_a_batch_of_acks_on_the_owner_is_one_range_to_every_peer(make, monkeypatch):
    net = make("abc")
    a, b, c = net.start_all()
    ids = push_batch(net, a)
    old = format_id("a", a.node.epoch - 1, 7)  # one from before a restart
    a.node.restore([Record(old, b"old")])
    assert sorted(take_all(net, a, COUNT + 1)) == sorted([old, *ids])
    boxes = boxes_from(monkeypatch, "a")
    # Answered at once (in memory: nothing to wait for), the range sent.
    assert successResultOf(a.node.ack_many([*ids, old])) == [True] * (COUNT + 1)
    net.settle()
    assert a.node.queue.depth == 0
    assert b.held("a") == c.held("a") == 0
    first = int(ids[0].rsplit(".", 1)[1], 36)
    for peer in "bc":
        (box,) = [kw for to, kw in boxes if to == peer]
        assert decode_tombstones(box["tombstones"]).as_dict() == {
            "a": {a.node.epoch - 1: [(7, 8)], a.node.epoch: [(first, first + COUNT)]}}
        assert net[peer].cluster.store.is_tombstoned(old)


def test_each_id_of_a_batch_is_answered_as_it_would_be_alone(make):
    net = make("abc")
    a, b, c = net.start_all()
    of_a, of_b, of_c = (push_batch(net, member) for member in (a, b, c))
    gone = of_a[2]
    settled(net, b.ack(gone))
    ids = [of_a[0], of_b[0], "nonsense", of_a[1], of_c[0], of_a[0], gone, of_b[1],
           "a.1.zzzz", of_b[0]]
    assert settled(net, b.node.ack_many(ids)) == [
        True, True, False, True, True, False, False, True, False, False]
    acked = {of_a[0], of_a[1], gone, of_b[0], of_b[1], of_c[0]}
    for member in (a, b, c):
        assert not acked & set(ids_in_queue(member))
        assert not any(member.cluster.store.holds(i) for i in acked)
    assert [len(ids_in_queue(member)) for member in (a, b, c)] == [
        COUNT - 3, COUNT - 2, COUNT - 1]


def test_batch_acks_while_the_owner_is_down_are_written_here(make):
    net = make("abc", min_copies=2)
    a, b, c = net.start_all()
    ids = push_batch(net, a)
    net.cut("a")
    assert settled(net, b.node.ack_many(ids[:10])) == [True] * 10
    assert b.held("a") == c.held("a") == COUNT - 10
    for peer in "bc":
        net.connect("a", peer)
    net.advance(0.5)
    assert ids_in_queue(a) == ids[10:]


def test_batch_acks_stay_acked_when_the_owner_is_lost_before_confirming(make):
    net = make("abc", min_copies=2)
    a, b, c = net.start_all()
    ids = push_batch(net, a)
    d = b.node.ack_many(ids[:5])  # rides the stream to a ...
    net.cut("a")  # ... which is gone before it confirms
    assert successResultOf(d) == [True] * 5
    assert b.held("a") == COUNT - 5
    for peer in "bc":
        net.connect("a", peer)
    net.advance(0.5)
    assert ids_in_queue(a) == ids[5:]


def test_a_fenced_node_refuses_a_batch_with_its_own_ids(make):
    net = make("abc")
    a, b, c = net.start_all()
    own = push_batch(net, b)[:2]
    b.node.readiness.set(Phase.FENCED, "a newer epoch of b serves")
    failureResultOf(b.node.ack_many(own), NotReady)


# -- with --data-dir: an ack the owner cannot confirm waits for this node's disk ------------------


class SlowDisk:
    """The acking node's journal, as Holdings writes tombstones to it: each
    write is done only when the test says (``done``)."""

    def __init__(self) -> None:
        self.writes: list[Deferred] = []

    def _write(self, *_: object) -> Deferred:
        written: Deferred = Deferred()
        self.writes.append(written)
        return written

    tombstone = tombstones = _write

    def done(self) -> None:
        for written in self.writes:
            if not written.called:
                written.callback(None)


def on_slow_disk(member) -> SlowDisk:
    disk = SlowDisk()
    member.cluster.holdings.journal = disk
    return disk


def acked_as_the_owner_is_lost(make, ack) -> tuple[Deferred, SlowDisk]:
    """``ack(b, ids of a)`` on b, on a slow disk; a is lost before it
    confirms."""
    net = make("abc", min_copies=2)
    a, b, c = net.start_all()
    ids = push_batch(net, a)
    disk = on_slow_disk(b)
    d = ack(b, ids)
    net.cut("a")
    net.settle()
    assert disk.writes
    return d, disk


def test_a_batch_ack_the_owner_cannot_confirm_waits_for_this_nodes_disk(make):
    """The owner is lost before it confirms: the tombstones written here
    are all that lasts until it comes back, so with --data-dir the answer
    waits until they are on this node's disk (nothing answered comes back
    after a power cut)."""
    d, disk = acked_as_the_owner_is_lost(make, lambda b, ids: b.node.ack_many(ids[:5]))
    assertNoResult(d)
    disk.done()
    assert successResultOf(d) == [True] * 5


def test_one_ack_the_owner_cannot_confirm_waits_for_this_nodes_disk(make):
    d, disk = acked_as_the_owner_is_lost(make, lambda b, ids: b.node.ack(ids[0]))
    assertNoResult(d)
    disk.done()
    assert successResultOf(d) is None


def test_a_failed_disk_fails_an_ack_the_owner_could_not_confirm(make):
    d, disk = acked_as_the_owner_is_lost(make, lambda b, ids: b.node.ack_many(ids[:5]))
    for written in disk.writes:
        written.errback(DiskFailed("no space left on device"))
    failureResultOf(d, DiskFailed)


def test_a_batch_ack_the_owner_confirmed_does_not_wait_for_this_nodes_disk(make):
    net = make("abc")
    a, b, c = net.start_all()
    ids = push_batch(net, a)
    assert take_all(net, b, COUNT) == ids
    disk = on_slow_disk(b)
    d = b.node.ack_many(ids)
    net.settle()
    assert disk.writes  # still writing here, but the owner has them on its own disk
    assert successResultOf(d) == [True] * COUNT
    disk.done()


def test_an_ack_while_the_owner_is_down_waits_for_this_nodes_disk(make):
    net = make("abc", min_copies=2)
    a, b, c = net.start_all()
    ids = push_batch(net, a)
    net.cut("a")
    net.settle()
    disk = on_slow_disk(b)
    one, batch = b.node.ack(ids[0]), b.node.ack_many(ids[1:4])
    net.settle()
    assertNoResult(one)
    assertNoResult(batch)
    disk.done()
    assert successResultOf(one) is None
    assert successResultOf(batch) == [True] * 3

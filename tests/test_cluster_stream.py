"""The replication stream between real nodes (iosim, one Clock): what a
turn of an owner changed goes to each peer as one numbered ``Stream`` box,
the peer says ``Copied`` for what it holds, and a push is answered (its 201)
only once ``min_copies`` nodes hold it (:mod:`dqid.replicator`,
:mod:`dqid.stream`).

Every Stream and Copied goes through :meth:`PeerProtocol.send` and every
Stream received through :meth:`PeerProtocol.stream`; the ``wire`` fixture
records both, in the order they happened, so a test can check numbering and
acknowledgements link by link.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred

from dqid import amp_commands as cmd
from dqid.amp_protocol import PeerProtocol
from dqid.errors import NotReady, NotReplicated
from dqid.ids import format_id
from dqid.replica import Record
from dqid.replicator import MAX_IN_FLIGHT, TOMBSTONES_CONFIRMED_EVERY, Awaiting
from dqid.timings import DEFAULT_TIMINGS
from dqid.wire import decode_records, encode_records

from .amp_harness import Net
from .helpers import assertNoResult, failureResultOf, successResultOf
from .test_cluster_amp import got, make, nets, pushed_id, take_all  # noqa: F401

LINGER = DEFAULT_TIMINGS.states_linger
FENCE_LINGER = DEFAULT_TIMINGS.fence_linger


# -- what went over the wire -------------------------------------------------


@dataclass
class Event:
    kind: str  # "sent" or "received"
    node: str  # the node that sent or received it
    link: PeerProtocol  # its end of the connection
    peer: str | None
    command: type
    values: dict[str, Any]

    @property
    def seq(self) -> int | None:
        return self.values.get("seq")


@dataclass
class Wire:
    events: list[Event] = field(default_factory=list)

    def sent(self, command: type | None = None, node: str | None = None,
             peer: str | None = None, link: PeerProtocol | None = None) -> list[Event]:
        return [e for e in self.events if e.kind == "sent"
                and (command is None or e.command is command)
                and (node is None or e.node == node)
                and (peer is None or e.peer == peer)
                and (link is None or e.link is link)]

    def numbered(self, node: str, peer: str | None = None,
                 link: PeerProtocol | None = None) -> list[int]:
        """The numbers of the Stream boxes with records ``node`` sent."""
        return [e.seq for e in self.sent(cmd.Stream, node, peer, link)
                if e.values.get("records") is not None]

    def copied(self, node: str, peer: str | None = None,
               link: PeerProtocol | None = None) -> list[dict[str, Any]]:
        """What the Copied ``node`` sent said."""
        return [e.values for e in self.sent(cmd.Copied, node, peer, link)]

    def received_ids(self, node: str, owner: str) -> list[str]:
        """The ids of the records ``node`` received from ``owner``, in order."""
        return [r.id for e in self.events
                if e.kind == "received" and e.node == node and e.peer == owner
                and e.values.get("records") is not None
                for r in decode_records(e.values["records"])]

    def check(self) -> None:
        """Per connection end: boxes numbered 1, 2, 3... (every box with
        records, and boxes with tombstones to confirm; no other); every
        Copied above the one before, and for a box that end had already
        received."""
        ends = {id(e.link): e.link for e in self.events}
        for end in ends.values():
            mine = [e for e in self.events if e.link is end]
            boxes = [e for e in mine if e.kind == "sent" and e.command is cmd.Stream]
            for box in boxes:
                if box.values.get("records") is not None:
                    assert box.seq is not None, box
                elif box.seq is not None:
                    assert box.values.get("tombstones") is not None, box
            numbers = [box.seq for box in boxes if box.seq is not None]
            assert numbers == list(range(1, len(numbers) + 1)), numbers
            received = 0
            last = 0
            for e in mine:
                if e.kind == "received" and e.seq is not None:
                    received = max(received, e.seq)
                elif e.kind == "sent" and e.command is cmd.Copied:
                    upto = e.values["upto"]
                    assert last < upto <= received, (last, upto, received)
                    last = upto


@pytest.fixture
def wire(monkeypatch) -> Wire:
    recorded = Wire()
    send = PeerProtocol.send
    stream = PeerProtocol.stream

    def sending(self, command, **values):
        recorded.events.append(Event("sent", self.handlers.me, self, self.peer_id,
                                     command, dict(values)))
        return send(self, command, **values)

    def receiving(self, epoch, seq=None, records=None, run=None, states=None,
                  tombstones=None):
        recorded.events.append(Event(
            "received", self.handlers.me, self, self.peer_id, cmd.Stream,
            dict(epoch=epoch, seq=seq, records=records, run=run, states=states,
                 tombstones=tombstones)))
        return stream(self, epoch, seq, records, run, states, tombstones)

    monkeypatch.setattr(PeerProtocol, "send", sending)
    monkeypatch.setattr(PeerProtocol, "stream", receiving)
    return recorded


def end_of(net: Net, owner: str, peer: str) -> PeerProtocol:
    """``owner``'s end of its live connection to ``peer``."""
    (link,) = net.links_between(owner, peer)
    return link.client if link.dialler == owner else link.server


def turn(net: Net) -> None:
    """End this reactor turn (the turn's boxes are written) without moving
    any byte between nodes."""
    net.clock.advance(0)


def lose_bytes_in_flight(net: Net, a: str, b: str) -> None:
    """What the connection between ``a`` and ``b`` carries and has not
    delivered is lost (a reset, not a clean close)."""
    for link in net.links_between(a, b):
        link.pump.clientIO.getOutBuffer()
        link.pump.serverIO.getOutBuffer()


def lose_link(link) -> None:
    """``link`` is reset: what it carries and has not delivered is lost,
    and both ends see it close."""
    link.pump.clientIO.getOutBuffer()
    link.pump.serverIO.getOutBuffer()
    link.client.transport.loseConnection()
    link.paused = False


def holds(member, message_id: str) -> bool:
    return member.cluster.store.get(message_id) is not None


def answered_when(d: Deferred, check) -> list:
    """What ``check(result)`` said when ``d`` fired (its 201)."""
    seen: list = []

    def look(result):
        seen.append(check(result))
        return result

    d.addCallback(look)
    return seen


# -- order and numbering -----------------------------------------------------


def test_pushes_reach_replicas_in_owner_order_numbered_per_link(make, wire):
    net = make("abc")
    a, b, c = net.start_all()
    pushes = []
    for round_ in range(4):
        # Some turns end before any byte moves, so several numbered boxes
        # are in flight at once (more than MAX_IN_FLIGHT: the rest waits
        # and goes as one box).
        for turn_ in range(MAX_IN_FLIGHT + 2):
            for i in range(1 + (round_ + turn_) % 3):
                pushes.append(a.push(b"m%d.%d.%d" % (round_, turn_, i)))
            turn(net)
        net.settle()
    ids = [successResultOf(d).ids[0] for d in pushes]
    assert len(ids) == len(set(ids)) > 4 * (MAX_IN_FLIGHT + 2)
    # Every replica got the records in the owner's order, each once.
    assert wire.received_ids("b", "a") == ids
    assert wire.received_ids("c", "a") == ids
    assert [r.id for r in b.cluster.store.records("a")] == ids
    assert [r.id for r in c.cluster.store.records("a")] == ids
    # Boxes numbered 1, 2, 3... on each link, and at most MAX_IN_FLIGHT
    # waited at once: fewer boxes than turns.
    for peer in "bc":
        numbers = wire.numbered("a", peer)
        assert numbers == list(range(1, len(numbers) + 1))
        assert len(numbers) < 4 * (MAX_IN_FLIGHT + 2)
        ups = [v["upto"] for v in wire.copied(peer, "a")]
        assert ups and ups[-1] == numbers[-1]
        assert all(v["holder"] and v["refused"] is None for v in wire.copied(peer, "a"))
    wire.check()
    assert take_all(net, a) == ids


def test_pushes_from_every_owner_are_numbered_on_their_own_link_end(make, wire):
    net = make("abc")
    members = net.start_all()
    pushes = {m.name: [] for m in members}
    for i in range(5):
        for m in members:
            pushes[m.name].append(m.push(b"%s%d" % (m.name.encode(), i)))
        turn(net)
        if i % 2:
            net.settle()
    net.settle()
    for m in members:
        ids = [successResultOf(d).ids[0] for d in pushes[m.name]]
        for other in members:
            if other is not m:
                assert wire.received_ids(other.name, m.name) == ids
                assert wire.numbered(m.name, other.name)[0] == 1
    # Both directions share a connection; each end numbers its own boxes.
    wire.check()


# -- no 201 before min_copies copies -----------------------------------------


def test_no_push_is_answered_before_enough_replicas_hold_it(make, wire):
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    net.pause("a", "c")  # C is slow (not dead)
    pushes = []
    for i in range(3):
        pushes.append(a.push(b"slow%d" % i))
        net.settle()
    held_then = [answered_when(d, lambda r: (holds(b, r.ids[0]), holds(c, r.ids[0])))
                 for d in pushes]
    # B acknowledged every box; C said nothing: no push is answered.
    assert [v["upto"] for v in wire.copied("b", "a")] == [1, 2, 3]
    assert wire.copied("c", "a") == []
    for d in pushes:
        assertNoResult(d)
    assert a.cluster.replicator.in_flight("c") == 3
    assert a.cluster.replicator.in_flight("b") == 0
    net.resume("a", "c")
    net.settle()
    for d in pushes:
        successResultOf(d)
    # When each push was answered, both replicas held it.
    assert held_then == [[(True, True)]] * 3
    wire.check()


@pytest.mark.parametrize("key", [None, "k1"])
def test_a_push_whose_client_left_is_still_accepted_once_copied(make, wire, key):
    # The web layer cancels a push's Deferred when its client hangs up.
    # The push goes on: its copies are on the replicas already, so the
    # owner must not drop it (with no tombstone, the replicas would keep
    # a copy the owner does not have, delivered again after a take-over).
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    left = a.push(b"client left", key=key)
    # With a key, A first asks its peers about it: let the answers come,
    # and stop C before the turn's box goes.
    net.deliver_until(lambda: a.node.queue.depth == 1)
    net.pause("a", "c")
    net.settle()
    assert b.held("a") == 1
    left.cancel()
    failureResultOf(left, CancelledError)
    net.resume("a", "c")
    net.settle()
    assert a.node.queue.depth == 1
    assert b.held("a") == c.held("a") == 1
    (message,) = got(net, a)
    assert message.body == b"client left"
    if key is not None:  # a retry under the key answers that push
        again = a.push(b"client left", key=key)
        net.settle()
        answer = successResultOf(again)
        assert answer.ids == [message.id] and answer.created is False
    wire.check()


def test_a_push_whose_client_left_and_that_fails_is_withdrawn_everywhere(make, wire):
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    net.pause("a", "c")
    left = a.push(b"client left")
    net.settle()
    assert b.held("a") == 1
    left.cancel()
    failureResultOf(left, CancelledError)
    lose_bytes_in_flight(net, "a", "c")
    net.cut("a", "c")  # the push cannot get its third copy
    net.settle()
    assert a.node.queue.depth == 0 and a.node.queue.pending == 0
    assert b.held("a") == c.held("a") == 0  # its tombstone reached B
    wire.check()


def test_with_two_copies_one_acknowledging_replica_answers(make, wire):
    net = make("abc", min_copies=2)
    a, b, c = net.start_all()
    net.pause("a", "b")
    net.pause("a", "c")
    d = a.push(b"two copies")
    net.settle()
    assertNoResult(d)  # nobody but A holds it
    held_then = answered_when(d, lambda r: (holds(b, r.ids[0]), holds(c, r.ids[0])))
    net.resume("a", "c")
    net.settle()
    mid = successResultOf(d).ids[0]
    assert held_then == [(False, True)]
    net.resume("a", "b")
    net.settle()
    assert holds(b, mid)
    wire.check()


def test_a_recovering_replica_acknowledges_but_is_no_copy(make, wire):
    net = make("abc", min_copies=2)
    a, b, c = net.start_all()
    net.cut("c")
    c2 = net.build("c")  # a replacement: it recovers until B syncs it too
    net.connect(c2, a)
    net.settle()
    assert c2.node.readiness.reason().startswith("recovering")
    net.pause("a", "b")
    d = a.push(b"needs a serving copy")
    net.settle()
    assert c2.held("a") == 1
    assert wire.copied("c", "a") == [dict(upto=1, holder=False, refused=None)]
    assertNoResult(d)  # C stored it but may not count as a holder yet
    net.resume("a", "b")
    net.settle()
    mid = successResultOf(d).ids[0]
    assert holds(b, mid)
    wire.check()


def test_copied_waits_until_the_copy_is_on_disk_in_number_order(make, wire, monkeypatch):
    # --data-dir: a copy settles once written; writes may finish out of order.
    net = make("ab", min_copies=2)
    a, b = net.start_all()
    holdings = b.cluster.replicator.holdings
    merge = holdings.merge_replicated
    writes: list[Deferred] = []

    def slow_disk(records, source=None):
        added, written = merge(records, source)
        assert written is None  # in memory: the test plays the disk
        writes.append(Deferred())
        return added, writes[-1]

    monkeypatch.setattr(holdings, "merge_replicated", slow_disk)
    first = a.push(b"one")
    net.settle()
    second = a.push(b"two")
    net.settle()
    assert len(writes) == 2
    assert b.held("a") == 2  # received and stored, not on disk yet
    assert wire.copied("b", "a") == []
    assertNoResult(first)
    assertNoResult(second)
    writes[1].callback(None)  # box 2 on disk before box 1
    net.settle()
    assert wire.copied("b", "a") == []  # not past box 1, which is not
    assertNoResult(first)
    assertNoResult(second)
    writes[0].callback(None)
    net.settle()
    assert wire.copied("b", "a") == [dict(upto=2, holder=True, refused=None)]
    successResultOf(first)
    successResultOf(second)
    # A failed write is no copy: the push is withdrawn.
    third = a.push(b"three")
    net.settle()
    writes[2].errback(OSError("disk full"))
    net.settle()
    assert wire.copied("b", "a")[-1] == dict(upto=3, holder=False, refused="DISK")
    failureResultOf(third, NotReplicated)
    assert a.node.queue.depth == 2
    wire.check()


def test_an_ack_riding_the_stream_waits_for_the_owners_tombstone_on_disk(
        make, wire, monkeypatch):
    # --data-dir: an ack through a peer that holds a copy is a tombstone in
    # a numbered box to the owner; its 204 waits for the owner's Copied,
    # which waits for the owner's write of the tombstone.
    net = make("abc")
    a, b, c = net.start_all()
    message_id = pushed_id(net, a)
    assert take_all(net, a) == [message_id]
    holdings = a.cluster.replicator.holdings
    merge = holdings.merge_tombstones
    writes: list[Deferred] = []

    def slow_disk(tombstones):
        assert merge(tombstones) is None  # in memory: the test plays the disk
        writes.append(Deferred())
        return writes[-1]

    monkeypatch.setattr(holdings, "merge_tombstones", slow_disk)
    acked = b.ack(message_id)
    net.settle()
    assert a.node.queue.depth == 0  # applied at the owner ...
    assert len(writes) == 1
    assertNoResult(acked)  # ... but not on its disk yet: no 204
    writes[0].callback(None)
    net.settle()
    successResultOf(acked)
    assert wire.copied("a", "b")[-1]["refused"] is None


# -- a link lost mid-stream --------------------------------------------------


def _in_flight_to_c(net: Net, count: int) -> list[Deferred]:
    """``count`` pushes on A, one per turn, their boxes to C in flight."""
    a = net["a"]
    pushes = []
    for i in range(count):
        pushes.append(a.push(b"in flight %d" % i))
        net.settle()
    assert a.cluster.replicator.in_flight("c") == count
    return pushes


def test_link_lost_mid_stream_fails_pushes_that_needed_that_copy(make, wire):
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    net.pause("a", "c")
    pushes = _in_flight_to_c(net, 3)
    for d in pushes:
        assertNoResult(d)  # B holds them; C has not said
    ids = [m.id for m in a.node.queue.messages()]
    assert len(ids) == 3 and all(holds(b, i) for i in ids)
    lose_bytes_in_flight(net, "a", "c")
    net.cut("a", "c")
    # C never got them: no copy there, so no 201 ...
    for d in pushes:
        failureResultOf(d, NotReplicated)
    assert not any(holds(c, i) for i in ids)
    assert a.cluster.replicator.in_flight("c") == 0
    # ... and they are withdrawn: tombstoned on A and B, never delivered.
    net.settle()
    assert a.node.queue.depth == 0
    assert b.held("a") == 0
    assert all(b.cluster.store.is_tombstoned(i) for i in ids)
    assert got(net, a) == [] and got(net, b) == []
    wire.check()


def test_link_lost_mid_stream_with_two_copies_is_answered_by_the_other_peer(make, wire):
    net = make("abc", min_copies=2)
    a, b, c = net.start_all()
    net.pause("a", "b")
    net.pause("a", "c")
    pushes = _in_flight_to_c(net, 3)
    lose_bytes_in_flight(net, "a", "c")
    net.cut("a", "c")
    # C's lost boxes counted as no copy, not as one: B has not said yet.
    for d in pushes:
        assertNoResult(d)
    net.resume("a", "b")
    net.settle()
    ids = [successResultOf(d).ids[0] for d in pushes]
    assert all(holds(b, i) for i in ids)
    assert not any(holds(c, i) for i in ids)
    assert take_all(net, a) == ids
    wire.check()


def test_reconnected_link_numbers_from_one_and_old_copied_settles_nothing(make, wire):
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    first = pushed_id(net, a, b"before")
    old_end = end_of(net, "a", "c")
    assert wire.numbered("a", link=old_end) == [1]
    net.pause("a", "c")
    lost = _in_flight_to_c(net, 2)
    lose_bytes_in_flight(net, "a", "c")
    net.cut("a", "c")
    for d in lost:
        failureResultOf(d, NotReplicated)
    away = a.push(b"while c is away")
    net.settle()
    failureResultOf(away, NotReplicated)
    # C comes back on a new connection.
    net.connect("a", "c")
    net.settle()
    assert a.connected("c") and a.node.readiness.reason() is None
    new_end = end_of(net, "a", "c")
    assert new_end is not old_end
    later = [a.push(b"after %d" % i) for i in range(2)]
    net.settle()
    later_ids = [successResultOf(d).ids[0] for d in later]
    assert wire.numbered("a", link=new_end) == [1]  # numbering restarted
    assert all(holds(c, i) for i in later_ids)
    assert wire.copied("c", "a", link=end_of(net, "c", "a")) == [
        dict(upto=1, holder=True, refused=None)]
    # A push waits on C's new link; a Copied that comes late on the old
    # link (its numbers 1..3 were given there) settles nothing here.
    net.pause("a", "c")
    waiting = a.push(b"waiting")
    net.settle()
    assertNoResult(waiting)
    assert a.cluster.replicator.in_flight("c") == 1
    for upto in (1, 2, 3, 10):
        a.cluster.replicator.on_copied(old_end, upto, True, None)
    assertNoResult(waiting)
    assert a.cluster.replicator.in_flight("c") == 1
    net.resume("a", "c")
    net.settle()
    waited = successResultOf(waiting).ids[0]
    assert holds(c, waited)
    assert wire.numbered("a", link=new_end) == [1, 2]
    assert take_all(net, a) == [first, *later_ids, waited]
    wire.check()


def _c_dials_a_too(net: Net) -> tuple[Any, Any]:
    """C dials A while their first link lives (A sends to C on the newer
    link from then on): the older link and the newer."""
    (older,) = net.links_between("a", "c")
    newer = net.connect("c", "a")
    net.settle()
    return older, newer


def _a_push_waits_on_an_older_link(net: Net) -> tuple[Deferred, Any, Any]:
    """A's push waits for C on their link, then C dials A too (A sends to
    C on the newer link from then on): the push, the old and new links."""
    net.pause("a", "c")
    waiting = net["a"].push(b"on the old link")
    net.settle()
    assertNoResult(waiting)
    old_link, newer = _c_dials_a_too(net)
    return waiting, old_link, newer


def test_a_newer_link_to_the_peer_still_settles_what_the_old_one_carried(make, wire):
    # Both sides dial, so a peer often has two links and the newer one
    # becomes the one used: boxes sent on the older one are acknowledged
    # on it (a push is not failed because a second connection came up).
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    waiting, old_link, newer = _a_push_waits_on_an_older_link(net)
    new_end = newer.server
    fresh = a.push(b"on the new link")
    net.settle()
    fresh_id = successResultOf(fresh).ids[0]
    assert wire.numbered("a", link=new_end) == [1]
    assert holds(c, fresh_id)
    assertNoResult(waiting)  # still waits for C's word on the old link
    assert a.cluster.replicator.in_flight("c") == 1
    net.resume("a", "c")
    net.settle()
    assert wire.copied("c", "a", link=old_link.server) == [
        dict(upto=1, holder=True, refused=None)]
    waiting_id = successResultOf(waiting).ids[0]
    assert a.cluster.replicator.in_flight("c") == 0
    assert take_all(net, a) == [waiting_id, fresh_id]
    wire.check()


def test_a_closed_link_settles_what_it_carried_as_no_copy(make, wire):
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    lost, old_link, newer = _a_push_waits_on_an_older_link(net)
    lose_link(old_link)  # its bytes in flight are lost, and it closes
    net.settle()
    failureResultOf(lost, NotReplicated)  # no copy on C counted, once
    assert c.held("a") == 0
    assert a.cluster.replicator.in_flight("c") == 0
    fresh = a.push(b"on the new link")
    net.settle()
    successResultOf(fresh)
    assert wire.numbered("a", link=newer.server) == [1]
    wire.check()


def _withdrawal_lost_on_one_link(net: Net) -> tuple[Deferred, Any, Any]:
    """C holds A's push and has two links to A; B never answers, so the
    push is withdrawn, and the Stream box with its tombstone is lost with
    the link A used (C keeps the other one: no peer of A counts as down,
    so nothing would make C sync): the push, the lost and the kept link."""
    kept, newer = _c_dials_a_too(net)
    net.pause("a", "b")  # B gets nothing and answers nothing
    withdrawn = net["a"].push(b"withdrawn")
    net.settle()
    assertNoResult(withdrawn)
    newer.paused = True  # what A sends to C next stays in flight ...
    lose_bytes_in_flight(net, "a", "b")
    net.cut("a", "b")  # ... B's link is lost: the push fails, its tombstone goes
    turn(net)
    lose_link(newer)  # ... and is lost with the link
    net.settle()
    return withdrawn, kept, newer


def test_a_tombstone_lost_with_a_link_goes_again_on_the_other(make, wire):
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    withdrawn, kept, newer = _withdrawal_lost_on_one_link(net)
    failureResultOf(withdrawn, NotReplicated)
    assert newer.closed and not kept.closed
    assert c.connected("a") and a.connected("c")
    # The withdrawn push's copy on C went with the tombstone sent again on
    # the link left, at once: not ten seconds later, with anti-entropy.
    assert c.held("a") == 0
    again = [e for e in wire.sent(cmd.Stream, "a", "c")
             if e.link in (kept.client, kept.server)
             and e.values["tombstones"] is not None]
    assert len(again) == 1
    wire.check()


def test_a_tombstone_a_lost_link_carried_goes_again_once_the_peer_is_back(make, wire):
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    withdrawn, kept, newer = _withdrawal_lost_on_one_link(net)
    failureResultOf(withdrawn, NotReplicated)
    # As above, but C's other link is lost too before A could send again:
    # the tombstone waits for C, and goes on the first link back.
    net.cut("c")
    assert not a.connected("c")
    assert a.cluster.replicator._lanes["c"].resend is not None
    net.connect("c", "a")
    net.settle()
    assert a.connected("c")
    assert a.cluster.replicator._lanes["c"].resend is None
    (back,) = net.links_between("a", "c")
    again = [e for e in wire.sent(cmd.Stream, "a", "c")
             if e.link in (back.client, back.server) and e.values["tombstones"] is not None]
    assert len(again) == 1
    assert c.held("a") == 0
    wire.check()


def test_tombstones_kept_for_a_link_are_forgotten_as_its_copied_come(make, wire):
    # An owner acking its own messages sends tombstones only (no number
    # needed): every TOMBSTONES_CONFIRMED_EVERY one box gets a number and a
    # Copied, so what is kept in case the link is lost stays small.
    net = make("abc")
    a, b, c = net.start_all()
    ids = [pushed_id(net, a, b"m%d" % i) for i in range(40)]
    assert take_all(net, a) == ids
    replicator = a.cluster.replicator
    kept_most = 0
    for message_id in ids:
        successResultOf(a.ack(message_id))
        net.advance(0.02)
        kept_most = max(kept_most, *(len(u) for lane in replicator._lanes.values()
                                     for u in lane.unconfirmed.values()))
    assert b.held("a") == c.held("a") == 0
    every = TOMBSTONES_CONFIRMED_EVERY
    assert kept_most <= every / 0.02 + 2
    for peer in "bc":
        numbered = [e for e in wire.sent(cmd.Stream, "a", peer) if e.seq is not None
                    and e.values["records"] is None]
        assert len(numbered) == pytest.approx(40 * 0.02 / every, abs=2)
        assert wire.copied(peer, "a")[-1]["upto"] == numbered[-1].seq
    wire.check()


# -- a peer that never acknowledges -------------------------------------------


def test_silent_peer_fails_pushes_at_the_timeout_then_its_lane_is_freed(
        make, wire, monkeypatch):
    net = make("abc", min_copies=3, replication_timeout=2.0)
    a, b, c = net.start_all()
    replicator = c.cluster.replicator
    acknowledge = replicator._acknowledge_link
    silent = [True]

    def gate(link) -> None:
        if not silent[0]:  # else C takes the records, answers heartbeats, says nothing
            acknowledge(link)

    monkeypatch.setattr(replicator, "_acknowledge_link", gate)
    pushes = []
    for i in range(MAX_IN_FLIGHT + 2):  # one turn each
        pushes.append(a.push(b"unacknowledged %d" % i))
        net.settle()
    assert a.cluster.replicator.in_flight("c") == MAX_IN_FLIGHT
    assert c.held("a") == MAX_IN_FLIGHT  # the rest waits for room
    net.advance(1.9)
    assert a.connected("c") and c.connected("a")
    for d in pushes:
        assertNoResult(d)
    net.advance(0.2)
    for d in pushes:
        failureResultOf(d, NotReplicated)
    assert a.node.queue.depth == 0 and a.node.queue.pending == 0
    assert b.held("a") == 0 and c.held("a") == 0  # withdrawn everywhere
    assert wire.copied("c", "a") == []
    # C acknowledges again: a later push goes out and is answered, though
    # the boxes that timed out were never acknowledged one by one.
    silent[0] = False
    net.advance(0.5)
    later = a.push(b"later")
    net.settle()
    later_id = successResultOf(later).ids[0]
    assert holds(b, later_id) and holds(c, later_id)
    assert a.cluster.replicator.in_flight("c") == 0
    # Between the timed-out boxes and the later push, the box with the
    # tombstones that withdrew them was numbered too (nothing was for 2 s),
    # so that C says it has them.
    assert wire.numbered("a", "c") == [*range(1, MAX_IN_FLIGHT + 1), MAX_IN_FLIGHT + 2]
    (withdrawal,) = [e for e in wire.sent(cmd.Stream, "a", "c")
                     if e.seq == MAX_IN_FLIGHT + 1]
    assert withdrawal.values["tombstones"] and withdrawal.values["records"] is None
    assert take_all(net, a) == [later_id]
    wire.check()


# -- states ride along --------------------------------------------------------


def _states_boxes(wire: Wire, owner: str) -> list[dict[str, Any]]:
    return [e.values for e in wire.sent(cmd.Stream, owner)
            if e.values.get("states") is not None]


def test_states_go_within_the_linger_and_not_before(make, wire):
    net = make("abc")
    a, b, c = net.start_all()
    mid = pushed_id(net, a)
    (taken,) = got(net, a)
    assert taken.id == mid and a.node.queue.get(mid).deliveries == 1
    # No box went since: the states wait.
    assert _states_boxes(wire, "a") == []
    assert b.cluster.store.get(mid).deliveries == 0
    net.advance(LINGER * 0.8)
    assert _states_boxes(wire, "a") == []
    assert b.cluster.store.get(mid).deliveries == 0
    net.advance(LINGER * 0.4)
    assert len(_states_boxes(wire, "a")) == 2  # one box per peer
    assert b.cluster.store.get(mid).deliveries == c.cluster.store.get(mid).deliveries == 1
    # Said once.
    net.advance(1.0)
    assert len(_states_boxes(wire, "a")) == 2
    wire.check()


def test_a_state_waits_its_own_linger_not_that_of_the_states_before_it(make, wire):
    # A state changed just before earlier states go does not go with them:
    # a lease that ends within half a linger never sends its state.
    net = make("abc")
    a, b, c = net.start_all()
    first, second = pushed_id(net, a, b"1"), pushed_id(net, a, b"2")
    assert [m.id for m in got(net, a)] == [first]
    net.advance(LINGER * 0.9)
    assert [m.id for m in got(net, a)] == [second]
    net.advance(LINGER * 0.2)
    assert [(e.values["states"].count(first.encode()), e.values["states"].count(
        second.encode())) for e in wire.sent(cmd.Stream, "a")
        if e.values.get("states") is not None] == [(1, 0), (1, 0)]
    successResultOf(a.ack(second))
    net.advance(LINGER * 2)
    assert len(_states_boxes(wire, "a")) == 2  # the second's never went
    assert b.cluster.store.get(first).deliveries == 1
    assert not b.cluster.store.holds(second)
    wire.check()


def test_states_wait_for_their_linger_even_when_a_push_goes(make, wire):
    net = make("abc")
    a, b, c = net.start_all()
    mid = pushed_id(net, a)
    before = len(wire.sent(cmd.Stream, "a"))
    taking = a.get()
    pushing = a.push(b"same turn")
    net.settle()  # no time passes
    assert [r.id for r in successResultOf(taking)] == [mid]
    successResultOf(pushing)
    boxes = [e.values for e in wire.sent(cmd.Stream, "a")][before:]
    assert len(boxes) == 2  # one box per peer: the push, without the state
    assert all(v["records"] is not None and v["states"] is None for v in boxes)
    assert b.cluster.store.get(mid).deliveries == 0
    net.advance(LINGER * 1.2)
    assert len(_states_boxes(wire, "a")) == 2
    assert b.cluster.store.get(mid).deliveries == c.cluster.store.get(mid).deliveries == 1
    wire.check()


def test_message_got_and_acked_within_the_linger_sends_no_state(make, wire):
    net = make("abc")
    a, b, c = net.start_all()
    mid = pushed_id(net, a)
    (taken,) = got(net, a)
    d = a.ack(taken.id)
    net.settle()
    successResultOf(d)
    net.advance(5 * LINGER)
    assert _states_boxes(wire, "a") == []
    tombstoned = [e.values for e in wire.sent(cmd.Stream, "a")
                  if e.values.get("tombstones") is not None]
    assert len(tombstoned) == 2
    assert all(v["records"] is None and v["seq"] is None for v in tombstoned)
    for m in (b, c):
        assert m.cluster.store.is_tombstoned(mid) and m.held("a") == 0
    wire.check()


# -- refused boxes ------------------------------------------------------------


def _raw_box(net: Net, owner: str, peer: str, records: bytes) -> int:
    """Send ``records`` to ``peer`` as ``owner``'s next numbered box (the
    number taken from its own numbering, so its stream goes on)."""
    replicator = net[owner].cluster.replicator
    end = end_of(net, owner, peer)
    sent = replicator._lanes[peer].sent[end]
    seq = sent.send(Awaiting([], []), net.clock.seconds())
    end.send(cmd.Stream, epoch=net[owner].node.epoch, seq=seq, records=records)
    return seq


@pytest.mark.parametrize("what, code", [("garbage", "BAD_INPUT"),
                                        ("another owner's", "NOT_HOLDER")])
def test_refused_records_are_acknowledged_as_refused_and_change_nothing(
        make, wire, what, code):
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    kept = pushed_id(net, a, b"kept")
    if what == "garbage":
        records = b"garbage"
    else:
        records = encode_records([Record(id=format_id("c", c.node.epoch, 99), body=b"forged")])
    before = {m.name: sorted(r.id for r in m.cluster.store.records()) for m in (b, c)}
    seq = _raw_box(net, "a", "b", records)
    net.settle()
    assert seq == 2
    assert wire.copied("b", "a")[-1] == dict(upto=2, holder=False, refused=code)
    after = {m.name: sorted(r.id for r in m.cluster.store.records()) for m in (b, c)}
    assert after == before and b.held("a") == 1 and b.held("c") == 0
    assert not a.node.readiness.fenced and b.connected("a")
    # The stream goes on: the next push is box 3 and answered.
    later = pushed_id(net, a, b"later")
    assert wire.numbered("a", "b") == [1, 2, 3]
    assert wire.copied("b", "a")[-1] == dict(upto=3, holder=True, refused=None)
    assert take_all(net, a) == [kept, later]
    wire.check()


def test_stale_epoch_refusal_fences_the_sender(make, wire):
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    b.cluster.store.note_epoch("a", a.node.epoch + 1)  # B knows a newer A
    d = a.push(b"from the past")
    net.settle()  # no time passes: no heartbeat tells A, only the Copied
    assert wire.copied("b", "a") == [dict(upto=1, holder=False, refused="STALE_EPOCH")]
    failureResultOf(d, NotReplicated)
    assert a.node.readiness.fenced and a.node.readiness.reason().startswith("fenced")
    assert b.held("a") == 0
    failureResultOf(a.push(b"again"), NotReady)
    net.advance(FENCE_LINGER + 0.1)
    assert c.held("a") == 0  # the withdrawal reached C before A left
    assert got(net, c) == []
    wire.check()

"""The cluster layer over real AMP (DESIGN.md, "Promises" and "Replication").

Every test builds 2 or 3 nodes in memory (see :mod:`tests.amp_harness`): a
QueueNode and a Cluster per node, one shared Clock, and PeerProtocol pairs
over iosim fake transports.  Time only moves when a test moves it, so every
assertion about "within a second" or "after the timeout" is exact.
"""

from __future__ import annotations

from typing import Iterator

import pytest

from twisted.logger import LogLevel
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test import iosim

from dqid import amp_commands as cmd
from dqid.amp_protocol import PeerProtocol, negotiate
from dqid.replicator import MAX_IN_FLIGHT
from dqid.ids import format_id, parse_id
from dqid.replica import Record
from dqid.auth_commands import AuthChallenge, AuthProve
from dqid.errors import NotReady, NotReplicated
from dqid.handshake import DiallerHandshake
from dqid.timings import DEFAULT_TIMINGS
from dqid import transfer
from dqid.holdings import Holdings

DEAD_AFTER = DEFAULT_TIMINGS.dead_after
HEARTBEAT_INTERVAL = DEFAULT_TIMINGS.heartbeat_interval
RECOVERY_GRACE = DEFAULT_TIMINGS.recovery_grace
from dqid.queue import QueueFull, UnknownMessage

from .amp_harness import Net
from .helpers import assertNoResult, failureResultOf, successResultOf


@pytest.fixture
def nets() -> Iterator[list[Net]]:
    """Nets made by a test; each is closed at the end and must leave no
    timer behind and no traceback in the log."""
    made: list[Net] = []
    yield made
    for net in made:
        leftover = net.close()
        assert leftover == [], f"delayed calls left after stop(): {leftover}"
        assert net.failures() == []


@pytest.fixture
def make(nets):
    def make(names: str = "abc", min_copies: int | None = None, **kw) -> Net:
        names_list = list(names)
        net = Net(names_list, len(names_list) if min_copies is None else min_copies, **kw)
        nets.append(net)
        return net

    return make


def ids_in_queue(member) -> list[str]:
    return [m.id for m in member.node.queue.messages()]


def got(net: Net, member, **kw) -> list:
    """What a get (no wait) on ``member`` returns, local or from a peer."""
    d = member.get(**kw)
    net.settle()
    return successResultOf(d)


def take_all(net: Net, member, count: int = 100) -> list[str]:
    return [m.id for m in got(net, member, count=count)]


def pushed_id(net: Net, member, body: bytes = b"job") -> str:
    d = member.push(body)
    net.settle()
    return successResultOf(d).ids[0]


# -- Hello: versions, ids, membership ----------------------------------------


def test_negotiate_picks_best_overlap_or_none():
    assert negotiate(1, 3, 2, 5) == 3
    assert negotiate(2, 5, 1, 3) == 3
    assert negotiate(1, 1, 1, 1) == 1
    assert negotiate(1, 4, 4, 9) == 4
    assert negotiate(1, 2, 3, 4) is None
    assert negotiate(3, 4, 1, 2) is None


def _answer(d, pump):
    """Flush ``pump`` and return what ``d`` fired with (handled here, so an
    error answer is not an unhandled AMP failure)."""
    box: list = []
    d.addBoth(box.append)
    pump.flush()
    assert box, "no answer"
    return box[0]


def _bare_client(net: Net, listener: str, node: str = "a", key: bytes | None = None):
    """A bare AMP client connected to ``listener`` that proved ``key`` (the
    cluster's by default) as ``node``: (client, server, pump)."""
    server = PeerProtocol(net[listener].cluster, net.auth(listener))
    client = amp.AMP()
    pump = iosim.connect(server, iosim.makeFakeServer(server), client,
                         iosim.makeFakeClient(client), greet=False, clock=net.clock)
    handshake = DiallerHandshake(key or net.key, node, listener)
    challenge = handshake.challenge()
    answer = _answer(client.callRemote(AuthChallenge, node=node, nonce=challenge.nonce), pump)
    proof = handshake.answered(answer["node"], answer["nonce"], answer["proof"])
    _answer(client.callRemote(AuthProve, proof=proof), pump)
    return client, server, pump


def _raw_hello(net: Net, listener: str, **overrides):
    """Say Hello to ``listener`` from a bare AMP client: (answer, server, pump)."""
    client, server, pump = _bare_client(net, listener)
    arguments = dict(version_min=cmd.PROTOCOL_MIN, version_max=cmd.PROTOCOL_MAX,
                     node="a", epoch=0, cluster=sorted(net.names))
    arguments.update(overrides)
    answer = _answer(client.callRemote(cmd.Hello, **arguments), pump)
    return answer, server, pump


def test_hello_without_common_version_is_refused_and_logged(make):
    net = make("ab")
    net.build("a")
    b = net.build("b")
    answer, server, pump = _raw_hello(net, "b", version_min=cmd.PROTOCOL_MAX + 1,
                                      version_max=cmd.PROTOCOL_MAX + 5)
    assert isinstance(answer, Failure) and answer.check(cmd.NoCommonVersion)
    assert b.cluster.peers["a"].links == []
    assert server.peer_id is None
    assert not b.connected("a")
    errors = net.logged(LogLevel.error)
    assert any("refused a" in e and "protocol" in e for e in errors), errors
    # Nothing else is served on a link that never said a good Hello.
    answer = _answer(pump.client.callRemote(cmd.Heartbeat, node="a", epoch=0, ready=0,
                                            serving=False), pump)
    assert isinstance(answer, Failure) and answer.check(cmd.NotHolder)
    pump.client.transport.loseConnection()
    pump.flush()


def test_hello_from_another_cluster_is_refused_never_half_joined(make):
    net = make("ab")
    a = net.build("a", members=["a", "b", "c"])  # A thinks C exists too
    b = net.build("b")
    net.connect("a", "b")
    net.advance(0.5)
    # B refused with ClusterMismatch; A logged why and dropped the link.
    errors = net.logged(LogLevel.error)
    assert any("refused a" in e and "cluster" in e for e in errors), errors
    warnings = net.logged(LogLevel.warn)
    assert any("hello to b failed" in w for w in warnings), warnings
    assert a.cluster.peers["b"].links == [] and b.cluster.peers["a"].links == []
    assert not a.connected("b") and not b.connected("a")
    assert a.node.stats()["peers"]["b"]["connected"] is False
    # Neither side started a sync or counted the other: both still recover.
    assert a.node.readiness.reason() is not None and b.node.readiness.reason() is not None
    assert all(link.closed for link in net.links)


def test_dialler_logs_a_refused_version(make, monkeypatch):
    net = make("ab")
    a = net.build("a")
    b = net.build("b")
        # A speaks only versions B does not: its Hello leaves under those
    # (once the connection is authenticated).
    say_hello = a.cluster.say_hello

    def say_newer_hello(link):
        with monkeypatch.context() as versions:
            versions.setattr(cmd, "PROTOCOL_MIN", cmd.PROTOCOL_MAX + 1)
            versions.setattr(cmd, "PROTOCOL_MAX", cmd.PROTOCOL_MAX + 3)
            say_hello(link)

    monkeypatch.setattr(a.cluster, "say_hello", say_newer_hello)
    net.connect(a, b)
    net.advance(0.5)
    assert any("refused a" in e and "protocol" in e for e in net.logged(LogLevel.error))
    assert any("hello to b failed" in w for w in net.logged(LogLevel.warn))
    assert a.cluster.peers["b"].links == [] and b.cluster.peers["a"].links == []
    assert not a.connected("b") and not b.connected("a")
    assert all(link.closed for link in net.links)


def test_hello_cluster_mismatch_raw(make):
    net = make("ab")
    net.build("a")
    b = net.build("b")
    for overrides in ({"cluster": ["a", "b", "x"]}, {"cluster": ["a"]},
                      {"node": "x", "cluster": ["a", "b", "x"]}, {"node": "x"}):
        answer, server, pump = _raw_hello(net, "b", **overrides)
        assert isinstance(answer, Failure) and answer.check(cmd.ClusterMismatch), overrides
        assert server.peer_id is None
    assert b.cluster.peers["a"].links == []


def test_hello_answered_by_the_wrong_node_is_dropped(make):
    net = make("abc")
    a = net.build("a")
    net.build("b")
    c = net.build("c")
    # A dials what it believes is B (a wrong --peer address), but C answers.
    link = net.connect(a, c, dialled="b")
    net.settle()
    assert link.closed
    assert a.cluster.peers["b"].links == [] and a.cluster.peers["c"].links == []
    assert c.cluster.peers["a"].links == []
    assert any("says it is c" in e and "check --peer" in e
               for e in net.logged(LogLevel.error))


# -- cold start --------------------------------------------------------------


def test_cold_start_of_three_nodes_serves_after_sync(make):
    net = make("abc")
    for name in "abc":
        m = net.build(name)
        assert m.node.readiness.reason().startswith("recovering")
        failureResultOf(m.push(), NotReady)
    net.mesh()
    net.settle()
    for name, m in net.members.items():
        assert m.node.readiness.reason() is None, (name, m.node.readiness.reason())
        assert m.cluster.serving and m.node.epoch > 0
        assert all(m.cluster.transfer.synced(p) for p in m.cluster.peers.values())
        assert all(m.connected(p) for p in m.cluster.peers)
    # They learned each other's epochs from Announce.
    for m in net.members.values():
        for p, peer in m.cluster.peers.items():
            assert peer.epoch == net[p].node.epoch and peer.serving


# -- replicate before 201 ----------------------------------------------------


def test_push_is_pending_until_every_required_copy_exists(make):
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    net.pause("c")
    d = a.push(b"hello")
    net.settle()
    # B answered, C has not: still pending, counts toward --size, no 201.
    assertNoResult(d)
    assert a.node.queue.pending == 1 and a.node.queue.ready == 0
    assert a.node.queue.depth == 1
    assert a.node.take_own(1, 30.0) == []  # not deliverable while pending
    net.resume("c")
    net.settle()
    result = successResultOf(d)
    mid = result.ids[0]
    assert parse_id(mid).node == "a" and parse_id(mid).epoch == a.node.epoch
    assert a.node.queue.pending == 0 and a.node.queue.ready == 1
    assert b.held("a") == 1 and c.held("a") == 1
    assert b.cluster.store.get(mid).body == b"hello"


def test_pending_pushes_count_toward_size(make):
    net = make("ab", size=2)
    a, b = net.start_all()
    net.pause("b")
    first, second = a.push(), a.push()
    net.settle()
    assertNoResult(first)
    failureResultOf(a.push(), QueueFull)  # two pending pushes fill it
    net.resume("b")
    net.settle()
    successResultOf(first)
    successResultOf(second)
    failureResultOf(a.push(), QueueFull)


def test_pushes_of_one_turn_are_one_stream_box_per_peer(make, monkeypatch):
    net = make("abc")
    a, b, c = net.start_all()
    calls: list[tuple[str, str | None]] = []
    original = PeerProtocol.send

    def counting(self, command, **kw):
        if command is cmd.Stream and kw.get("records") is not None:
            calls.append((self.handlers.me, self.peer_id))
        return original(self, command, **kw)

    monkeypatch.setattr(PeerProtocol, "send", counting)
    pushes = [a.push(b"m%d" % i) for i in range(10)]
    net.settle()
    ids = [successResultOf(d).ids[0] for d in pushes]
    assert sorted(calls) == [("a", "b"), ("a", "c")]
    assert b.held("a") == c.held("a") == 10
    # FIFO per owner survives the batch.
    assert take_all(net, a) == ids
    # A later turn is a new batch.
    calls.clear()
    later = a.push(b"later")
    net.settle()
    successResultOf(later)
    assert sorted(calls) == [("a", "b"), ("a", "c")]


def test_numbered_stream_boxes_in_flight_per_peer_are_bounded(make, monkeypatch):
    net = make("abc", min_copies=2)
    a, b, c = net.start_all()
    calls: list[str | None] = []
    original = PeerProtocol.send

    def counting(self, command, **kw):
        if command is cmd.Stream and kw.get("records") is not None and self.handlers.me == "a":
            calls.append(self.peer_id)
        return original(self, command, **kw)

    monkeypatch.setattr(PeerProtocol, "send", counting)
    net.pause("a", "c")  # C is slow to answer (but not yet dead)
    pushes = []
    for i in range(10):  # ten turns: ten batches
        pushes.append(a.push(b"m%d" % i))
        net.settle()
    assert all(successResultOf(d) for d in pushes)  # B's copy is enough
    assert calls.count("b") == 10
    assert calls.count("c") == MAX_IN_FLIGHT
    assert a.cluster.replicator.in_flight("c") == MAX_IN_FLIGHT
    net.resume("a", "c")
    net.settle()
    # The six batches that waited went to C as one box.
    assert calls.count("c") == MAX_IN_FLIGHT + 1
    assert c.held("a") == 10
    assert a.cluster.replicator.in_flight("c") == 0


def test_push_with_a_peer_down_and_all_copies_required_is_refused(make):
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    net.cut("c")
    assert "2 of 3" in a.node.readiness.reason()
    d = a.push(b"lonely")
    net.settle()
    failureResultOf(d, NotReplicated)
    assert a.node.queue.depth == 0
    assert b.held("a") == 0
    assert got(net, a) == []


def test_push_that_times_out_is_withdrawn_everywhere(make):
    net = make("abc", min_copies=3, replication_timeout=2.0)
    a, b, c = net.start_all()
    net.pause("c")  # C is silent: no answer, no heartbeat
    d = a.push(b"doomed")
    net.settle()
    assertNoResult(d)
    assert b.held("a") == 1  # B got a copy before the outcome was known
    net.advance(0.9)
    assertNoResult(d)
    net.advance(1.2)
    # 503 not_replicated once C counts as down, at the latest at the timeout.
    failureResultOf(d, NotReplicated)
    assert a.node.queue.depth == 0 and a.node.queue.pending == 0
    assert b.held("a") == 0  # the tombstone reached B
    # C wakes up: the stale Stream box lands (A had given up on C) ...
    net.resume("c")
    net.settle()
    assert c.held("a") == 1
    # ... and when C is linked again it resyncs and forgets it.
    net.cut("c")
    for peer in "ab":
        net.connect("c", peer)
    net.advance(1.0)
    assert c.connected("a") and a.connected("c")
    assert c.held("a") == 0
    assert got(net, a) == [] and got(net, b) == [] and got(net, c) == []


def test_push_with_a_peer_down_succeeds_when_fewer_copies_required(make):
    net = make("abc", min_copies=2)
    a, b, c = net.start_all()
    net.cut("c")
    assert a.node.readiness.reason() is None
    d = a.push(b"ok")
    net.settle()
    mid = successResultOf(d).ids[0]
    assert b.held("a") == 1 and c.held("a") == 0
    assert take_all(net, a) == [mid]


def test_large_body_replicates_intact(make):
    net = make("abc")
    a, b, c = net.start_all()
    body = bytes(range(256)) * 800  # 204,800 bytes, > 3 AMP values
    assert len(body) > 3 * cmd.CHUNK
    mid = pushed_id(net, a, body)
    for m in (b, c):
        assert m.cluster.store.get(mid).body == body
    # And back through Take (a get on B served from A).
    taken = got(net, b)
    assert [r.id for r in taken] == [mid] and taken[0].body == body


def test_chunked_argument_round_trips_any_length():
    argument = cmd.Chunked()
    for value in (b"", b"x", b"y" * cmd.CHUNK, b"z" * (cmd.CHUNK * 2 + 1)):
        strings: dict = {}
        argument.toBox(b"records", strings, {"records": value}, None)
        assert all(len(v) <= amp.MAX_VALUE_LENGTH for v in strings.values())
        objects: dict = {}
        argument.fromBox(b"records", strings, objects, None)
        assert objects["records"] == value


# -- acks anywhere -----------------------------------------------------------


def test_ack_on_a_non_owner_reaches_the_owner_and_every_holder(make):
    net = make("abc")
    a, b, c = net.start_all()
    first = pushed_id(net, a, b"one")
    second = pushed_id(net, a, b"two")
    assert b.held("a") == c.held("a") == 2
    d = b.ack(first)
    net.settle()
    successResultOf(d)
    assert first not in ids_in_queue(a)
    assert ids_in_queue(a) == [second]
    assert b.held("a") == 1 and c.held("a") == 1
    assert b.node.stats()["peers"]["a"]["held"] == 1
    d = c.ack(second)
    net.settle()
    successResultOf(d)
    assert a.node.queue.depth == 0
    assert b.held("a") == 0 and c.held("a") == 0
    # Acked is gone: a second ack anywhere is unknown.
    for m in (a, b, c):
        d = m.ack(first)
        net.settle()
        failureResultOf(d, UnknownMessage)


def test_acks_of_one_turn_ride_one_stream_box_to_the_owner(make, monkeypatch):
    net = make("abc")
    a, b, c = net.start_all()
    ids = [pushed_id(net, a, b"m%d" % i) for i in range(6)]
    assert take_all(net, b) == ids  # leased through b
    boxes: list[tuple[str | None, dict]] = []
    calls: list[type] = []
    send, call = PeerProtocol.send, PeerProtocol.callRemote

    def sending(self, command, **kw):
        if command is cmd.Stream and self.handlers.me == "b":
            boxes.append((self.peer_id, kw))
        return send(self, command, **kw)

    def calling(self, command, **kw):
        calls.append(command)
        return call(self, command, **kw)

    monkeypatch.setattr(PeerProtocol, "send", sending)
    monkeypatch.setattr(PeerProtocol, "callRemote", calling)
    acks = [b.ack(i) for i in ids] + [b.ack(ids[0])]  # one twice
    failureResultOf(acks[-1], UnknownMessage)  # acked already, in this turn
    for d in acks[:-1]:
        assertNoResult(d)  # not before the owner has the tombstones
    net.settle()
    for d in acks[:-1]:
        successResultOf(d)
    assert cmd.Ack not in calls
    to_a = [kw for peer, kw in boxes if peer == "a"]
    to_c = [kw for peer, kw in boxes if peer == "c"]
    # One box each: numbered to the owner, which confirms it; plain to c.
    assert len(to_a) == 1 and to_a[0]["seq"] is not None and to_a[0]["tombstones"]
    assert len(to_c) == 1 and to_c[0]["seq"] is None and to_c[0]["tombstones"]
    assert a.node.queue.depth == 0
    assert b.held("a") == c.held("a") == 0


def test_an_ack_where_no_copy_is_goes_to_the_owner_as_one_ack_call(make, monkeypatch):
    net = make("abc")
    a, b, c = net.start_all()
    ids = [pushed_id(net, a, b"m%d" % i) for i in range(3)]
    assert take_all(net, a) == ids
    b.cluster.store.take_owner("a")  # b missed the copies
    calls: list[list[str]] = []
    original = PeerProtocol.callRemote

    def counting(self, command, **kw):
        if command is cmd.Ack:
            calls.append(kw["ids"])
        return original(self, command, **kw)

    monkeypatch.setattr(PeerProtocol, "callRemote", counting)
    acks = [b.ack(i) for i in ids]
    net.settle()
    assert calls == [ids]  # only the owner knows them: asked, in one call
    for d in acks:
        successResultOf(d)
    assert a.node.queue.depth == 0 and c.held("a") == 0


def test_an_acked_message_stays_acked_when_the_owner_is_lost_before_confirming(make):
    net = make("abc", min_copies=2)
    a, b, c = net.start_all()
    message_id = pushed_id(net, a)
    assert take_all(net, a) == [message_id]
    d = b.ack(message_id)  # rides the stream to a ...
    net.cut("a")  # ... which is gone before it confirms
    successResultOf(d)  # the tombstone written here reaches it later
    assert b.held("a") == c.held("a") == 0
    for peer in "bc":
        net.connect("a", peer)
    net.advance(0.5)
    assert message_id not in ids_in_queue(a)
    assert got(net, a) == []


def test_ack_while_the_owner_is_down_is_applied_when_it_returns(make):
    net = make("abc", min_copies=2)
    a, b, c = net.start_all()
    mid = pushed_id(net, a)
    net.cut("a")
    d = b.ack(mid)
    net.settle()
    successResultOf(d)
    assert b.held("a") == 0 and c.held("a") == 0
    assert mid in ids_in_queue(a)
    for peer in "bc":
        net.connect("a", peer)
    net.advance(0.5)
    assert mid not in ids_in_queue(a)
    assert got(net, a) == []


# -- gets anywhere -----------------------------------------------------------


def test_get_on_a_node_with_nothing_ready_takes_from_a_peer(make):
    net = make("abc")
    a, b, c = net.start_all()
    mid = pushed_id(net, a, b"remote work")
    assert b.node.queue.ready == 0
    d = b.get(visibility=10)  # an int on purpose: amp.Float refuses ints
    net.settle()
    taken = successResultOf(d)
    assert [r.id for r in taken] == [mid] and taken[0].body == b"remote work"
    # A leased it: nobody else gets it now.
    assert a.node.queue.leased == 1
    d = c.get()
    net.settle()
    assert successResultOf(d) == []
    # The worker on B acks it there.
    d = b.ack(mid)
    net.settle()
    successResultOf(d)
    assert a.node.queue.depth == 0 and b.held("a") == c.held("a") == 0


def test_parked_long_poll_is_answered_by_a_push_on_a_peer(make):
    net = make("abc")
    a, b, c = net.start_all()
    d = b.get(visibility=10, wait=10)
    net.advance(1.0)
    assertNoResult(d)
    assert b.node.has_long_polls()
    mid = pushed_id(net, a, b"wake up")
    net.run_until(lambda: d.called, limit=2 * HEARTBEAT_INTERVAL + 0.1)
    taken = successResultOf(d)
    assert [r.id for r in taken] == [mid]
    assert a.node.queue.leased == 1 and not b.node.has_long_polls()


def test_long_poll_times_out_empty(make):
    net = make("ab")
    a, b = net.start_all()
    d = b.get(wait=2)
    net.advance(1.9)
    assertNoResult(d)
    net.advance(0.2)
    assert successResultOf(d) == []


# -- heartbeats ----------------------------------------------------------------


def test_silent_peer_is_marked_down_within_about_a_second(make):
    net = make("abc", min_copies=2)
    a, b, c = net.start_all()
    net.advance(1.0)
    assert a.connected("b") and a.connected("c")
    net.pause("a", "b")  # that link stops delivering both ways
    elapsed = net.run_until(lambda: not a.connected("b"), limit=2.0)
    assert DEAD_AFTER - HEARTBEAT_INTERVAL <= elapsed <= DEAD_AFTER + HEARTBEAT_INTERVAL
    assert not b.connected("a")
    assert a.connected("c") and c.connected("a") and b.connected("c")
    assert a.node.stats()["peers"]["b"]["connected"] is False
    # The peer stays down while silent, even though heartbeats keep running.
    net.advance(2.0)
    assert not a.connected("b")


def test_heartbeats_keep_an_idle_link_up(make):
    net = make("ab")
    a, b = net.start_all()
    net.advance(10.0)
    assert a.connected("b") and b.connected("a")
    assert a.node.readiness.reason() is None


# -- replacement, recovery and fencing ---------------------------------------


def _replace_a(net: Net, *, keep_old: bool):
    old = net["a"]
    if not keep_old:
        net.cut("a")
    new = net.build("a")
    return old, new


def test_replacement_recovers_the_queue_before_serving(make):
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    old_epoch = a.node.epoch
    ids = [pushed_id(net, a, b"job%d" % i) for i in range(5)]
    leased = got(net, a, count=1)
    assert [m.id for m in leased] == ids[:1]
    net.advance(0.5)
    old, a2 = _replace_a(net, keep_old=False)
    assert a2.node.readiness.reason().startswith("recovering")
    failureResultOf(a2.push(), NotReady)
    assert a2.node.queue.depth == 0
    for peer in "bc":
        net.connect("a", peer)
    net.settle()
    assert a2.node.readiness.reason() is None
    assert a2.node.epoch > old_epoch
    # Every accepted message is back, ready (the lease is void), in order.
    assert a2.node.queue.ready == 5 and a2.node.queue.leased == 0
    assert ids_in_queue(a2) == ids
    # The peers learned the new epoch and still hold their copies.
    for m in (b, c):
        assert m.cluster.peers["a"].epoch == a2.node.epoch
        assert m.held("a") == 5
    # New ids use the new epoch and never collide with recovered ones.
    new_id = pushed_id(net, a2, b"fresh")
    assert parse_id(new_id).epoch == a2.node.epoch and new_id not in ids
    taken = take_all(net, a2, 3)
    assert taken == ids[:3]
    d = a2.ack(ids[0])
    net.settle()
    successResultOf(d)
    d = b.ack(ids[1])  # through a peer too
    net.settle()
    successResultOf(d)
    assert ids[0] not in ids_in_queue(a2) and ids[1] not in ids_in_queue(a2)
    assert b.held("a") == c.held("a") == 4  # 3 recovered left + 1 new


def test_replacement_with_fewer_copies_syncs_from_enough_peers(make):
    net = make("abc", min_copies=2)
    a, b, c = net.start_all()
    ids = [pushed_id(net, a) for _ in range(3)]
    old, a2 = _replace_a(net, keep_old=False)
    # N - K + 1 = 2 peers needed: one is not enough.
    net.connect("a", "b")
    net.settle()
    assert a2.node.readiness.reason().startswith("recovering")
    assert "1 of 2" in a2.node.readiness.reason()
    net.connect("a", "c")
    net.settle()
    assert a2.node.readiness.reason() is None
    assert ids_in_queue(a2) == ids


def test_stale_twin_is_fenced_and_serves_nothing(make):
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    ids = [pushed_id(net, a) for _ in range(2)]
    old, a2 = _replace_a(net, keep_old=True)  # the old A is still up
    for peer in "bc":
        net.connect(a2, peer)
    net.settle()
    assert a2.node.readiness.reason() is None
    assert a2.node.epoch > old.node.epoch
    # B and C dropped the links of the old epoch when A2 announced.
    for m in (b, c):
        assert all(link.peer_epoch == a2.node.epoch for link in m.cluster.peers["a"].links)
    net.advance(1.5)
    # The old A reconnects (its ClientService would) and is told it is stale.
    link = net.connect(old, b)
    net.settle()
    assert link.closed
    assert old.node.readiness.fenced and old.node.readiness.fenced
    assert old.node.readiness.reason().startswith("fenced")
    assert got(net, old) == []
    failureResultOf(old.push(), NotReady)
    failureResultOf(old.ack(ids[0]), NotReady)
    assert any("fenced" in e for e in net.logged(LogLevel.error))
    # The new A still serves the messages.
    assert take_all(net, a2) == ids


def test_stale_twin_still_linked_is_fenced_by_its_next_call(make):
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    old_epoch = a.node.epoch
    # B learns of a newer epoch for A before the old A's next heartbeat.
    b.cluster.store.note_epoch("a", old_epoch + 1)
    net.advance(2 * HEARTBEAT_INTERVAL)
    assert a.node.readiness.fenced and a.node.readiness.reason().startswith("fenced")
    assert got(net, a) == []


def test_replacement_never_reuses_ids_even_at_the_same_clock_time(make):
    # The replacement's clock may be no later than the old node's (another
    # host, or a quick restart): its epoch must still be above the old one.
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    old_id = pushed_id(net, a)
    old, a2 = _replace_a(net, keep_old=False)
    net.clock.advance(0)  # no time passes
    for peer in "bc":
        net.connect(a2, peer)
    net.settle()
    assert a2.node.epoch > old.node.epoch
    new_id = pushed_id(net, a2)
    assert new_id != old_id
    assert parse_id(new_id).epoch == a2.node.epoch
    assert set(ids_in_queue(a2)) == {old_id, new_id}


def test_peer_whose_hello_crossed_the_recovery_learns_the_new_epoch(make):
    # A2 dials B and C at once; it recovers from B while its Hello (epoch 0)
    # to C is still unanswered.  C must still learn A2's epoch, or it would
    # let the old A back in.
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    pushed_id(net, a)
    old, a2 = _replace_a(net, keep_old=False)
    net.connect(a2, b)
    net.connect(a2, c)
    net.pause("a", "c")
    # Recovers from B alone once the grace for C's sync has passed.
    net.run_until(lambda: a2.cluster.serving, limit=RECOVERY_GRACE + 0.5)
    net.resume("a", "c")
    net.settle()
    assert c.cluster.peers["a"].epoch == a2.node.epoch
    assert c.cluster.store.epochs["a"] == a2.node.epoch
    assert any(f"peer a serves as epoch {a2.node.epoch}" in line
               for line in net.logged(LogLevel.info))
    link = net.connect(old, c)
    net.settle()
    assert link.closed and old.node.readiness.fenced
    assert [l.peer_epoch for l in c.cluster.peers["a"].links] == [a2.node.epoch]


def test_stale_twin_push_is_refused_by_a_peer_that_knows_better(make):
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    b.cluster.store.note_epoch("a", a.node.epoch + 1)
    d = a.push(b"from the past")
    net.settle()
    failureResultOf(d, NotReplicated)
    assert a.node.readiness.fenced
    assert b.held("a") == 0 and c.held("a") == 0
    assert a.node.queue.depth == 0


# -- anti-entropy ------------------------------------------------------------


def test_peer_that_was_down_catches_up_on_reconnect(make):
    net = make("abc", min_copies=2)
    a, b, c = net.start_all()
    kept = pushed_id(net, a, b"kept")
    gone = pushed_id(net, a, b"gone")
    b_own = pushed_id(net, b, b"from b")
    assert c.held("a") == 2 and c.held("b") == 1
    net.cut("c")
    new_a = pushed_id(net, a, b"new on a")
    new_b = pushed_id(net, b, b"new on b")
    d = a.ack(gone)
    net.settle()
    successResultOf(d)
    d = a.ack(b_own)  # an ack through a non-owner while C is away
    net.settle()
    successResultOf(d)
    assert c.held("a") == 2 and c.held("b") == 1  # C saw none of it
    for peer in "ab":
        net.connect("c", peer)
    net.advance(0.5)
    held_a = {r.id for r in c.cluster.store.records("a")}
    held_b = {r.id for r in c.cluster.store.records("b")}
    assert held_a == {kept, new_a}
    assert held_b == {new_b}
    assert c.node.readiness.reason() is None
    # The tombstones arrived too: the acked ids are gone for good on C.
    assert c.cluster.store.is_tombstoned(gone)
    assert c.cluster.store.is_tombstoned(b_own)


ANTI_ENTROPY_INTERVAL = DEFAULT_TIMINGS.anti_entropy_interval


@pytest.fixture
def pulled(monkeypatch) -> list[tuple[str, str, str]]:
    """(puller, peer pulled, record id) for every record a sync page
    carried (sync pages are what Holdings.merge_records merges)."""
    carried: list[tuple[str, str, str]] = []
    real = Holdings.merge_records

    def merge_records(self, records, source=None):
        records = list(records)
        carried.extend((self.me, source, r.id) for r in records)
        return real(self, records, source)

    monkeypatch.setattr(Holdings, "merge_records", merge_records)
    return carried


def test_a_periodic_pull_carries_only_what_the_puller_lacks(make, pulled):
    net = make("abc")
    a, b, c = net.start_all()
    ids = [pushed_id(net, a, b"a%d" % i) for i in range(5)] + [pushed_id(net, b, b"from b")]
    pulled.clear()
    net.advance(ANTI_ENTROPY_INTERVAL + 2)  # every node pulled every peer again
    assert pulled == []
    # A copy missed (C lost B's and A's copies without a tombstone, as a bug
    # or a disk would): the next pass brings exactly those back.
    lost = {r.id for r in c.cluster.store.records()}
    assert lost == set(ids)
    c.cluster.store.take_owner("a")
    c.cluster.store.take_owner("b")
    net.advance(ANTI_ENTROPY_INTERVAL + 2)
    assert {r.id for r in c.cluster.store.records()} == lost
    # From each peer (both hold all six), and nothing to A or B.
    assert sorted(pulled) == sorted(("c", peer, i) for peer in "ab" for i in ids)


def test_a_periodic_pull_still_carries_the_owners_word_on_a_delivered_copy(make, pulled):
    net = make("abc")
    a, b, c = net.start_all()
    leased = pushed_id(net, a, b"delivered")
    untouched = pushed_id(net, a, b"never delivered")
    assert take_all(net, a, count=1) == [leased]  # the first in line
    net.advance(1.0)  # the owner's word on it reaches the copies
    assert c.cluster.store.get(leased).deliveries == 1
    # B missed that word (reset here by hand, as a lost box would leave it).
    b.cluster.store.set_state(leased, 0, False, None)
    pulled.clear()
    net.advance(ANTI_ENTROPY_INTERVAL + 2)
    assert b.cluster.store.get(leased).deliveries == 1
    # Only the leased message travelled, from its owner, to each peer: not
    # the untouched one, and no copy held by a peer that is not its owner.
    assert sorted(pulled) == [("b", "a", leased), ("c", "a", leased)]
    assert untouched not in {i for _, _, i in pulled}


def every_pull_of(ids, names: str = "abc") -> list[tuple[str, str, str]]:
    return sorted((puller, peer, i) for puller in names for peer in names
                  if peer != puller for i in ids)


def test_a_periodic_pull_from_a_protocol_4_peer_is_a_full_one(make, pulled, monkeypatch):
    monkeypatch.setattr(cmd, "PROTOCOL_MAX", cmd.SEEN_SUMMARIES - 1)
    net = make("abc")
    net.start_all()
    ids = [pushed_id(net, net["a"], b"a%d" % i) for i in range(3)]
    pulled.clear()
    net.advance(ANTI_ENTROPY_INTERVAL + 2)
    # No summary on a protocol 4 link: every node pulls all it holds again.
    assert sorted(pulled) == every_pull_of(ids)


def test_a_summary_too_long_to_send_makes_the_pull_a_whole_one(make, pulled, monkeypatch):
    net = make("abc")
    net.start_all()
    ids = [pushed_id(net, net["a"], b"a%d" % i) for i in range(3)]
    # Every summary names a range at least (the node's own epoch).
    monkeypatch.setattr(transfer, "MAX_SEEN_RANGES", 0)
    pulled.clear()
    net.advance(ANTI_ENTROPY_INTERVAL + 2)
    assert sorted(pulled) == every_pull_of(ids)


def test_a_peer_that_comes_back_is_pulled_in_full(make, pulled):
    net = make("abc")
    a, b, c = net.start_all()
    ids = [pushed_id(net, a, b"a%d" % i) for i in range(3)]
    net.cut("c")
    pulled.clear()
    net.connect("c", "a")
    net.connect("c", "b")
    net.settle()
    # C and its peers may have missed anything while the links were down.
    assert sorted(pulled) == sorted(
        [("a", "c", i) for i in ids] + [("b", "c", i) for i in ids]
        + [("c", "a", i) for i in ids] + [("c", "b", i) for i in ids])


def test_a_periodic_pull_brings_back_an_own_message_of_an_older_epoch(make, pulled):
    """A node's summary names every id of the epoch it serves, but of an
    older one only what it queues or knows gone: a copy of its own from
    before a restart that reaches it late is still taken back."""
    net = make("abc")
    a, b, c = net.start_all()
    epoch = a.node.epoch
    queued_old = format_id("a", epoch - 1, 5)
    missing_old = format_id("a", epoch - 1, 6)
    acked_old = format_id("a", epoch - 1, 7)
    a.node.restore([Record(queued_old, b"queued before")])
    a.cluster.holdings.tombstone(acked_old)
    seen = a.cluster.holdings.seen()
    assert ("a", epoch, 123456) in seen and ("a", epoch + 1, 1) not in seen
    assert ("a", epoch - 1, 5) in seen and ("a", epoch - 1, 7) in seen
    assert ("a", epoch - 1, 6) not in seen
    for member in (b, c):
        member.cluster.store.add(Record(missing_old, b"copy from before"))
    pulled.clear()
    net.advance(ANTI_ENTROPY_INTERVAL + 2)
    assert sorted(p for p in pulled if p[0] == "a") == [
        ("a", "b", missing_old), ("a", "c", missing_old)]
    assert missing_old in a.node.queue and queued_old in a.node.queue


def test_withdrawn_push_is_not_resurrected_by_a_replacement(make):
    net = make("abc", min_copies=3, replication_timeout=2.0)
    a, b, c = net.start_all()
    net.pause("a", "c")  # C still talks to B, but not to A
    d = a.push(b"withdrawn")
    net.advance(2.5)
    failureResultOf(d, NotReplicated)
    assert b.held("a") == 0
    net.resume("a", "c")  # the late Stream box lands on C; A had dropped C
    net.settle()
    assert c.held("a") == 1  # C has a copy and never heard of the withdrawal
    net.cut("a")  # A dies
    a2 = net.build("a")
    net.connect(a2, c)  # C answers first: one sync is enough for K = N ...
    net.settle()
    assert not a2.cluster.serving  # ... but B is up, so A2 waits for it too
    net.advance(0.5)
    net.connect(a2, b)  # B, which holds the tombstone, syncs within the grace
    net.settle()
    assert a2.cluster.serving
    assert got(net, a2) == []  # the 503'd message must never be delivered

"""Peers prove the cluster key; nothing else gets in (DESIGN.md, "Security").

The attacks of issue 9, replayed against in-memory clusters (see
:mod:`tests.amp_harness`: one Clock, real PeerProtocols over iosim):

* an outsider that speaks AMP and knows the commands but not the key
  (``Hello`` as a member with a huge epoch, ``Take``, ``Ack``,
  ``SyncStart``, ``Replicate``, ``Tombstones``) is answered nothing: the
  connection closes, a warning names its address, and no state changes;
* a client or a whole node with the wrong key, and a recorded handshake
  replayed, are refused the same way, and the cluster keeps replicating;
* a connection that proves nothing is closed after the auth timeout;
* through an *authenticated* connection, arbitrary and mutated values for
  every command are a normal or an error answer, never an unhandled
  failure, a hang or a changed queue (hypothesis); forged chunk counts are
  BAD_INPUT too, and values AMP itself cannot parse cost only the link.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionClosed
from twisted.logger import LogLevel, formatEvent
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test import iosim

from dqid import amp_commands as cmd
from dqid.amp_protocol import PeerAuth, PeerProtocol
from dqid.auth_commands import AuthChallenge, AuthProve
from dqid.cluster import Cluster
from dqid.handshake import DIALLER, NONCE_BYTES, DiallerHandshake, HandshakeFailed, make_proof
from dqid.ids import format_id, parse_id
from dqid.node import QueueNode
from dqid.options import PeerAddress
from dqid.queue import LEASED, READY
from dqid.replica import Record
from dqid.timings import DEFAULT_TIMINGS
from dqid.tombstones import Tombstones
from dqid.wire import (
    MAX_EPOCH, WireError, decode_records, decode_tombstones, encode_records, encode_tombstones,
)

from .mutations import mutated

from .amp_harness import Link, Member, Net
from .helpers import successResultOf

OTHER_KEY = b"another cluster's key, also 32 b"
OUTSIDER_HOST = "203.0.113.7"  # TEST-NET-3: the address the outsider connects from
HUGE_EPOCH = MAX_EPOCH


# -- nets ----------------------------------------------------------------------


class KeyedNet(Net):
    """A Net whose members may each have a key of their own (``keys``)."""

    keys: dict[str, bytes]

    def auth(self, name: str, key: bytes | None = None) -> PeerAuth:
        own = getattr(self, "keys", {}).get(name)
        return super().auth(name, key or own)


def keyed_net(names: str = "abc", min_copies: int | None = None,
              keys: dict[str, bytes] | None = None, **kw: Any) -> KeyedNet:
    names_list = list(names)
    net = KeyedNet(names_list, len(names_list) if min_copies is None else min_copies, **kw)
    net.keys = dict(keys or {})
    return net


def closed_cleanly(net: Net) -> None:
    """Close ``net``: no timer may be left behind, no traceback logged."""
    leftover = net.close()
    assert leftover == [], f"delayed calls left after stop(): {leftover}"
    assert net.failures() == []


@pytest.fixture
def nets() -> Iterator[list[Net]]:
    """Nets made by a test, each closed cleanly at its end."""
    made: list[Net] = []
    yield made
    for net in made:
        closed_cleanly(net)


@pytest.fixture
def make(nets):
    def make(*args: Any, **kw: Any) -> KeyedNet:
        net = keyed_net(*args, **kw)
        nets.append(net)
        return net

    return make


def pushed(net: Net, member: Member, count: int, body: bytes = b"job") -> list[str]:
    """Push ``count`` messages on ``member``, each answered 201; their ids."""
    ids = []
    for i in range(count):
        d = member.push(body + b" %d" % i)
        net.settle()
        ids.append(successResultOf(d).ids[0])
    return ids


def start_running(net: KeyedNet, owners: str = "abc") -> KeyedNet:
    """Every node serving; each of ``owners`` owns 4 ready messages, held
    by the others."""
    net.start_all()
    for member in net.members.values():
        assert member.node.readiness.reason() is None
    for owner in owners:
        pushed(net, net[owner], 4, owner.encode())
        for member in net.members.values():
            if member.name != owner:
                assert member.held(owner) == 4
    return net


def running(make, min_copies: int | None = None, **kw: Any) -> KeyedNet:
    return start_running(make("abc", min_copies, **kw))


# -- what must not change ------------------------------------------------------


@dataclass(frozen=True)
class NodeState:
    """What a refused connection must leave as it was on one node."""

    reason: str | None  # None: serving
    fenced: bool
    epoch: int
    known_epochs: tuple[tuple[str, int], ...]
    links: tuple[tuple[str, tuple[int, ...]], ...]  # per peer, the link objects' ids
    queue: tuple[int, int, int]  # depth, ready, leased
    message_ids: frozenset[str]
    held: tuple[tuple[str, int], ...]


def node_state(net: Net, name: str) -> NodeState:
    member = net[name]
    cluster, queue = member.cluster, member.node.queue
    peers = sorted(cluster.peers)
    return NodeState(
        reason=member.node.readiness.reason(),
        fenced=member.node.readiness.fenced,
        epoch=member.node.epoch,
        known_epochs=tuple((n, cluster.holdings.known_epoch(n)) for n in net.names),
        links=tuple((p, tuple(id(link) for link in cluster.peers[p].links)) for p in peers),
        queue=(queue.depth, queue.ready, queue.leased),
        message_ids=frozenset(queue),
        held=tuple((p, member.held(p)) for p in peers),
    )


def cluster_state(net: Net) -> dict[str, NodeState]:
    return {name: node_state(net, name) for name in net.names}


def assert_unharmed(net: Net, before: dict[str, NodeState]) -> None:
    after = cluster_state(net)
    for name in net.names:
        assert after[name] == before[name], name
        assert after[name].reason is None and not after[name].fenced, name


# -- bare AMP clients ----------------------------------------------------------


@dataclass
class Bare:
    """A plain ``amp.AMP`` client connected to one node's PeerProtocol."""

    client: amp.AMP
    server: PeerProtocol
    pump: iosim.IOPump
    address: str  # the client's address as the node sees it

    def call(self, command: type[amp.Command], **arguments: Any) -> Any:
        """Send ``command``, move the bytes; what it fired with (a dict or
        a Failure).  Fails the test if it is still unanswered (a hang)."""
        return self.answer(self.client.callRemote(command, **arguments))

    def call_raw(self, name: bytes, **strings: bytes) -> Any:
        """Send a box of raw strings (values AMP's own types could not make)."""
        return self.answer(self.client.callRemoteString(name, **strings))

    def answer(self, d: Any) -> Any:
        box: list = []
        d.addBoth(box.append)
        self.pump.flush()
        assert box, "no answer and the connection is still open"
        return box[0]

    @property
    def closed(self) -> bool:
        return bool(self.pump.clientIO.disconnected and self.pump.serverIO.disconnected)

    def close(self) -> None:
        if self.client.transport is not None:
            self.client.transport.loseConnection()
        self.pump.flush()


_ports = iter(range(40000, 60000))


def bare(net: Net, listener: str, auth: PeerAuth | None = None) -> Bare:
    """A bare client connected to ``listener`` from the outsider's address;
    it has proven nothing yet."""
    server = PeerProtocol(net[listener].cluster, auth or net.auth(listener))
    client = amp.AMP()
    port = next(_ports)
    server_io = iosim.FakeTransport(
        server, isServer=True, hostAddress=IPv4Address("TCP", "127.0.0.1", 9000),
        peerAddress=IPv4Address("TCP", OUTSIDER_HOST, port))
    client_io = iosim.FakeTransport(
        client, isServer=False, hostAddress=IPv4Address("TCP", OUTSIDER_HOST, port),
        peerAddress=IPv4Address("TCP", "127.0.0.1", 9000))
    pump = iosim.connect(server, server_io, client, client_io, greet=False, clock=net.clock)
    return Bare(client, server, pump, f"{OUTSIDER_HOST}:{port}")


def authenticated(net: Net, listener: str, node: str = "a", hello: bool = True) -> Bare:
    """A bare client that proved the cluster key as ``node`` (and said
    Hello with the epoch ``listener`` knows for it)."""
    peer = bare(net, listener)
    handshake = DiallerHandshake(net.key, node, listener)
    challenge = handshake.challenge()
    answer = peer.call(AuthChallenge, node=node, nonce=challenge.nonce)
    proof = handshake.answered(answer["node"], answer["nonce"], answer["proof"])
    assert peer.call(AuthProve, proof=proof) == {}
    assert peer.server.authenticated
    if hello:
        epoch = net[listener].cluster.holdings.known_epoch(node)
        answer = peer.call(cmd.Hello, version_min=cmd.PROTOCOL_MIN,
                           version_max=cmd.PROTOCOL_MAX, node=node, epoch=epoch,
                           cluster=sorted(net.names))
        assert answer["node"] == listener, answer
    return peer


def refused(result: Any) -> bool:
    """No answer: the call failed because the connection closed."""
    return isinstance(result, Failure) and result.check(ConnectionClosed) is not None


def auth_failed(result: Any) -> bool:
    """An AUTH_FAILED answer, or none: the listener closes at once (over
    iosim the error box written after ``loseConnection`` is dropped; a real
    TCP transport still sends it)."""
    return refused(result) or (isinstance(result, Failure)
                               and result.check(HandshakeFailed) is not None)


def refusals(net: Net, address: str) -> list[str]:
    return [line for line in net.logged(LogLevel.warn)
            if "refused peer connection" in line and address in line]


def refusals_logged_by(net: Net, member: Member) -> list[str]:
    """The refusals logged by ``member``'s own connections."""
    return [formatEvent(event) for event in net.events
            if event.get("log_level") == LogLevel.warn
            and "refused peer connection" in event.get("log_format", "")
            and getattr(event.get("log_source"), "handlers", None) is member.cluster]


# -- the outsider of issue 9 ----------------------------------------------------


def outsider_script(net: Net, victim: str, ids: list[str]) -> list[tuple[str, Any]]:
    """Every step of the issue's outsider, each on a fresh connection to
    ``victim`` (one refusal closes a connection): what each step got."""
    members = sorted(net.names)
    claimed = next(n for n in members if n != victim)
    fake = [Record(format_id(claimed, HUGE_EPOCH, seq), b"forged", None, None, 0)
            for seq in range(1, 4)]
    stones = Tombstones()
    for message_id in ids:
        mid = parse_id(message_id)
        stones.add(mid.node, mid.epoch, mid.seq)
    steps: list[tuple[str, type[amp.Command], dict]] = [
        ("hello", cmd.Hello, dict(version_min=cmd.PROTOCOL_MIN, version_max=cmd.PROTOCOL_MAX,
                                  node=claimed, epoch=HUGE_EPOCH, cluster=members)),
        ("announce", cmd.Announce, dict(node=claimed, epoch=HUGE_EPOCH)),
        ("heartbeat", cmd.Heartbeat, dict(node=claimed, epoch=HUGE_EPOCH, ready=0,
                                          serving=True)),
        ("take", cmd.Take, dict(count=100, visibility=3600.0)),
        ("ack", cmd.Ack, dict(ids=ids)),
        ("lease", cmd.Lease, dict(id=ids[0], action="kick")),
        ("sync start", cmd.SyncStart, {}),
        ("sync page", cmd.SyncPage, dict(token="0" * 32)),
        ("replicate", cmd.Replicate, dict(owner=claimed, epoch=HUGE_EPOCH,
                                          records=encode_records(fake))),
        ("tombstones", cmd.Tombstones, dict(tombstones=encode_tombstones(stones))),
        ("key lookup", cmd.KeyLookup, dict(key="k", digest=b"\0" * 32)),
    ]
    got = []
    for name, command, arguments in steps:
        outsider = bare(net, victim)
        got.append((name, outsider.call(command, **arguments), outsider))
    # And all of them at once, pipelined in one burst before any answer.
    outsider = bare(net, victim)
    burst = [outsider.client.callRemote(command, **arguments)
             for _, command, arguments in steps]
    for name, d in zip([s[0] for s in steps], burst):
        got.append((f"{name} (burst)", outsider.answer(d), outsider))
    return [(name, (result, peer)) for name, result, peer in got]


def test_outsider_without_the_key_is_refused_at_every_step(make):
    net = running(make)
    before = cluster_state(net)
    victim = net["b"]
    own_ids = sorted(victim.node.queue)
    for name, (result, outsider) in outsider_script(net, "b", own_ids):
        assert refused(result), (name, result)
        assert outsider.closed, name
        assert refusals(net, outsider.address), name
    net.settle()
    assert_unharmed(net, before)
    # Nothing the outsider sent reached the cluster: b's messages are all
    # there, unleased; no forged replica; the real members still replicate.
    assert sorted(victim.node.queue) == own_ids
    assert all(m.state == READY for m in victim.node.queue.messages())
    new = pushed(net, net["a"], 1, b"after")
    net.settle()
    assert all(net[n].held("a") == 5 for n in "bc")
    assert new[0] in net["a"].node.queue
    # The refusal is a warning that says what was sent first, not an error.
    line = refusals(net, OUTSIDER_HOST)[0]
    assert "'Hello' before authentication" in line, line


def test_outsider_refusals_change_nothing_across_time(make):
    """After the refusals, heartbeats and anti-entropy run on: nobody is
    fenced later by what an outsider claimed."""
    net = running(make)
    before = cluster_state(net)
    outsider_script(net, "a", sorted(net["a"].node.queue))
    outsider_script(net, "c", sorted(net["c"].node.queue))
    net.advance(DEFAULT_TIMINGS.anti_entropy_interval + 1.0)
    for name in net.names:
        state = node_state(net, name)
        assert state.reason is None and not state.fenced, name
        assert state.known_epochs == before[name].known_epochs, name
        assert state.queue == before[name].queue, name
        assert state.held == before[name].held, name
        assert all(net[name].connected(peer) for peer in net.names if peer != name)


# -- the wrong key, a replay ------------------------------------------------------


def test_client_with_the_wrong_key_is_refused_at_its_proof(make):
    net = running(make)
    before = cluster_state(net)
    peer = bare(net, "b")
    handshake = DiallerHandshake(OTHER_KEY, "a", "b")
    challenge = handshake.challenge()
    answer = peer.call(AuthChallenge, node="a", nonce=challenge.nonce)
    # The listener proves the key first; a dialler with another key sees
    # that the proof is not one its key makes ...
    with pytest.raises(HandshakeFailed):
        handshake.answered(answer["node"], answer["nonce"], answer["proof"])
    # ... and what it proves with its own key is refused, and the link closed.
    proof = make_proof(OTHER_KEY, DIALLER, challenge.nonce, answer["nonce"], "a", "b")
    assert auth_failed(peer.call(AuthProve, proof=proof))
    assert peer.closed
    assert refusals(net, peer.address)
    assert not peer.server.authenticated
    net.settle()
    assert_unharmed(net, before)


@pytest.mark.parametrize("node, why", [
    ("x", "not a member"),  # an id the cluster does not have
    ("b", "own id"),  # the listener's own id
    ("bad id!", "invalid node id"),
])
def test_challenge_from_a_stranger_is_refused_at_once(make, node, why):
    net = running(make)
    before = cluster_state(net)
    peer = bare(net, "b")
    answer = peer.call(AuthChallenge, node=node, nonce=b"\x01" * NONCE_BYTES)
    assert auth_failed(answer), answer
    assert peer.closed
    assert any(why in line for line in refusals(net, peer.address)), net.logged()
    assert_unharmed(net, before)


@pytest.mark.parametrize("proof", [b"", b"\0" * 32, b"x" * 1000])
def test_proof_without_a_challenge_is_refused(make, proof):
    net = running(make)
    before = cluster_state(net)
    peer = bare(net, "b")
    assert auth_failed(peer.call(AuthProve, proof=proof))
    assert peer.closed and refusals(net, peer.address)
    assert_unharmed(net, before)


def test_recorded_handshake_replayed_on_a_new_connection_is_refused(make):
    net = running(make)
    # A member's real handshake, as an eavesdropper records it.
    handshake = DiallerHandshake(net.key, "a", "b")
    challenge = handshake.challenge()
    first = bare(net, "b")
    answer = first.call(AuthChallenge, node="a", nonce=challenge.nonce)
    proof = handshake.answered(answer["node"], answer["nonce"], answer["proof"])
    assert first.call(AuthProve, proof=proof) == {}
    assert first.server.authenticated
    first.close()
    net.settle()
    before = cluster_state(net)
    # Replayed word for word on a new connection: the listener's nonce is
    # fresh, so the recorded proof does not prove it.
    replay = bare(net, "b")
    replayed = replay.call(AuthChallenge, node="a", nonce=challenge.nonce)
    assert replayed["nonce"] != answer["nonce"]
    assert auth_failed(replay.call(AuthProve, proof=proof))
    assert replay.closed and not replay.server.authenticated
    assert refusals(net, replay.address)
    # Replaying to another member fails too.
    other = bare(net, "c")
    other.call(AuthChallenge, node="a", nonce=challenge.nonce)
    assert auth_failed(other.call(AuthProve, proof=proof))
    assert other.closed
    assert_unharmed(net, before)


def test_second_challenge_on_an_authenticated_connection_is_refused(make):
    """A proven connection cannot be re-keyed into another peer's name."""
    net = running(make)
    peer = authenticated(net, "b", "a", hello=False)
    handshake = DiallerHandshake(net.key, "c", "b")
    again = peer.call(AuthChallenge, node="c", nonce=handshake.challenge().nonce)
    assert auth_failed(again)
    assert peer.closed
    net.settle()
    assert all(node_state(net, n).reason is None for n in net.names)


# -- a whole node with the wrong key ----------------------------------------------


def impostor(net: Net, name: str, key: bytes) -> tuple[Member, PeerAuth]:
    """A second node with ``name``'s id but ``key``, beside the real one
    (which keeps its place in ``net``); stopped when the net closes."""
    peers = [PeerAddress(p, "127.0.0.1", 9000 + i)
             for i, p in enumerate(net.names) if p != name]
    node = QueueNode(name, net.size, net.clock, epoch=0)
    timings = replace(DEFAULT_TIMINGS, replication_timeout=net.replication_timeout)
    cluster = Cluster(node, peers, net.clock, net.min_copies, timings)
    cluster.start()
    member = Member(name, node, cluster)
    net.retired.append(member)
    return member, net.auth(name, key)


def link(net: Net, dialler: tuple[Member, PeerAuth], listener: tuple[Member, PeerAuth]) -> Link:
    """Like Net.connect, with each side's own PeerAuth."""
    (a, a_auth), (b, b_auth) = dialler, listener
    client = PeerProtocol(a.cluster, a_auth, dialled=b.name)
    server = PeerProtocol(b.cluster, b_auth)
    dialler_address = IPv4Address("TCP", "127.0.0.2", next(_ports))
    listener_address = IPv4Address("TCP", "127.0.0.3", 9000)
    pump = iosim.connect(
        server, iosim.FakeTransport(server, True, listener_address, dialler_address),
        client, iosim.FakeTransport(client, False, dialler_address, listener_address),
        greet=False, clock=net.clock)
    made = Link(a.name, b.name, client, server, pump)
    net.links.append(made)
    return made


def test_node_with_the_wrong_key_never_joins_nor_disturbs_the_member(make):
    net = running(make)
    fake = impostor(net, "c", OTHER_KEY)
    fake_node = fake[0]
    before = cluster_state(net)
    # It dials a and b and they dial it (as reconnecting clients would),
    # again and again while the cluster works.
    for round in range(3):
        for name in "ab":
            real = (net[name], net.auth(name))
            link(net, fake, real)
            link(net, real, fake)
        net.settle()
        ids = pushed(net, net["a"], 2, b"round %d" % round)
        net.advance(1.0)
        assert all(i in net["a"].node.queue for i in ids)
    for made in net.links:
        if fake_node.cluster in (made.client.handlers, made.server.handlers):
            assert made.closed
            assert not (made.client.authenticated or made.server.authenticated)
    # Never a member: no link, no sync, never serving.
    assert all(not peer.links for peer in fake_node.cluster.peers.values())
    assert fake_node.node.readiness.reason() is not None
    assert fake_node.node.epoch == 0
    # The real members linked, serving, replicating: a's 6 new messages
    # are held by b and by the real c.
    after = cluster_state(net)
    for name in net.names:
        assert after[name].reason is None and not after[name].fenced
        assert after[name].known_epochs == before[name].known_epochs
        assert after[name].epoch == before[name].epoch
        assert all(net[name].connected(p) for p in net.names if p != name)
    assert net["b"].held("a") == net["c"].held("a") == 4 + 6
    # Each side that dialled the other found out and says so.
    for member in (net["a"], net["b"], fake_node):
        logged = refusals_logged_by(net, member)
        assert len(logged) >= 3, (member.name, logged)
        assert all("did not prove the cluster key" in line for line in logged), logged


def test_listener_logs_a_dialler_with_the_wrong_key(make):
    """The dialler checks the listener's proof first, so a dialler with the
    wrong key gives up before it sends a proof: the listener must still log
    the failed handshake with the remote address (DESIGN.md: "a failure
    closes the connection, is logged with the remote address")."""
    net = running(make)
    fake = impostor(net, "c", OTHER_KEY)
    made = link(net, fake, (net["a"], net.auth("a")))
    net.settle()
    assert made.closed
    assert refusals_logged_by(net, fake[0])  # the impostor knows
    dialler = made.pump.serverIO.getPeer()
    address = f"{dialler.host}:{dialler.port}"
    assert [line for line in refusals_logged_by(net, net["a"]) if address in line], \
        "the member a says nothing about a wrong-key dialler"


def test_cluster_keeps_replicating_when_a_member_comes_back_with_another_key(make):
    """c is replaced by a process with the wrong key: a and b (min copies
    2) go on without it, and it never recovers from them."""
    net = running(make, min_copies=2)
    net.cut("c")
    net["c"].cluster.stop()
    net.advance(DEFAULT_TIMINGS.dead_after + 0.5)
    net.keys["c"] = OTHER_KEY
    c = net.build("c")
    net.connect("a", "c")
    net.connect("b", "c")
    net.connect("c", "a")
    net.connect("c", "b")
    net.advance(DEFAULT_TIMINGS.recovery_grace + 1.0)
    assert c.node.readiness.reason() is not None and c.node.epoch == 0
    assert not any(peer.links for peer in c.cluster.peers.values())
    assert c.cluster.store.held("a") == c.cluster.store.held("b") == 0
    for name in "ab":
        assert net[name].node.readiness.reason() is None
        assert not net[name].cluster.peers["c"].links
    ids = pushed(net, net["a"], 3, b"without c")
    assert net["b"].held("a") == 4 + 3
    assert all(i in net["a"].node.queue for i in ids)


# -- silence ------------------------------------------------------------------------


def test_connection_that_proves_nothing_is_closed_after_the_auth_timeout(make):
    net = running(make)
    before = cluster_state(net)
    silent = bare(net, "b")
    half = bare(net, "b")  # challenges, then never proves
    half.call(AuthChallenge, node="a", nonce=DiallerHandshake(net.key, "a").challenge().nonce)
    net.advance(DEFAULT_TIMINGS.call_timeout - 0.1)
    assert not silent.closed and not half.closed
    net.advance(0.2)
    silent.pump.flush()
    half.pump.flush()
    assert silent.closed and half.closed
    for peer in (silent, half):
        assert any("no authentication in time" in line
                   for line in refusals(net, peer.address)), net.logged()
    assert_unharmed(net, before)


# -- hardened decoding through an authenticated connection -------------------------
#
# Each example builds a fresh running cluster (a few ms) and a bare client
# that proved the key as "a" and said Hello to b, sends one command with
# drawn values, and checks the answer against what the values deserve: a
# normal answer or an error answer (a BAD_INPUT with its log line), the
# connection still open, nothing unhandled logged, and b's own queue
# changed by exactly the legitimate effect (a valid take, ack, nack,
# tombstone), if any.

FUZZ = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


@contextmanager
def fuzzed_world(still_serving: bool = True) -> Iterator[tuple[KeyedNet, Bare]]:
    """A fresh running cluster (b owns 4 ready messages) and a client
    authenticated to b as a.  At the end the connection must still be
    open, and, if ``still_serving``, b still serving once it closed."""
    net = start_running(keyed_net(), owners="b")
    try:
        peer = authenticated(net, "b", "a")
        yield net, peer
        assert not peer.closed, "the authenticated connection was closed"
        assert net.failures() == []
        peer.close()
        net.settle()
        assert not net["b"].node.readiness.fenced
        if still_serving:
            assert net["b"].node.readiness.reason() is None
    finally:
        closed_cleanly(net)


def own_queue(member: Member) -> dict[str, int]:
    """b's own queue: each message's id and state."""
    return {m.id: m.state for m in member.node.queue.messages()}


def bad_input(net: Net, result: Any, command: str, warnings_before: int) -> bool:
    """A BAD_INPUT answer, with a warning logged for it."""
    if not isinstance(result, Failure):
        return False
    raw_bad_input = (result.check(amp.RemoteAmpError)
                     and result.value.errorCode == b"BAD_INPUT")
    if not (result.check(WireError) or raw_bad_input):
        return False
    logged = net.logged(LogLevel.warn)[warnings_before:]
    assert any(f"bad {command} from peer a" in line for line in logged), logged
    return True


def warnings(net: Net) -> int:
    return len(net.logged(LogLevel.warn))


def error_type(result: Any) -> type | None:
    return result.type if isinstance(result, Failure) else None


def mutated_bytes(draw: Any, valid: bytes) -> bytes:
    """``valid`` with 1-4 edits (tests/mutations.py)."""
    return draw(mutated(valid))


def mutated_text(draw: Any, valid: str) -> str:
    """``valid`` with 1-3 edits of characters."""
    text = list(valid)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["set", "insert", "delete", "truncate", "upper"]))
        at = draw(st.integers(0, len(text)))
        if kind == "set" and text:
            text[at % len(text)] = draw(st.characters())
        elif kind == "insert":
            text[at:at] = list(draw(st.sampled_from([".", "0", "-", "z", " ", "\x00", "é"])))
        elif kind == "delete":
            del text[at:at + draw(st.integers(1, 4))]
        elif kind == "truncate":
            del text[at:]
        elif kind == "upper":
            text = list("".join(text).upper())
    return "".join(text)


def message_id_of(draw: Any, real: list[str]) -> str:
    """A real id, a mutation of one, an id of another node, or any text."""
    return draw(st.one_of(
        st.sampled_from(real),
        st.sampled_from(real).map(lambda valid: mutated_text(draw, valid)),
        st.builds(format_id, st.sampled_from(["a", "c", "x"]), st.integers(0, MAX_EPOCH),
                  st.integers(0, 99)),
        st.text(max_size=80),
    ))


epochs = st.one_of(st.integers(-3, 5), st.sampled_from([MAX_EPOCH, MAX_EPOCH + 1, -MAX_EPOCH]),
                   st.integers(-2**80, 2**80), st.integers(0, MAX_EPOCH))
seconds = st.one_of(
    st.sampled_from([0.0, -0.0, 0.001, 0.0009, 1.0, 43200.0, 43200.001, -1.0, 1e308,
                     math.nan, math.inf, -math.inf]),
    st.floats(), st.floats(-10, 50000))
counts = st.one_of(st.integers(-2, 5), st.sampled_from([1000, 1001, 2**31, 2**63]),
                   st.integers(-2**70, 2**70))
node_names = st.one_of(st.sampled_from(["a", "b", "c", "x", "", "A"]), st.text(max_size=70))


def in_range(value: float, low: float, high: float) -> bool:
    return low <= value <= high  # False for NaN


@FUZZ
@given(st.data())
def test_fuzzed_replicate_answers_and_never_touches_the_owners_queue(data):
    draw = data.draw
    with fuzzed_world() as (net, peer):
        b = net["b"]
        known = b.cluster.holdings.known_epoch("a")
        owner = draw(st.one_of(st.just("a"), node_names), label="owner")
        epoch = draw(st.one_of(st.just(known), epochs), label="epoch")
        valid = encode_records([
            Record(format_id(draw(st.sampled_from(["a", "a", "b", "x"])), known,
                             draw(st.integers(1, 50))),
                   draw(st.binary(max_size=20)), draw(st.sampled_from([None, "text/plain"])),
                   draw(st.sampled_from([None, "", "key"])), draw(st.integers(0, 3)))
            for _ in range(draw(st.integers(0, 3)))])
        records = draw(st.one_of(st.just(valid), st.binary(max_size=200),
                                 st.just(valid).map(lambda v: mutated_bytes(draw, v))),
                       label="records")
        try:
            decoded: list[Record] | None = decode_records(records)
        except WireError:
            decoded = None
        queue, held, logged = own_queue(b), b.held("a"), warnings(net)
        result = peer.call(cmd.Replicate, owner=owner, epoch=epoch, records=records)
        if not 0 <= epoch <= MAX_EPOCH:
            assert bad_input(net, result, "Replicate", logged), result
        elif owner != "a":
            assert error_type(result) is cmd.NotHolder, result
        elif 0 < epoch < known:
            assert error_type(result) is cmd.StaleEpoch, result
        elif decoded is None:
            assert bad_input(net, result, "Replicate", logged), result
        elif any(record.mid.node != "a" for record in decoded):
            assert error_type(result) is cmd.NotHolder, result
        else:
            assert result == {"held": True}
            assert b.held("a") == held + len({record.id for record in decoded})
        if not isinstance(result, dict):
            assert b.held("a") == held
        assert own_queue(b) == queue


@FUZZ
@given(st.data())
def test_fuzzed_tombstones_remove_exactly_what_they_name(data):
    draw = data.draw
    with fuzzed_world() as (net, peer):
        b = net["b"]
        real = sorted(b.node.queue)
        stones = Tombstones()
        for message_id in draw(st.lists(st.sampled_from(real), max_size=2)):
            mid = parse_id(message_id)
            stones.add(mid.node, mid.epoch, mid.seq)
        for _ in range(draw(st.integers(0, 2))):
            stones.add_range(draw(st.sampled_from(["a", "c", "x"])), draw(st.integers(0, 3)),
                             draw(st.integers(0, 9)), draw(st.integers(10, 20)))
        valid = encode_tombstones(stones)
        payload = draw(st.one_of(st.just(valid), st.binary(max_size=200),
                                 st.just(valid).map(lambda v: mutated_bytes(draw, v))),
                       label="tombstones")
        try:
            named = decode_tombstones(payload)
        except WireError:
            named = None
        queue, logged = own_queue(b), warnings(net)
        result = peer.call(cmd.Tombstones, tombstones=payload)
        if named is None:
            assert bad_input(net, result, "Tombstones", logged), result
            assert own_queue(b) == queue
        else:
            assert result == {}
            gone = {i for i in queue
                    if (parse_id(i).node, parse_id(i).epoch, parse_id(i).seq) in named}
            assert own_queue(b) == {i: s for i, s in queue.items() if i not in gone}


@FUZZ
@given(st.data())
def test_fuzzed_sync_page_tokens_page_or_are_unknown(data):
    draw = data.draw
    with fuzzed_world() as (net, peer):
        b = net["b"]
        token = peer.call(cmd.SyncStart)["token"]
        asked = draw(st.one_of(st.just(token), st.text(max_size=80),
                               st.just(token).map(lambda t: mutated_text(draw, t))),
                     label="token")
        queue = own_queue(b)
        result = peer.call(cmd.SyncPage, token=asked)
        if asked == token:
            assert set(result) == {"records", "more"}
        else:
            assert error_type(result) is cmd.UnknownSync, result
        assert own_queue(b) == queue


@FUZZ
@given(st.data())
def test_fuzzed_lease_changes_only_the_leased_message(data):
    draw = data.draw
    with fuzzed_world() as (net, peer):
        b = net["b"]
        taken = b.node.take_own(1, 30.0)[0]
        leased, current = taken.id, taken.receipt
        real = sorted(b.node.queue)
        message_id = message_id_of(draw, real)
        action = draw(st.sampled_from(["nack", "touch", "kick"]) | st.text(max_size=8),
                      label="action")
        receipt = draw(st.none() | st.just(current) | st.text(max_size=12), label="receipt")
        visibility = draw(seconds, label="visibility")
        arguments = {"id": message_id, "action": action}
        if receipt is not None:
            arguments["receipt"] = receipt
        if action == "touch":
            arguments["visibility"] = visibility
        queue, logged = own_queue(b), warnings(net)
        result = peer.call(cmd.Lease, **arguments)
        try:
            parse_id(message_id)
            valid = (action in ("nack", "touch", "kick")
                     and (action == "kick") == (receipt is None)
                     and (action != "touch" or in_range(visibility, 0.001, 43200.0)))
        except ValueError:
            valid = False
        if not valid:
            assert bad_input(net, result, "Lease", logged), result
            assert own_queue(b) == queue
        elif message_id not in queue:
            assert result == {"outcome": "unknown"}
            assert own_queue(b) == queue
        elif action == "kick":  # nothing is held here
            assert result == {"outcome": "not_held"}
            assert own_queue(b) == queue
        elif message_id != leased or receipt != current:  # not this lease
            assert result == {"outcome": "lease_lost"}
            assert own_queue(b) == queue
        elif action == "nack":
            assert result == {"outcome": "ok"}
            assert own_queue(b) == {**queue, message_id: READY}
        else:  # the touch of the current lease
            assert result == {"outcome": "ok"}
            assert own_queue(b) == queue


@FUZZ
@given(count=counts, visibility=seconds)
def test_fuzzed_take_leases_exactly_what_it_answers(count, visibility):
    with fuzzed_world() as (net, peer):
        b = net["b"]
        queue, logged = own_queue(b), warnings(net)
        result = peer.call(cmd.Take, count=count, visibility=visibility)
        if not (0 <= count <= 1000 and in_range(visibility, 0.001, 43200.0)):
            assert bad_input(net, result, "Take", logged), result
            assert own_queue(b) == queue
            return
        taken = [record.id for record in decode_records(result["records"])]
        ready = [i for i, state in queue.items() if state == READY]
        assert taken == ready[:count]
        assert own_queue(b) == {**queue, **{i: LEASED for i in taken}}


@FUZZ
@given(st.data())
def test_fuzzed_acks_remove_only_real_messages(data):
    draw = data.draw
    with fuzzed_world() as (net, peer):
        b = net["b"]
        real = sorted(b.node.queue)
        ids = draw(st.lists(st.just(None).map(lambda _: message_id_of(draw, real)),
                            max_size=5), label="ids")
        queue = own_queue(b)
        result = peer.call(cmd.Ack, ids=ids)
        expected = list(dict.fromkeys(i for i in ids if i in queue))
        assert result["acked"] == expected
        assert sorted(result["unknown"]) == sorted(
            [i for i in ids if i not in queue] + duplicates(ids, queue))
        assert own_queue(b) == {i: s for i, s in queue.items() if i not in expected}


def duplicates(ids: list[str], queue: dict[str, int]) -> list[str]:
    """Second and later acks of one queued id in a list: unknown by then."""
    seen: set[str] = set()
    again = []
    for message_id in ids:
        if message_id in queue:
            if message_id in seen:
                again.append(message_id)
            seen.add(message_id)
    return again


@FUZZ
@given(node=node_names, epoch=st.one_of(st.none(), epochs))
def test_fuzzed_announce_is_refused_or_noted_never_fences_the_callee(node, epoch):
    # A newer epoch that "a" proved and announced fences the older a's
    # links (as for a replacement), so b may lack copies afterwards.
    with fuzzed_world(still_serving=False) as (net, peer):
        b = net["b"]
        known = b.cluster.holdings.known_epoch("a")
        epoch = known + 1 if epoch is None else epoch
        queue, logged = own_queue(b), warnings(net)
        result = peer.call(cmd.Announce, node=node, epoch=epoch)
        if not 0 <= epoch <= MAX_EPOCH:
            assert bad_input(net, result, "Announce", logged), result
        elif node != "a":
            assert error_type(result) is cmd.NotHolder, result
        elif 0 < epoch < known:  # (0: "no epoch yet")
            assert error_type(result) is cmd.StaleEpoch, result
        else:
            assert result == {}
            assert b.cluster.holdings.known_epoch("a") == max(epoch, known)
        if not result == {}:
            assert b.cluster.holdings.known_epoch("a") == known
        assert own_queue(b) == queue
        assert not b.node.readiness.fenced


@FUZZ
@given(node=node_names, epoch=st.one_of(st.none(), epochs), ready=counts,
       serving=st.booleans())
def test_fuzzed_heartbeat_is_answered_or_refused(node, epoch, ready, serving):
    # "a" saying it does not serve (or has no epoch) leaves b short of
    # copies until the real a's next heartbeat.
    with fuzzed_world(still_serving=False) as (net, peer):
        b = net["b"]
        known = b.cluster.holdings.known_epoch("a")
        epoch = known if epoch is None else epoch
        queue, logged = own_queue(b), warnings(net)
        result = peer.call(cmd.Heartbeat, node=node, epoch=epoch, ready=ready, serving=serving)
        if not (0 <= epoch <= MAX_EPOCH and 0 <= ready <= MAX_EPOCH):
            assert bad_input(net, result, "Heartbeat", logged), result
        elif 0 < epoch < known:  # (0: "no epoch yet")
            assert error_type(result) is cmd.StaleEpoch, result
        else:
            assert result == {"epoch": b.node.epoch, "ready": b.node.queue.ready,
                              "serving": True}
        assert b.cluster.holdings.known_epoch("a") == known
        assert own_queue(b) == queue
        assert not b.node.readiness.fenced


# -- boxes no typed callRemote would send ------------------------------------------


def replicate_box(net: Net, **strings: bytes) -> dict[str, bytes]:
    known = net["b"].cluster.holdings.known_epoch("a")
    return {"owner": b"a", "epoch": b"%d" % known, **strings}


VALID_RECORDS = encode_records([Record(format_id("a", 1, 99), b"body")])


@pytest.mark.parametrize("name, strings", [
    ("Replicate", {"records": b"2", "records.1": VALID_RECORDS}),  # a chunk missing
    ("Replicate", {"records": b"0"}),  # not a count
    ("Replicate", {"records": b"one", "records.1": VALID_RECORDS}),
    ("Replicate", {"records": b"99999999999"}),  # forged, huge
    ("Replicate", {}),  # no count at all
    ("Tombstones", {"tombstones": b"3", "tombstones.1": b"{}"}),
])
def test_forged_chunk_counts_are_bad_input(make, name, strings):
    """Chunked is dqid's own AMP argument: a forged count is found while AMP
    parses the box, before any responder runs, and is still BAD_INPUT with
    its log line, on a link that stays open (no traceback: see ``nets``)."""
    net = start_running(make(), owners="b")
    peer = authenticated(net, "b", "a")
    queue, held, logged = own_queue(net["b"]), net["b"].held("a"), warnings(net)
    if name == "Replicate":
        strings = replicate_box(net, **strings)
    result = peer.call_raw(name.encode(), **strings)
    assert own_queue(net["b"]) == queue and net["b"].held("a") == held
    assert isinstance(result, Failure) and result.check(amp.RemoteAmpError) \
        and result.value.errorCode == b"BAD_INPUT", result
    assert any(f"bad {name} from peer a" in line
               for line in net.logged(LogLevel.warn)[logged:])
    assert not peer.closed
    peer.close()


@pytest.mark.parametrize("name, strings", [
    (b"Take", {"count": b"many", "visibility": b"30"}),
    (b"Take", {"count": b"1", "visibility": b"fast"}),
    (b"Lease", {"id": b"b.1.1", "visibility": b"0x10"}),
    (b"Heartbeat", {"node": b"a", "epoch": b"1", "ready": b"0", "serving": b"maybe"}),
    (b"Ack", {"ids": b"\x00\x02\xff\xfe"}),  # a list of one item, not UTF-8
    (b"Announce", {"node": b"\xff\xfe", "epoch": b"1"}),  # not UTF-8
    (b"Take", {}),  # arguments missing
])
def test_values_amp_cannot_parse_close_the_link_and_change_nothing(make, name, strings):
    """AMP itself cannot parse these (its Integer, Float, Boolean, ListOf,
    Unicode): dqid answers BAD_INPUT with a log line and keeps the link.
    Either way b's queue is as it was and every node serves on."""
    net = start_running(make(), owners="b")
    peer = authenticated(net, "b", "a")
    queue, logged = own_queue(net["b"]), warnings(net)
    result = peer.call_raw(name, **strings)
    assert isinstance(result, Failure), result
    assert bad_input(net, result, name.decode(), logged), result
    assert not peer.closed
    assert own_queue(net["b"]) == queue
    assert not net.failures()  # no traceback: a log line, an answer
    peer.close()
    net.advance(DEFAULT_TIMINGS.heartbeat_interval * 2)
    for member in net.members.values():
        assert member.node.readiness.reason() is None
        assert all(member.connected(p) for p in net.names if p != member.name)

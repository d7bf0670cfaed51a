"""Peers prove the cluster key; nothing else gets in (DESIGN.md, "Security").

The attacks of issue 9, replayed against in-memory clusters (see
:mod:`tests.amp_harness`: one Clock, real PeerProtocols over iosim):

* an outsider that speaks AMP and knows the commands but not the key
  (``Hello`` as a member with a huge epoch, ``Take``, ``Ack``,
  ``SyncStart``, ``Stream`` of records, states and tombstones, ``Copied``)
  is answered nothing: the connection closes, a warning names its address,
  and no state changes;
* a client or a whole node with the wrong key, and a recorded handshake
  replayed, are refused the same way, and the cluster keeps replicating;
* a connection that proves nothing is closed after the auth timeout;
* through an *authenticated* connection, arbitrary and mutated values for
  every command are a normal or an error answer, never an unhandled
  failure, a hang or a changed queue (hypothesis).  ``Stream`` and
  ``Copied`` are not answered: bad values in them are a log line, change
  nothing and keep the link, and records refused (bad input, a stale epoch,
  a foreign owner) are acknowledged with a ``Copied`` that says so; forged
  chunk counts are the same, and values AMP itself cannot parse cost only
  the box (answered commands: a BAD_INPUT answer).
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
    MAX_EPOCH, WireError, decode_records, decode_states, decode_tombstones, encode_records,
    encode_run, encode_states, encode_tombstones,
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
    replicas: frozenset[tuple[str, bytes, int, bool, float | None]]  # peers' copies
    tombstones: dict  # Tombstones.as_dict()


def replicas(member: Member) -> frozenset[tuple[str, bytes, int, bool, float | None]]:
    """The copies ``member`` holds of its peers' messages and their states."""
    return frozenset((r.id, r.body, r.deliveries, r.held, r.due)
                     for r in member.cluster.store.records())


def tombstones_of(member: Member) -> dict:
    return member.cluster.store.tombstones.as_dict()


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
        replicas=replicas(member),
        tombstones=tombstones_of(member),
    )


def cluster_state(net: Net) -> dict[str, NodeState]:
    return {name: node_state(net, name) for name in net.names}


def assert_unharmed(net: Net, before: dict[str, NodeState]) -> None:
    after = cluster_state(net)
    for name in net.names:
        assert after[name] == before[name], name
        assert after[name].reason is None and not after[name].fenced, name


# -- bare AMP clients ----------------------------------------------------------


class BareAmp(amp.AMP):
    """A plain AMP client that keeps every box it receives and takes what a
    node sends a linked peer unasked: ``Stream`` and ``Copied`` (protocol 3
    answers neither).  ``copied`` is what the node acknowledged of the
    records this client streamed to it."""

    def __init__(self) -> None:
        super().__init__()
        self.boxes: list[amp.AmpBox] = []
        self.streams: list[dict[str, Any]] = []
        self.copied: list[dict[str, Any]] = []

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        self.boxes.append(box)
        super().ampBoxReceived(box)

    @cmd.Stream.responder
    def stream(self, epoch: int, seq: int | None = None, records: bytes | None = None,
               run: bytes | None = None, states: bytes | None = None,
               tombstones: bytes | None = None) -> dict:
        self.streams.append(dict(epoch=epoch, seq=seq, records=records, run=run,
                                 states=states, tombstones=tombstones))
        return {}

    @cmd.Copied.responder
    def copied_received(self, upto: int, holder: bool, refused: str | None = None) -> dict:
        self.copied.append(dict(upto=upto, holder=holder, refused=refused))
        return {}


@dataclass
class Bare:
    """A :class:`BareAmp` client connected to one node's PeerProtocol."""

    client: BareAmp
    server: PeerProtocol
    pump: iosim.IOPump
    address: str  # the client's address as the node sees it
    net: Net

    def call(self, command: type[amp.Command], **arguments: Any) -> Any:
        """Send ``command``, move the bytes; what it fired with (a dict or
        a Failure).  Fails the test if it is still unanswered (a hang)."""
        return self.answer(self.client.callRemote(command, **arguments))

    def call_raw(self, name: bytes, **strings: bytes) -> Any:
        """Send a box of raw strings (values AMP's own types could not make)."""
        return self.answer(self.client.callRemoteString(name, **strings))

    def send(self, command: type[amp.Command], **arguments: Any) -> None:
        """Send an unanswered command (Stream, Copied) and let the node's
        turn end: whatever it says back (a Copied) has arrived."""
        assert not command.requiresAnswer
        assert self.client.callRemote(command, **arguments) is None
        self.settle()

    def send_raw(self, name: bytes, **strings: bytes) -> None:
        """An unanswered box of raw strings, then :meth:`settle`."""
        assert self.client.callRemoteString(name, requiresAnswer=False, **strings) is None
        self.settle()

    def settle(self) -> None:
        """Move bytes both ways and run what is due until all is quiet."""
        for _ in range(1000):
            self.net.settle()
            if not self.pump.flush():
                return
        raise AssertionError("never quiet")

    def answer(self, d: Any) -> Any:
        box: list = []
        d.addBoth(box.append)
        self.pump.flush()
        assert box, "no answer and the connection is still open"
        return box[0]

    @property
    def copied(self) -> list[dict[str, Any]]:
        return self.client.copied

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
    client = BareAmp()
    port = next(_ports)
    server_io = iosim.FakeTransport(
        server, isServer=True, hostAddress=IPv4Address("TCP", "127.0.0.1", 9000),
        peerAddress=IPv4Address("TCP", OUTSIDER_HOST, port))
    client_io = iosim.FakeTransport(
        client, isServer=False, hostAddress=IPv4Address("TCP", OUTSIDER_HOST, port),
        peerAddress=IPv4Address("TCP", "127.0.0.1", 9000))
    pump = iosim.connect(server, server_io, client, client_io, greet=False, clock=net.clock)
    return Bare(client, server, pump, f"{OUTSIDER_HOST}:{port}", net)


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


# What an unanswered command (Stream, Copied) "got": no answer can come.
SENT = "sent, never answered"


def outsider_script(net: Net, victim: str, ids: list[str]) -> list[tuple[str, Any]]:
    """Every step of the issue's outsider, each on a fresh connection to
    ``victim`` (one refusal closes a connection): what each step got (for
    Stream and Copied, which are never answered: ``SENT``)."""
    members = sorted(net.names)
    claimed = next(n for n in members if n != victim)
    fake = [Record(format_id(claimed, HUGE_EPOCH, seq), b"forged", None, None, 0)
            for seq in range(1, 4)]
    # The claimed member's messages the victim holds, set aside as if
    # delivered too often, and their withdrawal with the victim's own.
    copies = sorted(record.id for record in net[victim].cluster.store.records(claimed))
    set_aside = [Record(message_id, b"", deliveries=99, held=True, due=2e9)
                 for message_id in copies]
    stones = Tombstones()
    for message_id in [*ids, *copies]:
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
        ("stream records", cmd.Stream, dict(epoch=HUGE_EPOCH, seq=1,
                                            records=encode_records(fake))),
        ("stream states", cmd.Stream, dict(epoch=HUGE_EPOCH,
                                           states=encode_states(set_aside))),
        ("stream tombstones", cmd.Stream, dict(epoch=1,
                                               tombstones=encode_tombstones(stones))),
        ("stream of all", cmd.Stream, dict(epoch=HUGE_EPOCH, seq=1,
                                           records=encode_records(fake),
                                           states=encode_states(set_aside),
                                           tombstones=encode_tombstones(stones))),
        ("copied", cmd.Copied, dict(upto=1, holder=True)),
        ("key lookup", cmd.KeyLookup, dict(key="k", digest=b"\0" * 32)),
    ]
    got = []
    for name, command, arguments in steps:
        outsider = bare(net, victim)
        if command.requiresAnswer:
            got.append((name, outsider.call(command, **arguments), outsider))
        else:
            outsider.send(command, **arguments)
            got.append((name, SENT, outsider))
    # And all of them at once, pipelined in one burst before any answer.
    outsider = bare(net, victim)
    burst = [outsider.client.callRemote(command, **arguments)
             for _, command, arguments in steps]
    for name, d in zip([s[0] for s in steps], burst):
        got.append((f"{name} (burst)", SENT if d is None else outsider.answer(d), outsider))
    outsider.settle()
    return [(name, (result, peer)) for name, result, peer in got]


def test_outsider_without_the_key_is_refused_at_every_step(make):
    net = running(make)
    before = cluster_state(net)
    victim = net["b"]
    own_ids = sorted(victim.node.queue)
    for name, (result, outsider) in outsider_script(net, "b", own_ids):
        if result is not SENT:
            assert refused(result), (name, result)
        assert outsider.closed, name
        assert outsider.client.boxes == [], name  # not a word back, not even a Copied
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


@pytest.mark.parametrize("first", [b"", b"challenge"])
def test_outsider_box_longer_than_a_handshake_is_refused_before_it_is_read(make, first):
    """Before the key is proven a box may take 4 KiB: an outsider that
    announces a longer one, at once or after a challenge, is refused (a
    log line, the connection closed) before the node reads the rest, and
    nothing changes."""
    net = running(make)
    before = cluster_state(net)
    outsider = bare(net, "b")
    if first:
        handshake = DiallerHandshake(net.key, "a", "b")
        answer = outsider.call(AuthChallenge, node="a", nonce=handshake.challenge().nonce)
        assert isinstance(answer, dict), answer
    huge = amp.AmpBox(_command=b"Stream", epoch=b"1", seq=b"1", records=b"1",
                      **{"records.1": b"x" * 60_000}).serialize()
    outsider.client.transport.write(huge[:5000])  # the rest never needs to come
    outsider.pump.flush()
    assert outsider.closed
    assert outsider.server._reader.feed(huge[5000:]) == []  # the reading stopped
    assert any("over 4096 bytes before authentication" in line
               for line in refusals(net, outsider.address))
    net.settle()
    assert_unharmed(net, before)


def test_outsider_boxes_behind_the_refused_one_are_not_read(make):
    """Many boxes in one read: the first refused is the last read, so
    one write makes one log line, not one per box."""
    net = running(make)
    before = cluster_state(net)
    outsider = bare(net, "b")
    box = amp.AmpBox(_command=b"Peek", _ask=b"1", id=b"b.1.1").serialize()
    outsider.client.transport.write(box * 200)
    outsider.pump.flush()
    assert outsider.closed
    assert len(refusals(net, outsider.address)) == 1
    net.settle()
    assert_unharmed(net, before)


def test_a_long_box_right_behind_the_proof_is_read_as_a_peers(make):
    """The proof, Hello and a long Stream box arrive in one read: once the
    proof is checked, the next box is a peer's and may be any length."""
    net = start_running(make(), owners="b")
    b = net["b"]
    peer = bare(net, "b")
    handshake = DiallerHandshake(net.key, "a", "b")
    answer = peer.call(AuthChallenge, node="a", nonce=handshake.challenge().nonce)
    proof = handshake.answered(answer["node"], answer["nonce"], answer["proof"])
    proved = peer.client.callRemote(AuthProve, proof=proof)
    hello = peer.client.callRemote(
        cmd.Hello, version_min=cmd.PROTOCOL_MIN, version_max=cmd.PROTOCOL_MAX, node="a",
        epoch=b.cluster.holdings.known_epoch("a"), cluster=sorted(net.names))
    long_body = encode_records([Record(format_id("a", 1, 99), b"x" * 60_000)])
    assert peer.client.callRemote(cmd.Stream, epoch=b.cluster.holdings.known_epoch("a"),
                                  seq=1, records=long_body) is None
    peer.settle()
    assert peer.answer(proved) == {} and peer.answer(hello)["node"] == "b"
    assert peer.copied == [copied(1)] and b.held("a") == 1
    link_kept(net, peer)


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
# tombstone), if any.  Stream and Copied get no answer: what they deserve
# is checked in b's state, its log and the Copied it sends back.

FUZZ = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


@contextmanager
def fuzzed_world(still_serving: bool = True,
                 owners: str = "b") -> Iterator[tuple[KeyedNet, Bare]]:
    """A fresh running cluster (b owns 4 ready messages; each other node
    of ``owners`` too, held by b) and a client authenticated to b as a.
    At the end the connection must still be open, and, if
    ``still_serving``, b still serving once it closed."""
    net = start_running(keyed_net(), owners=owners)
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


def logged_bad(net: Net, command: str, warnings_before: int, why: str = "") -> bool:
    """A warning about bad input in ``command`` from peer a (saying ``why``)
    logged since ``warnings_before``: how an unanswered box is refused."""
    return any(f"bad {command} from peer a" in line and why in line
               for line in net.logged(LogLevel.warn)[warnings_before:])


@dataclass(frozen=True)
class Held:
    """What b keeps that a Stream or a Copied could change."""

    queue: dict[str, int]  # b's own messages and their states
    replicas: frozenset[tuple[str, bytes, int, bool, float | None]]
    tombstones: dict
    epochs: dict[str, int]


def held_by(member: Member) -> Held:
    return Held(own_queue(member), replicas(member), tombstones_of(member),
                dict(member.cluster.store.epochs))


def copied(upto: int, holder: bool = True, refused: str | None = None) -> dict[str, Any]:
    """A Copied as the bare client records it."""
    return dict(upto=upto, holder=holder, refused=refused)


def link_kept(net: Net, peer: Bare, listener: str = "b") -> None:
    """``peer``'s connection is open, still a link of ``listener``'s to a,
    and still answered."""
    assert not peer.closed, "the authenticated connection was closed"
    assert peer.server in net[listener].cluster.peers["a"].links
    answer = peer.call(cmd.Peek, id=format_id(listener, 1, 10**6))
    assert isinstance(answer, dict), answer


def newer_epoch_of_a(net: Net, peer: Bare) -> int:
    """a announces an epoch 2 above the one b knows (over ``peer``), so an
    older epoch of a is stale at b; the epoch b knows now."""
    known = net["b"].cluster.holdings.known_epoch("a") + 2
    assert peer.call(cmd.Announce, node="a", epoch=known) == {}
    assert net["b"].cluster.holdings.known_epoch("a") == known
    return known


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


seqs = st.one_of(st.integers(-3, 6), st.sampled_from([MAX_EPOCH, MAX_EPOCH + 1, -MAX_EPOCH]),
                 st.integers(-2**70, 2**70))


def stale_or_any_epoch(known: int, stale: bool) -> st.SearchStrategy[int]:
    """Mostly the epoch b knows for a; else one older (stale, when b knows
    a newer one), no epoch (0), or any."""
    return st.sampled_from(["known", "known", "older", "none", "any"]).flatmap(
        lambda kind: {"known": st.just(known), "older": st.just(known - 1 if stale else known),
                      "none": st.just(0), "any": epochs}[kind])


@FUZZ
@given(st.data())
def test_fuzzed_stream_records_are_held_or_refused_and_never_touch_the_owners_queue(data):
    """A Stream with records from a: held and acknowledged, or refused
    with a Copied that says why (BAD_INPUT with its log line, STALE_EPOCH,
    NOT_HOLDER) and nothing stored; a box whose epoch or number is out of
    range, a number not above the last, or records without a number (or
    the reverse) is a log line, gets no Copied and changes nothing."""
    draw = data.draw
    # A newer a announced over the bare link leaves the real a stale at b:
    # once the bare link closes, b lacks a holder (it still serves).
    newer = draw(st.booleans(), label="b knows a newer a")
    with fuzzed_world(still_serving=not newer) as (net, peer):
        b = net["b"]
        known = newer_epoch_of_a(net, peer) if newer else b.cluster.holdings.known_epoch("a")
        last = draw(st.one_of(st.just(0), st.integers(1, 3)), label="numbered before")
        if last:  # an empty numbered box first: a link that numbered already
            peer.send(cmd.Stream, epoch=known, seq=last, records=b"")
            assert peer.copied == [copied(last)]
        epoch = draw(stale_or_any_epoch(known, newer), label="epoch")
        seq = draw(st.sampled_from(["next", "next", "next", "none", "last", "any"]).flatmap(
            lambda kind: {"next": st.just(last + 1), "none": st.none(), "last": st.just(last),
                          "any": seqs}[kind]), label="seq")
        valid = encode_records([
            Record(format_id(draw(st.sampled_from(["a", "a", "b", "x"])), known,
                             draw(st.integers(1, 50))),
                   draw(st.binary(max_size=20)), draw(st.sampled_from([None, "text/plain"])),
                   draw(st.sampled_from([None, "", "key"])), draw(st.integers(0, 3)))
            for _ in range(draw(st.integers(0, 3)))])
        records = draw(st.sampled_from(["valid", "valid", "mutated", "bytes", "none"]).flatmap(
            lambda kind: {"valid": st.just(valid), "mutated": mutated(valid),
                          "bytes": st.binary(max_size=200), "none": st.none()}[kind]),
            label="records")
        try:
            decoded: list[Record] | None = None if records is None else decode_records(records)
        except WireError:
            decoded = None
        before, held, logged, answered = held_by(b), b.held("a"), warnings(net), len(peer.copied)
        peer.send(cmd.Stream, epoch=epoch, seq=seq, records=records)
        said = peer.copied[answered:]
        if not (0 <= epoch <= MAX_EPOCH and (seq is None or 0 <= seq <= MAX_EPOCH)):
            assert logged_bad(net, "Stream", logged), (epoch, seq)
            assert said == []
        elif seq is None and records is None:
            assert said == [] and not logged_bad(net, "Stream", logged)
        elif seq is None or records is None:  # records without a number, or the reverse
            assert logged_bad(net, "Stream", logged)
            assert said == []
        elif seq <= last:  # a repeated or lower number
            assert logged_bad(net, "Stream", logged, f"{seq}")
            assert said == []
        elif 0 < epoch < known:
            assert said == [copied(seq, False, "STALE_EPOCH")]
        elif decoded is None:
            assert logged_bad(net, "Stream", logged)
            assert said == [copied(seq, False, "BAD_INPUT")]
        elif any(record.mid.node != "a" for record in decoded):
            assert said == [copied(seq, False, "NOT_HOLDER")]
        else:
            assert said == [copied(seq)]
            assert not logged_bad(net, "Stream", logged)
            assert b.held("a") == held + len({record.id for record in decoded})
            assert replicas(b) >= before.replicas
            assert own_queue(b) == before.queue
            assert tombstones_of(b) == before.tombstones
        if said != [copied(seq)]:  # not held: nothing stored, nothing changed
            assert held_by(b) == before
        link_kept(net, peer)


@FUZZ
@given(st.data())
def test_fuzzed_stream_tombstones_remove_exactly_what_they_name(data):
    """Tombstones in a Stream are merged, even from a stale epoch (a
    withdrawn push stays withdrawn) and beside records refused; bad bytes
    are a log line and remove nothing.  A numbered box of tombstones is
    acknowledged once they are held, or refused (BAD_INPUT) when they are
    bad; records refused beside them refuse the number."""
    draw = data.draw
    # A newer a announced over the bare link leaves the real a stale at b:
    # once the bare link closes, b lacks a holder (it still serves).
    newer = draw(st.booleans(), label="b knows a newer a")
    with fuzzed_world(still_serving=not newer) as (net, peer):
        b = net["b"]
        known = newer_epoch_of_a(net, peer) if newer else b.cluster.holdings.known_epoch("a")
        epoch = draw(stale_or_any_epoch(known, newer), label="epoch")
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
        beside = draw(st.sampled_from(["nothing", "a number", "records refused"]),
                      label="beside the tombstones")
        arguments: dict[str, Any] = dict(epoch=epoch, tombstones=payload)
        if beside == "a number":
            arguments.update(seq=1)
        elif beside == "records refused":
            arguments.update(seq=1, records=b"\xff not records")
        try:
            named: Tombstones | None = decode_tombstones(payload)
        except WireError:
            named = None
        before, logged = held_by(b), warnings(net)
        peer.send(cmd.Stream, **arguments)
        if not 0 <= epoch <= MAX_EPOCH:  # the whole box is refused
            assert logged_bad(net, "Stream", logged)
            assert peer.copied == []
            assert held_by(b) == before
            link_kept(net, peer)
            return
        if beside == "records refused":
            stale = 0 < epoch < known
            assert peer.copied == [copied(1, False, "STALE_EPOCH" if stale else "BAD_INPUT")]
        elif beside == "a number":
            assert peer.copied == [copied(1) if named is not None
                                   else copied(1, False, "BAD_INPUT")]
        else:
            assert peer.copied == []
        if named is None:
            assert logged_bad(net, "Stream", logged)
            assert held_by(b) == before
        else:
            gone = {i for i in before.queue
                    if (parse_id(i).node, parse_id(i).epoch, parse_id(i).seq) in named}
            assert own_queue(b) == {i: s for i, s in before.queue.items() if i not in gone}
            merged = Tombstones.from_dict(before.tombstones)
            merged.merge(named)
            assert tombstones_of(b) == merged.as_dict()
            assert b.held("a") == 0 and replicas(b) == before.replicas
        link_kept(net, peer)


@FUZZ
@given(st.data())
def test_fuzzed_stream_states_change_only_the_owners_copies(data):
    """States in a Stream from a change a's copies held by b, and nothing
    else: not b's own messages, not another owner's copies, nothing from a
    stale epoch; bad bytes are a log line and change nothing."""
    draw = data.draw
    newer = draw(st.booleans(), label="b knows a newer a")
    with fuzzed_world(still_serving=not newer, owners="bac") as (net, peer):
        b = net["b"]
        known = newer_epoch_of_a(net, peer) if newer else b.cluster.holdings.known_epoch("a")
        epoch = draw(stale_or_any_epoch(known, newer), label="epoch")
        ids = sorted({*b.node.queue, *(r.id for r in b.cluster.store.records())})
        changes = [Record(message_id_of(draw, ids) if draw(st.booleans()) else
                          draw(st.sampled_from(ids)), b"",
                          deliveries=draw(st.integers(0, 2**32 - 1)), held=draw(st.booleans()),
                          due=draw(st.none() | st.floats(1.0, 1e11)))
                   for _ in range(draw(st.integers(0, 4)))]
        try:
            valid = encode_states(changes)
        except Exception:  # an id no encoder takes (not ASCII, too long)
            valid = b""
        payload = draw(st.one_of(st.just(valid), st.binary(max_size=200),
                                 st.just(valid).map(lambda v: mutated_bytes(draw, v))),
                       label="states")
        try:
            decoded: list | None = decode_states(payload)
        except WireError:
            decoded = None
        before, logged = held_by(b), warnings(net)
        peer.send(cmd.Stream, epoch=epoch, states=payload)
        expected = {r[0]: r for r in before.replicas}
        if not 0 <= epoch <= MAX_EPOCH:
            assert logged_bad(net, "Stream", logged)
        elif 0 < epoch < known:  # an older incarnation no longer speaks for a
            assert not logged_bad(net, "Stream", logged)
        elif decoded is None:
            assert logged_bad(net, "Stream", logged)
        else:
            assert not logged_bad(net, "Stream", logged)
            for mid, message_id, deliveries, held, due in decoded:
                if mid.node == "a" and message_id in expected:
                    body = expected[message_id][1]
                    expected[message_id] = (message_id, body, deliveries, held, due)
        assert replicas(b) == frozenset(expected.values())
        assert own_queue(b) == before.queue
        assert tombstones_of(b) == before.tombstones and dict(b.cluster.store.epochs) == \
            before.epochs
        assert peer.copied == []
        link_kept(net, peer)


@FUZZ
@given(upto=counts, holder=st.booleans(),
       refused=st.none() | st.sampled_from(sorted(cmd.REFUSAL_CODES)) | st.text(max_size=12))
def test_fuzzed_copied_is_noted_or_logged_and_changes_nothing(upto, holder, refused):
    """A Copied about records b never streamed on this link settles
    nothing; bad values are a log line; the link stays."""
    with fuzzed_world() as (net, peer):
        b = net["b"]
        before, logged = held_by(b), warnings(net)
        arguments: dict[str, Any] = dict(upto=upto, holder=holder)
        if refused is not None:
            arguments["refused"] = refused
        peer.send(cmd.Copied, **arguments)
        bad = not 0 <= upto <= MAX_EPOCH or (refused is not None
                                             and refused not in cmd.REFUSAL_CODES)
        assert logged_bad(net, "Copied", logged) == bad
        assert held_by(b) == before
        assert not b.node.readiness.fenced and b.node.readiness.reason() is None
        link_kept(net, peer)


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
def test_fuzzed_sync_start_summaries_leave_out_only_what_they_name(data):
    """A SyncStart's ``seen`` is a summary of ids as tombstones are
    encoded: valid, b pages through its records but those named (b's own
    ready, never delivered messages, or copies); bad bytes are BAD_INPUT
    with a log line.  Either way nothing b holds changes."""
    draw = data.draw
    with fuzzed_world(owners="bc") as (net, peer):
        b = net["b"]
        held = {r.id for r in b.cluster.store.records()} | set(b.node.queue)
        seen = Tombstones()
        for message_id in draw(st.lists(st.sampled_from(sorted(held)), max_size=6)):
            seen.add(*parse_id(message_id))
        for _ in range(draw(st.integers(0, 2))):
            seen.add_range(draw(st.sampled_from(["a", "b", "c", "x"])), draw(st.integers(0, 3)),
                           draw(st.integers(0, 9)), draw(st.integers(10, 20)))
        valid = encode_tombstones(seen)
        payload = draw(st.one_of(st.just(valid), st.binary(max_size=200),
                                 st.just(valid).map(lambda v: mutated_bytes(draw, v))),
                       label="seen")
        queue, before = own_queue(b), warnings(net)
        result = peer.call(cmd.SyncStart, seen=payload)
        if payload == valid:
            paged, more = [], True
            while more:
                page = peer.call(cmd.SyncPage, token=result["token"])
                paged += [r.id for r in decode_records(page["records"])]
                more = page["more"]
            assert sorted(paged) == sorted(i for i in held if parse_id(i) not in seen)
        elif not isinstance(result, Failure):
            # Bytes that still decode: a summary like any other.
            assert set(result) == {"token", "tombstones", "epochs", "total"}
        else:
            assert bad_input(net, result, "SyncStart", before), result
        assert own_queue(b) == queue
        assert {r.id for r in b.cluster.store.records()} | set(b.node.queue) == held


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


# -- Stream boxes refused through an authenticated connection -----------------------


def a_records(*numbers: int, epoch: int = 1) -> bytes:
    """Records of a's messages ``a.<epoch>.<number>``."""
    return encode_records([Record(format_id("a", epoch, number), b"copy %d" % number)
                           for number in numbers])


def a_run(first: int, count: int, epoch: int = 1) -> bytes:
    """A packed run of a's messages ``a.<epoch>.<first>`` on."""
    return encode_run(format_id("a", epoch, first), None,
                      [b"copy %d" % n for n in range(first, first + count)])


def stream_refusals() -> list[Any]:
    """(what a sends, one Stream box after another; the Copied b says for
    the last; the warning b logs for it, or None)."""
    foreign = encode_records([Record(format_id("a", 1, 7), b"mine"),
                              Record(format_id("c", 1, 7), b"c's")])
    own = encode_records([Record(format_id("b", 1, 1), b"b's own id")])
    return [
        pytest.param([dict(seq=1, records=b"\xff not records")],
                     copied(1, False, "BAD_INPUT"), "", id="bad-records"),
        pytest.param([dict(seq=1, records=a_records(1)[:-3])],
                     copied(1, False, "BAD_INPUT"), "", id="truncated-records"),
        pytest.param([dict(seq=1, records=foreign)],
                     copied(1, False, "NOT_HOLDER"), None, id="another-owners-record"),
        pytest.param([dict(seq=1, records=own)],
                     copied(1, False, "NOT_HOLDER"), None, id="the-listeners-own-id"),
        pytest.param([dict(seq=1, records=a_records(1)), dict(seq=1, records=a_records(2))],
                     None, "stream number 1 after 1", id="number-repeated"),
        pytest.param([dict(seq=3, records=a_records(1)), dict(seq=2, records=a_records(2))],
                     None, "stream number 2 after 3", id="number-lower"),
        pytest.param([dict(seq=1, records=a_records(1)), dict(seq=0, records=a_records(2))],
                     None, "stream number 0 after 1", id="number-zero"),
        pytest.param([dict(seq=1)], None, "", id="number-without-records"),
        pytest.param([dict(records=a_records(1))], None, "", id="records-without-number"),
        pytest.param([dict(seq=-1, records=a_records(1))], None, "not a count",
                     id="negative-number"),
        pytest.param([dict(seq=MAX_EPOCH + 1, records=a_records(1))], None, "not a count",
                     id="number-out-of-range"),
        pytest.param([dict(seq=1, run=b"\x01 not a packed run")],
                     copied(1, False, "BAD_INPUT"), "packed run", id="bad-run"),
        pytest.param([dict(seq=1, run=a_run(1, 20)[:-1])],
                     copied(1, False, "BAD_INPUT"), "do not add up", id="truncated-run"),
        pytest.param([dict(seq=1, run=encode_run("c.1.7", None, [b"c's"] * 20))],
                     copied(1, False, "NOT_HOLDER"), None, id="another-owners-run"),
        pytest.param([dict(seq=1, run=encode_run("b.1.1", None, [b"b's"] * 20))],
                     copied(1, False, "NOT_HOLDER"), None, id="a-run-of-the-listeners-ids"),
        pytest.param([dict(seq=1, records=a_records(1), run=a_run(2, 20))], None,
                     "both records and a packed run", id="records-and-run"),
        pytest.param([dict(run=a_run(1, 20))], None, "", id="run-without-number"),
    ]


@pytest.mark.parametrize("boxes, said, logged_why", stream_refusals())
def test_stream_records_refused_change_nothing_and_keep_the_link(make, boxes, said,
                                                                 logged_why):
    """Records b does not take are a Copied that says why (BAD_INPUT also
    a log line) when they came numbered, else only a log line: either way
    nothing is stored, no epoch or tombstone changes, and the link stays and
    numbers on."""
    net = start_running(make(), owners="b")
    peer = authenticated(net, "b", "a")
    b = net["b"]
    known = b.cluster.holdings.known_epoch("a")
    *first, last = boxes
    for box in first:
        peer.send(cmd.Stream, epoch=known, **box)
    assert peer.copied == [copied(box["seq"]) for box in first]
    answered = len(peer.copied)
    before, logged = held_by(b), warnings(net)
    peer.send(cmd.Stream, epoch=known, **last)
    assert peer.copied[answered:] == ([] if said is None else [said])
    if logged_why is None:
        assert not logged_bad(net, "Stream", logged)
    else:
        assert logged_bad(net, "Stream", logged, logged_why), net.logged(LogLevel.warn)
    assert held_by(b) == before
    link_kept(net, peer)
    # The link numbers on: the next number with sound records is held.
    numbers = [box.get("seq") for box in boxes]
    after = max([0, *(n for n in numbers if n is not None and 0 <= n <= MAX_EPOCH)])
    peer.send(cmd.Stream, epoch=known, seq=after + 1, records=a_records(40))
    assert peer.copied[-1] == copied(after + 1)
    assert b.held("a") == len(before.replicas) + 1
    peer.close()


def test_stream_from_a_stale_epoch_withdraws_but_stores_and_changes_nothing(make):
    """Once b knows a newer a, a Stream with an older epoch of a is refused
    (STALE_EPOCH) for its records and ignored for its states, but its
    tombstones are merged: a push withdrawn must stay withdrawn.  Even the
    current a speaks only for its own messages' states."""
    net = start_running(make(), owners="ac")
    peer = authenticated(net, "b", "a")
    b = net["b"]
    stale = b.cluster.holdings.known_epoch("a")
    newer = newer_epoch_of_a(net, peer)
    copies = sorted(record.id for record in b.cluster.store.records("a"))
    of_c = sorted(record.id for record in b.cluster.store.records("c"))
    assert len(copies) == len(of_c) == 4
    set_aside = [Record(message_id, b"", deliveries=99, held=True, due=2e9)
                 for message_id in [*copies, *of_c]]
    withdrawn = Tombstones()
    mid = parse_id(copies[0])
    withdrawn.add(mid.node, mid.epoch, mid.seq)
    before, logged = held_by(b), warnings(net)
    peer.send(cmd.Stream, epoch=stale, seq=1, records=a_records(50, epoch=stale),
              states=encode_states(set_aside), tombstones=encode_tombstones(withdrawn))
    assert peer.copied == [copied(1, False, "STALE_EPOCH")]
    assert not logged_bad(net, "Stream", logged)
    assert b.cluster.store.get(copies[0]) is None and b.cluster.store.is_tombstoned(copies[0])
    assert replicas(b) == {r for r in before.replicas if r[0] != copies[0]}
    assert all(r[2:] == (0, False, None) for r in replicas(b))  # states ignored
    assert own_queue(b) == before.queue
    assert dict(b.cluster.store.epochs) == before.epochs
    assert b.cluster.holdings.known_epoch("a") == newer
    link_kept(net, peer)
    # The newer a's word counts, for a's messages only.
    kept = replicas(b)
    peer.send(cmd.Stream, epoch=newer, seq=2, records=a_records(51, epoch=newer),
              states=encode_states(set_aside[1:]))
    assert peer.copied[-1] == copied(2)
    assert b.held("a") == 4 - 1 + 1
    for message_id in copies[1:]:
        assert b.cluster.store.get(message_id).deliveries == 99
    assert {r for r in replicas(b) if r[0] in of_c} == {r for r in kept if r[0] in of_c}
    peer.close()


# -- boxes no typed callRemote would send ------------------------------------------


def b_message_tombstone(net: Net) -> bytes:
    """The encoded tombstone of b's first own message."""
    stones = Tombstones()
    mid = parse_id(sorted(net["b"].node.queue)[0])
    stones.add(mid.node, mid.epoch, mid.seq)
    return encode_tombstones(stones)


VALID_RECORDS = encode_records([Record(format_id("a", 1, 99), b"body")])
RECORDS = {"seq": b"1", "records": b"1", "records.1": VALID_RECORDS}
B_TOMBSTONE = object()  # stands for b_message_tombstone(net)


@pytest.mark.parametrize("strings, named", [
    ({"seq": b"1", "records": b"2", "records.1": VALID_RECORDS}, "records"),  # a chunk missing
    ({"seq": b"1", "records": b"0"}, "records"),  # not a count
    ({"seq": b"1", "records": b"one", "records.1": VALID_RECORDS}, "records"),
    ({"seq": b"1", "records": b"99999999999"}, "records"),  # forged, huge
    ({"seq": b"1", "records": b"-1", "records.1": VALID_RECORDS}, "records"),
    ({"states": b"2", "states.1": b""}, "states"),
    ({"tombstones": b"3", "tombstones.1": b"{}"}, "tombstones"),
    # A forged part costs the whole box: the valid parts beside it too.
    ({**RECORDS, "tombstones": b"2", "tombstones.1": B_TOMBSTONE}, "tombstones"),
    ({"seq": b"1", "records": b"3", "records.1": VALID_RECORDS,
      "tombstones": b"1", "tombstones.1": B_TOMBSTONE}, "records"),
], ids=["chunk-missing", "zero-chunks", "word-count", "huge-count", "negative-count",
        "states", "tombstones", "tombstones-beside-records", "records-beside-tombstones"])
def test_forged_chunk_counts_in_a_stream_are_dropped_and_keep_the_link(make, strings, named):
    """Chunked is dqid's own AMP argument: a forged count is found while the
    box is read, before any of it is taken.  A Stream is not answered: the
    box is logged as bad input (naming the part) and dropped whole (no
    Copied, nothing stored or withdrawn), the link stays open (no
    traceback: see ``nets``), and its number was not used up."""
    net = start_running(make(), owners="b")
    peer = authenticated(net, "b", "a")
    b = net["b"]
    known = b.cluster.holdings.known_epoch("a")
    strings = {key: b_message_tombstone(net) if value is B_TOMBSTONE else value
               for key, value in strings.items()}
    before, logged, boxes = held_by(b), warnings(net), len(peer.client.boxes)
    peer.send_raw(b"Stream", epoch=b"%d" % known, **strings)
    assert logged_bad(net, "Stream", logged, named), net.logged(LogLevel.warn)
    assert held_by(b) == before
    assert peer.client.boxes[boxes:] == []  # not a word back: no answer, no Copied
    link_kept(net, peer)
    # The same number with sound records is taken and acknowledged.
    peer.send(cmd.Stream, epoch=known, seq=1, records=VALID_RECORDS)
    assert peer.copied == [copied(1)]
    assert b.held("a") == 1
    peer.close()


@pytest.mark.parametrize("name, strings, named", [
    (b"Stream", {"epoch": b"one"}, "epoch"),
    (b"Stream", {"epoch": b"1", "seq": b"first", **{k: v for k, v in RECORDS.items()
                                                     if k != "seq"}}, "seq"),
    (b"Stream", {"epoch": b"0x1", **RECORDS}, "epoch"),
    (b"Stream", {**RECORDS}, "epoch"),  # no epoch
    (b"Stream", {"epoch": b"1", "seq": b"1.5", "records": b"1",
                 "records.1": VALID_RECORDS}, "seq"),
    (b"Copied", {"upto": b"x", "holder": b"True"}, "upto"),
    (b"Copied", {"upto": b"1", "holder": b"maybe"}, "holder"),
    (b"Copied", {"holder": b"True"}, "upto"),  # no upto
    (b"Copied", {"upto": b"1", "holder": b"True", "refused": b"\xff\xfe"},
     "refused"),  # not UTF-8
])
def test_unanswered_values_amp_cannot_parse_are_dropped_and_keep_the_link(make, name,
                                                                          strings, named):
    """Values AMP's own types cannot parse (Integer, Boolean, Unicode, a
    missing argument): an unanswered box is logged as bad input naming the
    argument and dropped, nothing changes, the link stays and every node
    serves on."""
    net = start_running(make(), owners="b")
    peer = authenticated(net, "b", "a")
    b = net["b"]
    before, logged, boxes = held_by(b), warnings(net), len(peer.client.boxes)
    peer.send_raw(name, **strings)
    assert logged_bad(net, name.decode(), logged, named), net.logged(LogLevel.warn)
    assert held_by(b) == before
    assert peer.client.boxes[boxes:] == []  # not a word back
    link_kept(net, peer)
    if name == b"Stream":  # its number was not used up
        peer.send(cmd.Stream, epoch=b.cluster.holdings.known_epoch("a"), seq=1,
                  records=VALID_RECORDS)
        assert peer.copied == [copied(1)] and b.held("a") == 1
    peer.close()
    net.advance(DEFAULT_TIMINGS.heartbeat_interval * 2)
    for member in net.members.values():
        assert member.node.readiness.reason() is None
        assert all(member.connected(p) for p in net.names if p != member.name)


def test_a_stream_box_arriving_a_byte_at_a_time_is_held_once(make):
    """The node reads AMP's framing a buffer at a time: a box cut into
    single bytes is still one box, held and acknowledged once."""
    net = start_running(make(), owners="b")
    peer = authenticated(net, "b", "a")
    b = net["b"]
    box = amp.AmpBox(_command=b"Stream", epoch=b"%d" % b.cluster.holdings.known_epoch("a"),
                     **RECORDS).serialize()
    for index in range(len(box)):
        peer.client.transport.write(box[index:index + 1])
        peer.pump.flush()
        assert peer.copied == ([] if index < len(box) - 1 else [copied(1)])
    peer.settle()
    assert peer.copied == [copied(1)] and b.held("a") == 1
    link_kept(net, peer)


@pytest.mark.parametrize("length", [256, 0xFFFF])
def test_a_key_longer_than_amp_allows_closes_the_link_and_reads_nothing_after_it(make, length):
    """As AMP does: a key length over 255 closes the connection; the boxes
    before it count, nothing after it is read, and the cluster serves on."""
    net = start_running(make(), owners="b")
    peer = authenticated(net, "b", "a")
    b = net["b"]
    before = held_by(b)
    stream = amp.AmpBox(_command=b"Stream", epoch=b"%d" % b.cluster.holdings.known_epoch("a"),
                        **RECORDS).serialize()
    after = amp.AmpBox(_command=b"Stream", epoch=b"%d" % b.cluster.holdings.known_epoch("a"),
                       seq=b"2", records=b"1", **{"records.1": encode_records(
                           [Record(format_id("a", 1, 100), b"body")])}).serialize()
    peer.client.transport.write(stream + length.to_bytes(2, "big") + b"k" * 300 + after)
    peer.settle()
    assert peer.closed
    assert peer.copied == [copied(1)] and b.held("a") == 1  # the box before it only
    assert held_by(b) != before
    net.advance(DEFAULT_TIMINGS.heartbeat_interval * 2)
    for member in net.members.values():
        assert member.node.readiness.reason() is None
        assert all(member.connected(p) for p in net.names if p != member.name)


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

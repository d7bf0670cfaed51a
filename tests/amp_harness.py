"""In-memory dqid clusters for deterministic tests of the AMP layer.

One :class:`twisted.internet.task.Clock` drives every node; each pair of
nodes is one real :class:`~dqid.amp_protocol.PeerProtocol` pair (the dialling
side built with ``dialled=``) over :mod:`twisted.test.iosim` fake transports.
Nothing touches the global reactor: :meth:`Net.settle` moves bytes and runs
due calls until the cluster is quiet, :meth:`Net.advance` moves time in small
steps so heartbeats, timeouts and retries run as they would in a process.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.test import iosim

from dqid.amp_protocol import PeerAuth, PeerProtocol
from dqid.cluster import Cluster
from dqid.node import PushItem, QueueNode
from dqid.options import PeerAddress
from dqid.timings import DEFAULT_TIMINGS

STEP = 0.05


def deferred(call: Any, *args: Any) -> Deferred:
    """What a node operation answers, as a Deferred (it may answer at once,
    raise at once, or return a Deferred)."""
    return maybeDeferred(call, *args)


@dataclass(eq=False)
class Link:
    """One connection: ``dialler`` dialled ``listener``."""

    dialler: str
    listener: str
    client: PeerProtocol
    server: PeerProtocol
    pump: iosim.IOPump
    paused: bool = False

    @property
    def closed(self) -> bool:
        return bool(self.pump.clientIO.disconnected and self.pump.serverIO.disconnected)

    def names(self) -> frozenset[str]:
        return frozenset((self.dialler, self.listener))


@dataclass(eq=False)
class Member:
    name: str
    node: QueueNode
    cluster: Cluster

    def push(self, body: bytes = b"job", **kw: Any) -> Deferred:
        item = PushItem(body, kw.get("content_type"), kw.get("delay"))
        return deferred(self.node.push, item, kw.get("key"))

    def get(self, visibility: float = 30.0, wait: float = 0.0, count: int = 1) -> Deferred:
        return deferred(self.node.get, visibility, wait, count)

    def ack(self, message_id: str) -> Deferred:
        return deferred(self.node.ack, message_id)

    def held(self, owner: str) -> int:
        return self.cluster.store.held(owner)

    def connected(self, peer: str) -> bool:
        return self.cluster.links.is_connected(self.cluster.peers[peer])


@dataclass(eq=False)
class Net:
    """Nodes named by the caller, all configured with the same members."""

    names: list[str]
    min_copies: int
    size: int = 100
    replication_timeout: float = 5.0
    key: bytes = b"a cluster key of the tests, 32 b"
    max_deliveries: int = 0
    clock: Clock = field(default_factory=Clock)
    members: dict[str, Member] = field(default_factory=dict)
    retired: list[Member] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        globalLogPublisher.addObserver(self.events.append)

    # -- building ------------------------------------------------------------

    def build(self, name: str, members: Iterable[str] | None = None,
              start: bool = True) -> Member:
        """A fresh node ``name`` (epoch 0, recovering), replacing any other."""
        members = list(self.names if members is None else members)
        peers = [PeerAddress(p, "127.0.0.1", 9000 + i)
                 for i, p in enumerate(members) if p != name]
        node = QueueNode(name, self.size, self.clock, epoch=0,
                         max_deliveries=self.max_deliveries)
        timings = replace(DEFAULT_TIMINGS, replication_timeout=self.replication_timeout)
        cluster = Cluster(node, peers, self.clock, self.min_copies, timings)
        member = Member(name, node, cluster)
        old = self.members.get(name)
        if old is not None:
            self.retired.append(old)
        self.members[name] = member
        if start:
            cluster.start()
        return member

    def connect(self, dialler: Member | str, listener: Member | str,
                dialled: str | None = None) -> Link:
        """``dialler`` connects to ``listener`` (believing it is ``dialled``,
        by default the listener's name) and sends Hello."""
        a = self.members[dialler] if isinstance(dialler, str) else dialler
        b = self.members[listener] if isinstance(listener, str) else listener
        client = PeerProtocol(a.cluster, self.auth(a.name), dialled=dialled or b.name)
        server = PeerProtocol(b.cluster, self.auth(b.name))
        pump = iosim.connect(
            server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client),
            greet=False, clock=self.clock,
        )
        link = Link(a.name, b.name, client, server, pump)
        self.links.append(link)
        return link

    def mesh(self, names: Iterable[str] | None = None) -> None:
        """Connect every pair once (the earlier name dials)."""
        names = list(self.names if names is None else names)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                self.connect(a, b)

    def start_all(self) -> list[Member]:
        """Build, connect and cold-start every node; the members in order."""
        for name in self.names:
            self.build(name)
        self.mesh()
        self.settle()
        return [self.members[name] for name in self.names]

    def auth(self, name: str, key: bytes | None = None) -> PeerAuth:
        """What node ``name``'s connections prove and check (the cluster key)."""
        return PeerAuth(key or self.key, name, frozenset(self.names) - {name}, self.clock,
                        DEFAULT_TIMINGS.call_timeout)

    def __getitem__(self, name: str) -> Member:
        return self.members[name]

    # -- links ---------------------------------------------------------------

    def links_of(self, *names: str) -> list[Link]:
        return [link for link in self.links
                if not link.closed and link.names() & set(names)]

    def links_between(self, a: str, b: str) -> list[Link]:
        return [link for link in self.links
                if not link.closed and link.names() == {a, b}]

    def pause(self, a: str, b: str | None = None) -> None:
        """Stop delivering bytes on the links of ``a`` (to ``b`` only)."""
        for link in self.links_of(a):
            if b is None or link.names() == {a, b}:
                link.paused = True

    def resume(self, a: str, b: str | None = None) -> None:
        for link in self.links:
            if a in link.names() and (b is None or link.names() == {a, b}):
                link.paused = False

    def cut(self, a: str, b: str | None = None) -> None:
        """Close the links of ``a`` (to ``b`` only): both sides see it."""
        for link in self.links_of(a):
            if b is None or link.names() == {a, b}:
                link.paused = False
                link.client.transport.loseConnection()
        self.settle()

    # -- driving -------------------------------------------------------------

    def _due(self) -> bool:
        now = self.clock.seconds()
        return any(call.getTime() <= now for call in self.clock.getDelayedCalls())

    def settle(self) -> None:
        """Pump every live, unpaused link and run due calls until quiet."""
        for _ in range(10_000):
            moved = False
            for link in list(self.links):
                if not link.paused and not link.closed:
                    moved = link.pump.flush() or moved
            if self._due():
                self.clock.advance(0)
                moved = True
            if not moved:
                return
        raise AssertionError("the cluster never went quiet")

    def deliver_until(self, condition: Any) -> None:
        """Deliver bytes on the live, unpaused links, running no call (so
        no turn ends), until ``condition()`` holds."""
        for _ in range(100):
            if condition():
                return
            for link in self.links:
                if not link.paused and not link.closed:
                    link.pump.pump(advanceClock=False)
        raise AssertionError("never true")

    def advance(self, seconds: float, step: float = STEP) -> None:
        """Let ``seconds`` of clock time pass in small, settled steps."""
        self.settle()
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end - 1e-9:
            self.clock.advance(min(step, end - self.clock.seconds()))
            self.settle()

    def run_until(self, condition: Any, limit: float = 5.0, step: float = STEP) -> float:
        """Advance until ``condition()`` holds; the clock time it took."""
        start = self.clock.seconds()
        self.settle()
        while not condition():
            if self.clock.seconds() - start > limit:
                raise AssertionError(f"not true within {limit} s of clock time")
            self.clock.advance(step)
            self.settle()
        return self.clock.seconds() - start

    # -- logs ----------------------------------------------------------------

    def logged(self, level: LogLevel | None = None) -> list[str]:
        return [formatEvent(e) for e in self.events
                if level is None or e.get("log_level") == level]

    def failures(self) -> list[str]:
        """Tracebacks logged (unhandled errors, log.failure)."""
        return [formatEvent(e) + "\n" + e["log_failure"].getTraceback()
                for e in self.events if "log_failure" in e]

    # -- teardown ------------------------------------------------------------

    def close(self) -> list[Any]:
        """Stop every node, drop every link, let every timeout run out.

        Returns the delayed calls still scheduled afterwards (should be none:
        a stopped cluster leaves no heartbeat, retry or session timer).
        """
        try:
            for member in [*self.retired, *self.members.values()]:
                member.cluster.stop()
                member.node.shutdown()
            for link in self.links:
                link.paused = False
                if not link.closed:
                    link.client.transport.loseConnection()
            self.settle()
            self.clock.advance(60.0)
            self.settle()
            self.clock.advance(120.0)
            self.settle()
            return list(self.clock.getDelayedCalls())
        finally:
            globalLogPublisher.removeObserver(self.events.append)

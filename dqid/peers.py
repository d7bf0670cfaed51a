"""What a node knows about each peer, and the per-peer reconnecting client.

A peer may be reachable over several hello'd connections (the one we
dialled, the one it dialled); any of them carries calls both ways.  The peer
counts as connected while it has a link and answered within ``dead_after``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IProtocolFactory

from .options import PeerAddress
from .peer_tls import PeerTLS
from .timings import Timings


class Link(Protocol):
    """One hello'd AMP connection to a peer (a PeerProtocol)."""

    dialled: str | None  # the peer id we connected out to, if any
    peer_id: str | None  # who the other side is, once hello'd
    peer_epoch: int  # its epoch when it said hello or announced
    version: int
    transport: Any

    def callRemote(self, command: type, **arguments: Any) -> Deferred: ...

    def send(self, command: type, **arguments: Any) -> None: ...


@dataclass(eq=False)
class Peer:
    node_id: str
    address: PeerAddress
    links: list[Link] = field(default_factory=list)
    epoch: int = 0  # its serving epoch as far as we know; 0 = none yet
    serving: bool = False
    ready_count: int = 0  # its ready messages, from heartbeats and replication
    last_seen: float = float("-inf")
    down_logged: bool = True

    def link(self) -> Link | None:
        """The newest link to the peer's serving epoch, else the newest."""
        for link in reversed(self.links):
            if link.peer_epoch and link.peer_epoch == self.epoch:
                return link
        return self.links[-1] if self.links else None

    def is_connected(self, now: float, dead_after: float) -> bool:
        return bool(self.links) and now - self.last_seen <= dead_after

    def stats(self, now: float, dead_after: float) -> dict[str, Any]:
        connected = self.is_connected(now, dead_after)
        return {
            "connected": connected,
            "epoch": self.epoch,
            "serving": self.serving and connected,
            "ready": self.ready_count,
        }


def peer_client(reactor: Any, factory: IProtocolFactory, peer: PeerAddress,
                timings: Timings, tls: PeerTLS | None = None) -> ClientService:
    """A ClientService that keeps one outbound connection to ``peer``
    (over mutual TLS when ``tls`` is given)."""
    endpoint: Any = HostnameEndpoint(reactor, peer.host, peer.port,
                                     timeout=timings.dial_timeout)
    if tls is not None:
        endpoint = tls.client_endpoint(endpoint, peer.host)
    return ClientService(
        endpoint,
        factory,
        retryPolicy=backoffPolicy(initialDelay=timings.reconnect_initial,
                                  maxDelay=timings.reconnect_max, factor=2.0),
        clock=reactor,
    )

"""What a node knows about each peer, and the per-peer reconnecting client.

A peer may be reachable over several hello'd connections (the one we
dialled, the one it dialled); any of them carries calls both ways.  The peer
counts as connected while it has a link and answered within ``DEAD_AFTER``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.endpoints import HostnameEndpoint

from .amp_protocol import PeerFactory, PeerProtocol
from .options import PeerAddress

if TYPE_CHECKING:
    from .cluster import Cluster

HEARTBEAT_INTERVAL = 0.25
DEAD_AFTER = 1.0
CALL_TIMEOUT = 5.0  # any call to a peer


@dataclass(eq=False)
class Peer:
    node_id: str
    address: PeerAddress
    links: list[PeerProtocol] = field(default_factory=list)
    epoch: int = 0  # its serving epoch as far as we know; 0 = none yet
    serving: bool = False
    ready: int = 0  # its ready messages, from heartbeats and replication
    last_seen: float = float("-inf")
    synced: bool = False  # a full sync from it finished since it came up
    synced_serving: bool = False  # ... and it was serving at the time
    syncing: bool = False
    synced_at: float = float("-inf")
    in_flight: int = 0  # Replicate calls sent and not answered
    backlog: list[Any] = field(default_factory=list)  # batches waiting to go
    down_logged: bool = True

    def link(self) -> PeerProtocol | None:
        """The newest link to the peer's serving epoch, else the newest."""
        for link in reversed(self.links):
            if link.peer_epoch and link.peer_epoch == self.epoch:
                return link
        return self.links[-1] if self.links else None

    def is_connected(self, now: float) -> bool:
        return bool(self.links) and now - self.last_seen <= DEAD_AFTER

    def serving_link(self, now: float) -> PeerProtocol | None:
        """The link to call when the peer serves and answers, else None."""
        return self.link() if self.serving and self.is_connected(now) else None

    def stats(self, now: float, held: int) -> dict[str, Any]:
        return {
            "connected": self.is_connected(now),
            "held": held,
            "epoch": self.epoch,
            "serving": self.serving and self.is_connected(now),
            "ready": self.ready,
            "synced": self.synced,
        }


def peer_client(reactor: Any, cluster: "Cluster", peer: PeerAddress) -> ClientService:
    """A ClientService that keeps one outbound AMP connection to ``peer``."""
    endpoint = HostnameEndpoint(reactor, peer.host, peer.port, timeout=2)
    return ClientService(
        endpoint,
        PeerFactory(cluster, dialled=peer.node_id),
        retryPolicy=backoffPolicy(initialDelay=0.1, maxDelay=2.0, factor=2.0),
        clock=reactor,
    )

"""The AMP protocol between peers: responders delegate to the Cluster.

A connection is symmetric once :class:`~dqid.amp_commands.Hello` has been
answered: the side that dialled sends Hello, and from then on either side
may call any command on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp

from . import amp_commands as cmd

if TYPE_CHECKING:
    from .cluster import Cluster


def negotiate(local_min: int, local_max: int, remote_min: int, remote_max: int) -> int | None:
    """The best version both sides speak, or None."""
    best = min(local_max, remote_max)
    return best if best >= max(local_min, remote_min) else None


class PeerProtocol(amp.AMP):
    log = Logger()

    def __init__(self, cluster: "Cluster", dialled: str | None = None) -> None:
        super().__init__()
        self.cluster = cluster
        self.dialled = dialled  # the peer id we connected out to, if any
        self.peer_id: str | None = None
        self.peer_epoch = 0
        self.version = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        # Small request/answer boxes: without this, Nagle's algorithm and
        # the peer's delayed ACK hold many of them ~40 ms.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        if self.dialled is not None:
            self.cluster.say_hello(self)

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self.cluster.link_down(self)

    def _from_peer(self) -> str:
        if self.peer_id is None:
            raise cmd.NotHolder("say Hello first")
        return self.peer_id

    @cmd.Hello.responder
    def hello(self, version_min: int, version_max: int, node: str, epoch: int,
              cluster: list[str]) -> dict:
        return self.cluster.on_hello(self, version_min, version_max, node, epoch, cluster)

    @cmd.Announce.responder
    def announce(self, node: str, epoch: int) -> dict:
        self._from_peer()
        self.cluster.on_announce(self, node, epoch)
        return {}

    @cmd.Heartbeat.responder
    def heartbeat(self, node: str, epoch: int, ready: int, serving: bool) -> dict:
        self._from_peer()
        return self.cluster.on_heartbeat(self, epoch, ready, serving)

    @cmd.Replicate.responder
    def replicate(self, owner: str, epoch: int, records: bytes) -> dict:
        self._from_peer()
        return {"held": self.cluster.on_replicate(self, owner, epoch, records)}

    @cmd.Forget.responder
    def forget(self, tombstones: bytes) -> dict:
        self._from_peer()
        self.cluster.on_forget(tombstones)
        return {}

    @cmd.Ack.responder
    def ack(self, ids: list[str]) -> dict:
        self._from_peer()
        acked, unknown = self.cluster.on_ack(ids)
        return {"acked": acked, "unknown": unknown}

    @cmd.Lease.responder
    def lease(self, id: str, visibility: float) -> dict:
        self._from_peer()
        return {"outcome": self.cluster.on_lease(id, visibility)}

    @cmd.KeyLookup.responder
    def key_lookup(self, key: str, digest: bytes) -> Any:
        self._from_peer()
        return self.cluster.on_key_lookup(key, digest)

    @cmd.Take.responder
    def take(self, count: int, visibility: float) -> dict:
        self._from_peer()
        return {"records": self.cluster.on_take(count, visibility)}

    @cmd.SyncStart.responder
    def sync_start(self) -> dict:
        self._from_peer()
        return self.cluster.on_sync_start()

    @cmd.SyncPage.responder
    def sync_page(self, token: str) -> dict:
        self._from_peer()
        return self.cluster.on_sync_page(token)


class PeerFactory(Factory):
    """Builds PeerProtocols for one side of the link."""

    noisy = False

    def __init__(self, cluster: "Cluster", dialled: str | None = None) -> None:
        self.cluster = cluster
        self.dialled = dialled

    def buildProtocol(self, addr: Any) -> PeerProtocol:
        protocol = PeerProtocol(self.cluster, self.dialled)
        protocol.factory = self
        return protocol

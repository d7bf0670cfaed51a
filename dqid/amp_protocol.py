"""The AMP protocol between peers: responders delegate to a Handlers.

A connection is symmetric once :class:`~dqid.amp_commands.Hello` has been
answered: the side that dialled sends Hello, and from then on either side
may call any command on it.  This module knows the commands, not the
cluster: it is written against :class:`Handlers`, which the cluster is.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp

from . import amp_commands as cmd
from .amp_commands import negotiate

__all__ = ["Handlers", "PeerFactory", "PeerProtocol", "negotiate"]


class Handlers(Protocol):
    """What answers the commands of a peer (the cluster)."""

    def say_hello(self, link: "PeerProtocol") -> None: ...

    def link_down(self, link: "PeerProtocol") -> None: ...

    def on_hello(self, link: "PeerProtocol", version_min: int, version_max: int,
                 node: str, epoch: int, cluster: list[str]) -> dict: ...

    def on_announce(self, link: "PeerProtocol", node: str, epoch: int) -> None: ...

    def on_heartbeat(self, link: "PeerProtocol", epoch: int, ready: int,
                     serving: bool) -> dict: ...

    def on_replicate(self, link: "PeerProtocol", owner: str, epoch: int,
                     records: bytes) -> bool: ...

    def on_tombstones(self, tombstones: bytes) -> None: ...

    def on_ack(self, ids: list[str]) -> tuple[list[str], list[str]]: ...

    def on_lease(self, message_id: str, visibility: float) -> str: ...

    def on_key_lookup(self, key: str, digest: bytes) -> Deferred: ...

    def on_take(self, count: int, visibility: float) -> bytes: ...

    def on_sync_start(self) -> dict: ...

    def on_sync_page(self, token: str) -> dict: ...


class PeerProtocol(amp.AMP):
    log = Logger()

    def __init__(self, handlers: Handlers, dialled: str | None = None) -> None:
        super().__init__()
        self.handlers = handlers
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
            self.handlers.say_hello(self)

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self.handlers.link_down(self)

    def _from_peer(self) -> str:
        if self.peer_id is None:
            raise cmd.NotHolder("say Hello first")
        return self.peer_id

    @cmd.Hello.responder
    def hello(self, version_min: int, version_max: int, node: str, epoch: int,
              cluster: list[str]) -> dict:
        return self.handlers.on_hello(self, version_min, version_max, node, epoch, cluster)

    @cmd.Announce.responder
    def announce(self, node: str, epoch: int) -> dict:
        self._from_peer()
        self.handlers.on_announce(self, node, epoch)
        return {}

    @cmd.Heartbeat.responder
    def heartbeat(self, node: str, epoch: int, ready: int, serving: bool) -> dict:
        self._from_peer()
        return self.handlers.on_heartbeat(self, epoch, ready, serving)

    @cmd.Replicate.responder
    def replicate(self, owner: str, epoch: int, records: bytes) -> dict:
        self._from_peer()
        return {"held": self.handlers.on_replicate(self, owner, epoch, records)}

    @cmd.Tombstones.responder
    def tombstones(self, tombstones: bytes) -> dict:
        self._from_peer()
        self.handlers.on_tombstones(tombstones)
        return {}

    @cmd.Ack.responder
    def ack(self, ids: list[str]) -> dict:
        self._from_peer()
        acked, unknown = self.handlers.on_ack(ids)
        return {"acked": acked, "unknown": unknown}

    @cmd.Lease.responder
    def lease(self, id: str, visibility: float) -> dict:
        self._from_peer()
        return {"outcome": self.handlers.on_lease(id, visibility)}

    @cmd.KeyLookup.responder
    def key_lookup(self, key: str, digest: bytes) -> Any:
        self._from_peer()
        return self.handlers.on_key_lookup(key, digest)

    @cmd.Take.responder
    def take(self, count: int, visibility: float) -> dict:
        self._from_peer()
        return {"records": self.handlers.on_take(count, visibility)}

    @cmd.SyncStart.responder
    def sync_start(self) -> dict:
        self._from_peer()
        return self.handlers.on_sync_start()

    @cmd.SyncPage.responder
    def sync_page(self, token: str) -> dict:
        self._from_peer()
        return self.handlers.on_sync_page(token)


class PeerFactory(Factory):
    """Builds PeerProtocols for one side of the link."""

    noisy = False

    def __init__(self, handlers: Handlers, dialled: str | None = None) -> None:
        self.handlers = handlers
        self.dialled = dialled

    def buildProtocol(self, addr: Any) -> PeerProtocol:
        protocol = PeerProtocol(self.handlers, self.dialled)
        protocol.factory = self
        return protocol

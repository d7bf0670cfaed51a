"""The link table of a cluster node: which peers are linked, which answer,
calls with timeouts, and links going up and down.

Links knows nothing of replication or recovery: what must happen when a
peer comes up or goes down is told to a :class:`LinkEvents` listener.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .options import PeerAddress
from .peers import Link, Peer
from .timings import Timings


class LinkEvents(Protocol):
    def peer_up(self, peer: Peer) -> None:
        """A link to ``peer`` came up (called in the next turn)."""

    def peer_down(self, peer: Peer) -> None:
        """``peer`` lost its last link or stopped answering."""


class Links:
    log = Logger()

    def __init__(self, me: str, peers: Sequence[PeerAddress], clock: IReactorTime,
                 timings: Timings) -> None:
        self.me = me
        self.clock = clock
        self.timings = timings
        self.peers = {p.node_id: Peer(p.node_id, p) for p in peers}
        self.members = sorted([me, *self.peers])
        self.events: LinkEvents | None = None

    def now(self) -> float:
        return self.clock.seconds()

    def call(self, link: Link, command: type, timeout: float | None = None,
             **arguments: Any) -> Deferred:
        """callRemote with a timeout; the caller adds the errback."""
        d = link.callRemote(command, **arguments)
        d.addTimeout(self.timings.call_timeout if timeout is None else timeout, self.clock)
        return d

    def send(self, link: Link, command: type, **arguments: Any) -> None:
        """Send an unanswered command (``requiresAnswer`` False)."""
        link.send(command, **arguments)

    # -- who is there --------------------------------------------------------

    def is_connected(self, peer: Peer) -> bool:
        return peer.is_connected(self.now(), self.timings.dead_after)

    def linked(self) -> list[Peer]:
        """Peers with a hello'd link, answering or not."""
        return [p for p in self.peers.values() if p.links]

    def serving(self) -> list[Peer]:
        """Peers that answer and serve: holders of copies, owners to ask."""
        now, dead_after = self.now(), self.timings.dead_after
        return [p for p in self.peers.values() if p.serving and p.is_connected(now, dead_after)]

    def serving_link(self, peer: Peer) -> Link | None:
        """The link to call when ``peer`` serves and answers, else None."""
        return peer.link() if peer.serving and self.is_connected(peer) else None

    def stats(self) -> dict[str, dict[str, Any]]:
        now, dead_after = self.now(), self.timings.dead_after
        return {name: peer.stats(now, dead_after) for name, peer in sorted(self.peers.items())}

    # -- links up and down ---------------------------------------------------

    def link_up(self, link: Link, node: str, epoch: int, serving: bool) -> Peer:
        peer = self.peers[node]
        link.peer_id = node
        link.peer_epoch = epoch
        was_connected = bool(peer.links)
        peer.links.append(link)
        peer.last_seen = self.now()
        if epoch:
            peer.epoch = max(peer.epoch, epoch)
            self.drop_stale_links(peer, epoch)
        peer.serving = serving and epoch >= peer.epoch
        if not was_connected:
            self.log.info("peer {peer} connected (epoch {epoch})", peer=node, epoch=epoch)
            peer.down_logged = False
        if self.events is not None:
            # After this turn: the Hello answer must reach the peer first.
            self.clock.callLater(0, self.events.peer_up, peer)
        return peer

    def link_down(self, link: Link) -> None:
        peer = self.peers.get(link.peer_id or "")
        if peer is None or link not in peer.links:
            return
        peer.links.remove(link)
        if not peer.links:
            self.peer_down(peer)

    def peer_down(self, peer: Peer) -> None:
        for link in list(peer.links):
            link.transport.abortConnection()
        peer.links.clear()
        peer.serving = False
        peer.ready_count = 0
        if self.events is not None:
            self.events.peer_down(peer)
        if not peer.down_logged:
            peer.down_logged = True
            self.log.warn("peer {peer} is down", peer=peer.node_id)

    def drop_stale_links(self, peer: Peer, epoch: int) -> None:
        """Close links to an older incarnation of ``peer`` than ``epoch``."""
        for link in list(peer.links):
            if 0 < link.peer_epoch < epoch:
                self.log.warn(
                    "fencing {peer} epoch {old}: epoch {new} took over",
                    peer=peer.node_id, old=link.peer_epoch, new=epoch,
                )
                peer.links.remove(link)
                link.transport.loseConnection()

    def note_serving(self, peer: Peer, epoch: int) -> None:
        """``peer`` announced that it serves as ``epoch``."""
        peer.epoch = max(peer.epoch, epoch)
        peer.serving = True
        peer.last_seen = self.now()
        self.drop_stale_links(peer, epoch)

    def seen(self, peer: Peer, epoch: int, ready_count: int, serving: bool) -> None:
        """A heartbeat (sent or answered) from ``peer``."""
        peer.last_seen = self.now()
        peer.ready_count = ready_count
        peer.serving = serving and epoch >= peer.epoch

    def close_all(self) -> None:
        for peer in self.peers.values():
            for link in list(peer.links):
                link.transport.loseConnection()

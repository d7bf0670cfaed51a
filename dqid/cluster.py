"""The cluster side of a node: links to peers, heartbeats and fencing.
Replication, routing and state transfer are the mixins it is made of
(``replication.py``, ``routing.py``, ``transfer.py``).

Rules (DESIGN.md, "Replication"):

* A push is pending until ``min_copies`` holders (the owner included) have
  it; pushes of one reactor turn go to each peer as one ``Replicate``.
  A push that cannot get its copies in time is withdrawn everywhere with a
  tombstone, so it is never delivered later.
* Replica state only merges (union, tombstone wins), so every transfer is
  safe to repeat or reorder.
* A starting node is not ready and counts as no holder until it has synced
  from enough peers; then it takes an epoch above every one seen for its id,
  announces it, and peers fence any older twin of that id.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import amp_commands as cmd
from .amp_protocol import PeerProtocol, negotiate
from .node import QueueNode
from .options import PeerAddress
from .peers import CALL_TIMEOUT, DEAD_AFTER, HEARTBEAT_INTERVAL, Peer
from .replica import Record, ReplicaStore
from .replication import REPLICATION_TIMEOUT, Replication, _Batch
from .routing import Routing
from .tombstones import Tombstones
from .transfer import ANTI_ENTROPY_INTERVAL, RECOVERY_GRACE, StateTransfer, _SyncSession

__all__ = ["Cluster", "CALL_TIMEOUT", "RECOVERY_GRACE", "REPLICATION_TIMEOUT"]

# A fenced node keeps its links this long to send its last tombstones.
FENCE_LINGER = 0.5


class Cluster(Replication, Routing, StateTransfer):
    log = Logger()

    def __init__(
        self,
        node: QueueNode,
        peers: Sequence[PeerAddress],
        clock: IReactorTime,
        min_copies: int,
        replication_timeout: float = REPLICATION_TIMEOUT,
    ) -> None:
        self.node = node
        self.clock = clock
        self.me = node.node_id
        self.peers = {p.node_id: Peer(p.node_id, p) for p in peers}
        self.members = sorted([self.me, *self.peers])
        self.min_copies = min_copies
        self.replication_timeout = replication_timeout
        nodes = len(self.members)
        # Any N - K + 1 nodes hold at least one copy of every accepted message.
        self.syncs_needed = min(nodes - min_copies + 1, nodes - 1)
        self.store = ReplicaStore()
        self.recovering = True
        self.fenced = False
        self._recovered: dict[str, Record] = {}
        self._batch: _Batch | None = None
        self._forget: Tombstones | None = None
        self._sessions: dict[str, _SyncSession] = {}
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = clock
        self._feeding = False
        self._ack_batches: dict[str, dict[str, list[Deferred]]] = {}
        self._started = clock.seconds()
        self._grace_timer: IDelayedCall | None = None
        self._leave_timer: IDelayedCall | None = None
        node.cluster = self
        node.set_not_ready(self._recovery_reason())

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self._started = self._now()
        self._heartbeat.start(HEARTBEAT_INTERVAL, now=False)
        self._maybe_finish_recovery()

    def stop(self) -> None:
        if self._heartbeat.running:
            self._heartbeat.stop()
        for timer in (self._grace_timer, self._leave_timer):
            if timer is not None and timer.active():
                timer.cancel()
        for session in self._sessions.values():
            if session.timer is not None and session.timer.active():
                session.timer.cancel()
        self._sessions.clear()

    @property
    def serving(self) -> bool:
        return not (self.recovering or self.fenced)

    @property
    def epoch(self) -> int:
        return self.node.epoch if self.serving else 0

    def _now(self) -> float:
        return self.clock.seconds()

    def linked(self) -> list[Peer]:
        """Peers with a hello'd link, answering or not."""
        return [p for p in self.peers.values() if p.links]

    def connected(self) -> list[Peer]:
        now = self._now()
        return [p for p in self.peers.values() if p.is_connected(now)]

    def write_reason(self) -> str | None:
        """Why a push cannot be accepted now, beyond the node's own state."""
        holders = 1 + sum(1 for p in self.connected() if p.serving)
        if holders < self.min_copies:
            return f"only {holders} of {self.min_copies} required copies reachable"
        return None

    def _recovery_reason(self) -> str:
        synced = sum(1 for p in self.peers.values() if p.synced_serving)
        return f"recovering: synced from {synced} of {self.syncs_needed} peers needed"

    def peer_stats(self) -> dict[str, Any]:
        now = self._now()
        return {
            name: peer.stats(now, self.store.held(name))
            for name, peer in sorted(self.peers.items())
        }

    # -- links ---------------------------------------------------------------

    def _call(self, link: PeerProtocol, command: type, timeout: float = CALL_TIMEOUT,
              **arguments: Any) -> Deferred:
        """callRemote with a timeout; the caller adds the errback."""
        d = link.callRemote(command, **arguments)
        d.addTimeout(timeout, self.clock)
        return d

    def say_hello(self, link: PeerProtocol) -> None:
        if self.fenced:
            # A fenced node has nothing to offer; staying away also keeps
            # peers from mistaking it for a recovering replacement.
            link.transport.loseConnection()
            return
        epoch = self.epoch
        d = self._call(
            link, cmd.Hello, version_min=cmd.PROTOCOL_MIN, version_max=cmd.PROTOCOL_MAX,
            node=self.me, epoch=epoch, cluster=self.members,
        )
        d.addCallbacks(self._hello_answered, self._hello_failed,
                       callbackArgs=(link, epoch), errbackArgs=(link,))

    def _hello_answered(self, answer: dict, link: PeerProtocol, sent_epoch: int = 0) -> None:
        if answer["node"] != link.dialled:
            self.log.error(
                "peer at {address} says it is {node}, not {expected}; check --peer",
                address=self.peers[link.dialled].address, node=answer["node"],
                expected=link.dialled,
            )
            link.transport.loseConnection()
            return
        epoch = answer["epoch"]
        if epoch and epoch < self.store.epochs.get(answer["node"], 0):
            # A stale twin answered; its own calls will get it fenced.
            link.transport.loseConnection()
            return
        link.version = answer["version"]
        self._link_up(link, answer["node"], epoch, answer["serving"])
        if self.serving and self.epoch != sent_epoch:
            # Recovery finished while this Hello was in flight, so the
            # Announce of _finish_recovery missed this link: announce now.
            d = self._call(link, cmd.Announce, node=self.me, epoch=self.epoch)
            d.addErrback(self._call_failed, "announce", self.peers[answer["node"]])

    def _hello_failed(self, failure: Failure, link: PeerProtocol) -> None:
        if failure.check(cmd.StaleEpoch):
            self._fence(f"peer {link.dialled} knows a newer epoch of {self.me}")
        else:
            peer = self.peers.get(link.dialled or "")
            if peer is not None and not peer.down_logged:
                peer.down_logged = True
            self.log.warn(
                "hello to {peer} failed: {error}", peer=link.dialled,
                error=failure.getErrorMessage(),
            )
        link.transport.loseConnection()

    def on_hello(self, link: PeerProtocol, version_min: int, version_max: int,
                 node: str, epoch: int, cluster: list[str]) -> dict:
        if self.fenced:
            raise cmd.NotHolder("this node is fenced")
        version = negotiate(cmd.PROTOCOL_MIN, cmd.PROTOCOL_MAX, version_min, version_max)
        if version is None:
            self.log.error(
                "refused {node}: it speaks protocol {low}-{high}, we speak {ours}",
                node=node, low=version_min, high=version_max,
                ours=f"{cmd.PROTOCOL_MIN}-{cmd.PROTOCOL_MAX}",
            )
            raise cmd.NoCommonVersion(f"we speak {cmd.PROTOCOL_MIN}-{cmd.PROTOCOL_MAX}")
        if sorted(cluster) != self.members or node not in self.peers:
            self.log.error(
                "refused {node}: its cluster {theirs} is not ours {ours}",
                node=node, theirs=",".join(sorted(cluster)), ours=",".join(self.members),
            )
            raise cmd.ClusterMismatch(f"cluster is {','.join(self.members)}")
        if epoch and epoch < self.store.epochs.get(node, 0):
            raise cmd.StaleEpoch(f"{node} serves with a newer epoch")
        link.version = version
        self._link_up(link, node, epoch, epoch > 0)
        return {"version": version, "node": self.me, "epoch": self.epoch,
                "serving": self.serving}

    def _link_up(self, link: PeerProtocol, node: str, epoch: int, serving: bool) -> None:
        peer = self.peers[node]
        link.peer_id = node
        link.peer_epoch = epoch
        was_connected = bool(peer.links)
        peer.links.append(link)
        peer.last_seen = self._now()
        if epoch:
            self.store.note_epoch(node, epoch)
            peer.epoch = max(peer.epoch, epoch)
            self._drop_stale_links(peer, epoch)
        peer.serving = serving and epoch >= peer.epoch
        if not was_connected:
            self.log.info("peer {peer} connected (epoch {epoch})", peer=node, epoch=epoch)
            peer.down_logged = False
        # After this turn: the Hello answer must reach the peer first.
        self.clock.callLater(0, self._start_sync, peer)

    def link_down(self, link: PeerProtocol) -> None:
        peer = self.peers.get(link.peer_id or "")
        if peer is None or link not in peer.links:
            return
        peer.links.remove(link)
        if not peer.links:
            self._peer_down(peer)

    def _peer_down(self, peer: Peer) -> None:
        for link in list(peer.links):
            link.transport.abortConnection()
        peer.links.clear()
        self.drop_backlog(peer)
        peer.serving = False
        peer.synced = peer.synced_serving = False
        peer.ready = 0
        if not peer.down_logged:
            peer.down_logged = True
            self.log.warn("peer {peer} is down", peer=peer.node_id)

    def _drop_stale_links(self, peer: Peer, epoch: int) -> None:
        for link in list(peer.links):
            if 0 < link.peer_epoch < epoch:
                self.log.warn(
                    "fencing {peer} epoch {old}: epoch {new} took over",
                    peer=peer.node_id, old=link.peer_epoch, new=epoch,
                )
                peer.links.remove(link)
                link.transport.loseConnection()

    def _check_epoch(self, link: PeerProtocol, epoch: int) -> None:
        """Refuse a caller whose epoch is older than one we know."""
        node = link.peer_id or ""
        if epoch and epoch < self.store.epochs.get(node, 0):
            raise cmd.StaleEpoch(f"{node} serves with a newer epoch")

    def on_announce(self, link: PeerProtocol, node: str, epoch: int) -> None:
        if node != link.peer_id:
            raise cmd.NotHolder("announce your own epoch only")
        self._check_epoch(link, epoch)
        peer = self.peers[node]
        link.peer_epoch = epoch
        self.store.note_epoch(node, epoch)
        peer.epoch = max(peer.epoch, epoch)
        peer.serving = True
        peer.last_seen = self._now()
        self._drop_stale_links(peer, epoch)
        self.log.info("peer {peer} serves as epoch {epoch}", peer=node, epoch=epoch)

    def _fence(self, why: str) -> None:
        if self.fenced:
            return
        self.fenced = True
        self.node.fence(f"fenced: {why}")
        self.log.error("this node is fenced and serves nothing: {why}", why=why)
        # Leave once the tombstones of pushes refused on the way here are out.
        self._leave_timer = self.clock.callLater(FENCE_LINGER, self._leave)

    def _leave(self) -> None:
        self._flush_forget()
        for peer in self.peers.values():
            for link in list(peer.links):
                link.transport.loseConnection()

    # -- heartbeats ----------------------------------------------------------

    def _beat(self) -> None:
        now = self._now()
        for peer in self.peers.values():
            link = peer.link()
            if link is None:
                continue
            if now - peer.last_seen > DEAD_AFTER:
                self._peer_down(peer)
                continue
            if peer.synced and now - peer.synced_at > ANTI_ENTROPY_INTERVAL:
                self._start_sync(peer, again=True)
            d = self._call(
                link, cmd.Heartbeat, timeout=DEAD_AFTER, node=self.me,
                epoch=self.epoch, ready=self.node.queue.ready, serving=self.serving,
            )
            d.addCallbacks(self._heartbeat_answered, self._call_failed,
                           callbackArgs=(peer, link), errbackArgs=("heartbeat", peer))

    def _heartbeat_answered(self, answer: dict, peer: Peer, link: PeerProtocol) -> None:
        self._seen(peer, answer["epoch"], answer["ready"], answer["serving"])

    def on_heartbeat(self, link: PeerProtocol, epoch: int, ready: int, serving: bool) -> dict:
        self._check_epoch(link, epoch)
        self._seen(self.peers[link.peer_id or ""], epoch, ready, serving)
        return {"epoch": self.epoch, "ready": self.node.queue.ready, "serving": self.serving}

    def _seen(self, peer: Peer, epoch: int, ready: int, serving: bool) -> None:
        peer.last_seen = self._now()
        peer.ready = ready
        peer.serving = serving and epoch >= peer.epoch
        if ready > 0:
            self.feed_waiters()

    def _call_failed(self, failure: Failure, what: str, peer: Peer | None = None) -> None:
        if failure.check(cmd.StaleEpoch):
            self._fence(f"{peer.node_id if peer else 'a peer'} knows a newer epoch")
            return
        self.log.debug("{what} to {peer} failed: {error}", what=what,
                       peer=peer.node_id if peer else "?", error=failure.getErrorMessage())

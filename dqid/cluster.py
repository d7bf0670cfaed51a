"""The cluster side of a node: the composition root of its parts.

Rules (DESIGN.md, "Replication"):

* A push is pending until ``min_copies`` holders (the owner included) have
  it; what a reactor turn changed (pushes, states, tombstones) goes to
  each peer as one unanswered ``Stream`` box, acknowledged with ``Copied``.
  A push that cannot get its copies in time is withdrawn everywhere with a
  tombstone, so it is never delivered later (:mod:`dqid.replicator`).
* Replica state only merges (union, tombstone wins), so every transfer is
  safe to repeat or reorder (:mod:`dqid.holdings`, :mod:`dqid.transfer`).
* A starting node is not ready and counts as no holder until it has synced
  from enough peers; then it takes an epoch above every one seen for its id,
  announces it, and peers fence any older twin of that id.

The parts, each owning its state: :class:`~dqid.links.Links` (link table,
calls), :class:`~dqid.holdings.Holdings` (replicas and merge rules),
:class:`~dqid.replicator.Replicator` (copies and tombstones out),
:class:`~dqid.router.Router` (requests for other owners' messages) and
:class:`~dqid.transfer.StateTransfer` (syncs and recovery).  This module
says hello, beats the heartbeat, fences, and wires the parts to the node
(as its :class:`~dqid.node.Remote`) and to the AMP protocol (as its
:class:`~dqid.amp_protocol.Handlers`).
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import __version__
from . import amp_commands as cmd
from .cluster_view import ClusterView
from .holdings import Holdings
from .ids import MessageId
from .links import Links
from .node import LeaseChange, QueueNode
from .options import PeerAddress
from .peers import Link, Peer
from .queue import Message
from .readiness import Phase
from .replica import Record
from .replicator import Replicator
from .router import Router
from .timings import DEFAULT_TIMINGS, Timings
from .tombstones import Tombstones
from .transfer import StateTransfer


class Cluster:
    log = Logger()

    def __init__(self, node: QueueNode, peers: Sequence[PeerAddress], clock: IReactorTime,
                 min_copies: int, timings: Timings = DEFAULT_TIMINGS) -> None:
        self.node = node
        self.clock = clock
        self.timings = timings
        self.me = node.node_id
        self.min_copies = min_copies
        self.links = Links(self.me, peers, clock, timings)
        self.holdings = Holdings(node, clock)
        self.replicator = Replicator(
            self.links, self.holdings, node.readiness, lambda: node.epoch, clock, timings,
            min_copies, self._call_failed, self._work_arrived)
        self.router = Router(node, self.links, self.holdings, self.replicator, clock,
                             timings, self._call_failed)
        self.transfer = StateTransfer(node, self.links, self.holdings, clock, timings,
                                      min_copies, self._fence, self._announce)
        self.view = ClusterView(self.me, node.stats, self.links, timings.cluster_stats_timeout)
        self._software: dict[str, str | None] = {}  # each peer's dqid release, as logged
        self.links.events = self
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = clock
        self._leave_timer: IDelayedCall | None = None
        node.attach(self)
        node.readiness.set(Phase.RECOVERING, self.transfer.recovery_reason())
        node.readiness.holders_check = self.replicator.holders_reason

    @property
    def peers(self) -> dict[str, Peer]:
        return self.links.peers

    @property
    def store(self):  # noqa: ANN201 - the ReplicaStore, for tests and stats
        return self.holdings.store

    @property
    def serving(self) -> bool:
        return self.node.readiness.serving

    @property
    def epoch(self) -> int:
        """The epoch this node serves with; 0 while it has none."""
        return self.node.epoch if self.serving else 0

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self._heartbeat.start(self.timings.heartbeat_interval, now=False)
        self.transfer.start()

    def stop(self) -> None:
        if self._heartbeat.running:
            self._heartbeat.stop()
        if self._leave_timer is not None and self._leave_timer.active():
            self._leave_timer.cancel()
        self.transfer.stop()

    # -- the node's Remote ---------------------------------------------------

    def replicate(self, messages: Sequence[Message]) -> Deferred:
        return self.replicator.replicate(messages)

    async def confirm_key(self, key: str, digest: bytes, first: str) -> str | None:
        return await self.router.confirm_key(key, digest, first)

    def find_key(self, key: str, digest: bytes) -> Deferred:
        return self.router.find_key(key, digest)

    async def take(self, count: int, visibility: float) -> list[Record]:
        return await self.router.take(count, visibility)

    def ack(self, message_id: str, mid: MessageId) -> Deferred:
        return self.router.ack(message_id, mid)

    def ack_many(self, acks: Sequence[tuple[str, MessageId]]) -> Deferred:
        return self.router.ack_many(acks)

    async def lease(self, message_id: str, mid: MessageId, change: LeaseChange) -> None:
        await self.router.lease(message_id, mid, change)

    def tombstone(self, message_id: str) -> Deferred | None:
        return self.replicator.tombstone(message_id)

    def tombstone_many(self, message_ids: Sequence[str]) -> Deferred | None:
        return self.replicator.tombstone_many(message_ids)

    def states_changed(self, messages: list[Message]) -> None:
        self.replicator.states_changed(messages)

    async def peek(self, message_id: str, mid: MessageId) -> tuple[Record, str]:
        return await self.router.peek(message_id, mid)

    async def held(self, count: int) -> list[Record]:
        return await self.router.held(count)

    def stats(self) -> dict[str, Any]:
        peers = self.links.stats()
        for name, peer in self.links.peers.items():
            peers[name]["held"] = self.holdings.held(name)
            peers[name]["synced"] = self.transfer.synced(peer)
        return {"min_copies": self.min_copies, "peers": peers}

    # -- LinkEvents ----------------------------------------------------------

    def peer_up(self, peer: Peer) -> None:
        self.replicator.peer_up(peer)
        self.transfer.start_sync(peer)

    def peer_down(self, peer: Peer) -> None:
        self.replicator.peer_down(peer)
        self.transfer.peer_down(peer)
        self.router.peer_down(peer)

    def _work_arrived(self) -> None:
        self.router.feed_long_polls()

    # -- hello ---------------------------------------------------------------

    def say_hello(self, link: Link) -> None:
        if self.node.readiness.fenced:
            # A fenced node has nothing to offer; staying away also keeps
            # peers from mistaking it for a recovering replacement.
            link.transport.loseConnection()
            return
        epoch = self.epoch
        d = self.links.call(
            link, cmd.Hello, version_min=cmd.PROTOCOL_MIN, version_max=cmd.PROTOCOL_MAX,
            node=self.me, epoch=epoch, cluster=self.links.members, software=__version__,
        )
        d.addCallbacks(self._hello_answered, self._hello_failed,
                       callbackArgs=(link, epoch), errbackArgs=(link,))

    def _hello_answered(self, answer: dict, link: Link, sent_epoch: int = 0) -> None:
        if answer["node"] != link.dialled:
            self.log.error(
                "peer at {address} says it is {node}, not {expected}; check --peer",
                address=self.peers[link.dialled or ""].address, node=answer["node"],
                expected=link.dialled,
            )
            link.transport.loseConnection()
            return
        epoch = answer["epoch"]
        if epoch and epoch < self.holdings.known_epoch(answer["node"]):
            # A stale twin answered; its own calls will get it fenced.
            link.transport.loseConnection()
            return
        link.version = answer["version"]
        self._note_software(answer["node"], answer.get("software"), link.version)
        self._link_up(link, answer["node"], epoch, answer["serving"])
        if self.serving and self.epoch != sent_epoch:
            # Recovery finished while this Hello was in flight, so the
            # Announce at the end of recovery missed this link: announce now.
            d = self.links.call(link, cmd.Announce, node=self.me, epoch=self.epoch)
            d.addErrback(self._call_failed, "announce", self.peers[answer["node"]])

    def _hello_failed(self, failure: Failure, link: Link) -> None:
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

    def on_hello(self, link: Link, version_min: int, version_max: int,
                 node: str, epoch: int, cluster: list[str]) -> dict:
        if self.node.readiness.fenced:
            raise cmd.NotHolder("this node is fenced")
        version = cmd.negotiate(cmd.PROTOCOL_MIN, cmd.PROTOCOL_MAX, version_min, version_max)
        if version is None:
            self.log.error(
                "refused {node}: it speaks protocol {low}-{high}, we speak {ours}",
                node=node, low=version_min, high=version_max,
                ours=f"{cmd.PROTOCOL_MIN}-{cmd.PROTOCOL_MAX}",
            )
            raise cmd.NoCommonVersion(f"we speak {cmd.PROTOCOL_MIN}-{cmd.PROTOCOL_MAX}")
        if sorted(cluster) != self.links.members or node not in self.peers:
            self.log.error(
                "refused {node}: its cluster {theirs} is not ours {ours}",
                node=node, theirs=",".join(sorted(cluster)),
                ours=",".join(self.links.members),
            )
            raise cmd.ClusterMismatch(f"cluster is {','.join(self.links.members)}")
        self.holdings.check_epoch(node, epoch)
        link.version = version
        self._note_software(node, getattr(link, "software", None), version)
        self._link_up(link, node, epoch, epoch > 0)
        return {"version": version, "node": self.me, "epoch": self.epoch,
                "serving": self.serving, "software": __version__}

    def _note_software(self, node: str, software: str | None, protocol: int) -> None:
        """Log the dqid release a peer runs, when first heard or changed."""
        if node in self._software and self._software[node] == software:
            return
        self._software[node] = software
        self.log.info("peer {peer} runs dqid {software} (protocol {protocol})",
                      peer=node, software=software or "(not said)", protocol=protocol)

    def _link_up(self, link: Link, node: str, epoch: int, serving: bool) -> None:
        if epoch:
            self.holdings.note_epoch(node, epoch)
        self.links.link_up(link, node, epoch, serving)

    def link_down(self, link: Link) -> None:
        self.replicator.link_lost(link)
        self.links.link_down(link)

    def _check_caller(self, link: Link, epoch: int) -> None:
        """Refuse a caller whose epoch is older than one we know."""
        self.holdings.check_epoch(link.peer_id or "", epoch)

    def on_announce(self, link: Link, node: str, epoch: int) -> None:
        if node != link.peer_id:
            raise cmd.NotHolder("announce your own epoch only")
        self._check_caller(link, epoch)
        link.peer_epoch = epoch
        self.holdings.note_epoch(node, epoch)
        self.links.note_serving(self.peers[node], epoch)
        self.log.info("peer {peer} serves as epoch {epoch}", peer=node, epoch=epoch)

    def _announce(self, epoch: int) -> None:
        """Recovery ended: tell every linked peer the epoch we serve with."""
        for peer in self.peers.values():
            for link in list(peer.links):
                d = self.links.call(link, cmd.Announce, node=self.me, epoch=epoch)
                d.addErrback(self._call_failed, "announce", peer)

    # -- fencing -------------------------------------------------------------

    def _fence(self, why: str) -> None:
        readiness = self.node.readiness
        if readiness.fenced:
            return
        readiness.set(Phase.FENCED, f"fenced: {why}")
        self.node.fence()
        self.log.error("this node is fenced and serves nothing: {why}", why=why)
        # Leave once the tombstones of pushes refused on the way here are out.
        self._leave_timer = self.clock.callLater(self.timings.fence_linger, self._leave)

    def _leave(self) -> None:
        self.replicator.flush()
        self.links.close_all()

    # -- heartbeats ----------------------------------------------------------

    def _beat(self) -> None:
        self.holdings.store.unpack_sparse_runs()
        now = self.links.now()
        for peer in self.peers.values():
            link = peer.link()
            if link is None:
                continue
            if now - peer.last_seen > self.timings.dead_after:
                self.links.peer_down(peer)
                continue
            self.transfer.sync_if_due(peer)
            d = self.links.call(
                link, cmd.Heartbeat, timeout=self.timings.dead_after, node=self.me,
                epoch=self.epoch, ready=self.node.queue.ready, serving=self.serving,
            )
            d.addCallbacks(self._heartbeat_answered, self._call_failed,
                           callbackArgs=(peer,), errbackArgs=("heartbeat", peer))

    def _heartbeat_answered(self, answer: dict, peer: Peer) -> None:
        self._seen(peer, answer["epoch"], answer["ready"], answer["serving"])

    def on_heartbeat(self, link: Link, epoch: int, ready: int, serving: bool) -> dict:
        self._check_caller(link, epoch)
        self._seen(self.peers[link.peer_id or ""], epoch, ready, serving)
        return {"epoch": self.epoch, "ready": self.node.queue.ready, "serving": self.serving}

    def _seen(self, peer: Peer, epoch: int, ready_count: int, serving: bool) -> None:
        self.links.seen(peer, epoch, ready_count, serving)
        if ready_count > 0:
            self.router.feed_long_polls()

    def _call_failed(self, failure: Failure, what: str, peer: Peer | None = None) -> None:
        if failure.check(cmd.StaleEpoch):
            self._fence(f"{peer.node_id if peer else 'a peer'} knows a newer epoch")
            return
        self.log.debug("{what} to {peer} failed: {error}", what=what,
                       peer=peer.node_id if peer else "?", error=failure.getErrorMessage())

    # -- the rest of the AMP Handlers ---------------------------------------

    def on_stream(self, link: Link, epoch: int, seq: int | None, records: bytes | None,
                  run: bytes | None, states: bytes | None, tombstones: bytes | None) -> None:
        self.replicator.on_stream(link, epoch, seq, records, run, states, tombstones)

    def on_copied(self, link: Link, upto: int, holder: bool, refused: str | None) -> None:
        self.replicator.on_copied(link, upto, holder, refused)

    def on_ack(self, ids: list[str]) -> Deferred:
        return self.router.on_ack(ids)

    def on_lease(self, message_id: str, change: LeaseChange) -> str:
        return self.router.on_lease(message_id, change)

    def on_peek(self, message_id: str) -> dict:
        return self.router.on_peek(message_id)

    def on_held_list(self, count: int) -> bytes:
        return self.router.on_held_list(count)

    def on_key_lookup(self, asker: str, key: str, digest: bytes) -> Deferred:
        return self.router.on_key_lookup(asker, key, digest)

    def on_take(self, count: int, visibility: float) -> dict:
        return self.router.on_take(count, visibility)

    def on_sync_start(self, seen: Tombstones | None) -> dict:
        return self.transfer.on_sync_start(seen)

    def on_sync_page(self, token: str) -> dict:
        return self.transfer.on_sync_page(token)

    def on_node_stats(self) -> bytes:
        return self.view.on_node_stats()

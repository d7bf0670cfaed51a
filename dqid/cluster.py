"""The cluster side of a node: links, replication, acks and gets anywhere,
state transfer and recovery.

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

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import amp_commands as cmd
from .amp_protocol import PeerProtocol, negotiate
from .idempotency import IdempotencyConflict, body_digest
from .ids import MessageId, parse_id
from .node import NotReady, NotReplicated, QueueNode
from .options import PeerAddress
from .peers import DEAD_AFTER, HEARTBEAT_INTERVAL, Peer
from .queue import PENDING, Message, NotLeased, UnknownMessage
from .replica import Record, ReplicaStore, matching_ids
from .tombstones import Tombstones
from .wire import decode_records, decode_tombstones, encode_records, encode_tombstones

CALL_TIMEOUT = 5.0
REPLICATION_TIMEOUT = 5.0
SYNC_PAGE_BYTES = 1 << 20
SYNC_PAGE_RECORDS = 2000
SYNC_SESSION_IDLE = 60.0
RESYNC_DELAY = 1.0
# A fenced node keeps its links this long to send its last tombstones.
FENCE_LINGER = 0.5
# A recovering node waits up to this long for every peer to sync.
RECOVERY_GRACE = 2.0


@dataclass(eq=False)
class _Batch:
    """The pushes of one reactor turn, replicated together."""

    messages: list[Message] = field(default_factory=list)
    waiters: list[Deferred] = field(default_factory=list)
    copies: int = 1
    targets: int = 0
    answered: int = 0
    done: bool = False
    timer: IDelayedCall | None = None


@dataclass(eq=False)
class _SyncSession:
    records: Iterator[Any]
    timer: IDelayedCall | None = None


class Cluster:
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

    # -- replication of pushes (group commit) --------------------------------

    def replicate(self, messages: Sequence[Message]) -> Deferred:
        """Fires once ``min_copies`` nodes hold ``messages``."""
        if not self.serving:
            raise NotReady(self.node.not_ready_reason or "not serving")
        batch = self._batch
        if batch is None:
            batch = self._batch = _Batch()
            self.clock.callLater(0, self._flush_batch)
        batch.messages.extend(messages)
        if self.min_copies <= 1:
            return succeed(None)
        waiter: Deferred = Deferred()
        batch.waiters.append(waiter)
        return waiter

    def _flush_batch(self) -> None:
        batch, self._batch = self._batch, None
        if batch is None or not batch.messages:
            return
        holders = self.connected()
        counting = sum(1 for p in holders if p.serving)
        if self.min_copies > 1 and counting + 1 < self.min_copies:
            self._fail_batch(
                batch, f"only {counting + 1} of {self.min_copies} required copies reachable"
            )
            return
        payload = encode_records(batch.messages)
        batch.targets = len(holders)
        for peer in holders:
            link = peer.link()
            assert link is not None
            d = self._call(link, cmd.Replicate, timeout=self.replication_timeout,
                           owner=self.me, epoch=self.node.epoch, records=payload)
            d.addCallbacks(self._replicated, self._replicate_failed,
                           callbackArgs=(batch, peer), errbackArgs=(batch, peer))
        if self.min_copies <= 1:
            batch.done = True
            return
        batch.timer = self.clock.callLater(self.replication_timeout, self._fail_batch,
                                           batch, "replication timed out")

    def _replicated(self, answer: dict, batch: _Batch, peer: Peer) -> None:
        peer.last_seen = self._now()
        batch.answered += 1
        if answer["held"]:
            batch.copies += 1
        self._settle_batch(batch)

    def _replicate_failed(self, failure: Failure, batch: _Batch, peer: Peer) -> None:
        self._call_failed(failure, "replicate", peer)
        batch.answered += 1
        self._settle_batch(batch)

    def _settle_batch(self, batch: _Batch) -> None:
        if batch.done:
            return
        if batch.copies >= self.min_copies:
            batch.done = True
            if batch.timer is not None and batch.timer.active():
                batch.timer.cancel()
            for waiter in batch.waiters:
                waiter.callback(None)
        elif batch.answered >= batch.targets:
            self._fail_batch(
                batch, f"{batch.copies} of {self.min_copies} required copies made"
            )

    def _fail_batch(self, batch: _Batch, why: str) -> None:
        if batch.done:
            return
        batch.done = True
        if batch.timer is not None and batch.timer.active():
            batch.timer.cancel()
        self.log.warn("{count} push(es) not replicated: {why}", count=len(batch.messages),
                      why=why)
        for message in batch.messages:
            self._tombstone(message.id)
        for waiter in batch.waiters:
            waiter.errback(NotReplicated(why))

    def on_replicate(self, link: PeerProtocol, owner: str, epoch: int, records: bytes) -> bool:
        if owner != link.peer_id:
            raise cmd.NotHolder("replicate your own messages only")
        self._check_epoch(link, epoch)
        self.store.note_epoch(owner, epoch)
        peer = self.peers[owner]
        peer.last_seen = self._now()
        added = self._merge_records(decode_records(records))
        if added:
            peer.ready += added
            self.clock.callLater(0, self.feed_waiters)
        return self.serving

    # -- tombstones ----------------------------------------------------------

    def _tombstone(self, message_id: str) -> None:
        """Write one tombstone here and send it to every peer."""
        mid = parse_id(message_id)
        record = self.store.tombstone(message_id)
        self._released(record)
        self._recovered.pop(message_id, None)
        if self._forget is None:
            self._forget = Tombstones()
            self.clock.callLater(0, self._flush_forget)
        self._forget.add(mid.node, mid.epoch, mid.seq)

    def _flush_forget(self) -> None:
        tombstones, self._forget = self._forget, None
        if tombstones is None:
            return
        payload = encode_tombstones(tombstones)
        for peer in self.connected():
            link = peer.link()
            assert link is not None
            d = self._call(link, cmd.Forget, tombstones=payload)
            d.addErrback(self._call_failed, "forget", peer)

    def on_forget(self, payload: bytes) -> None:
        self._merge_tombstones(decode_tombstones(payload))

    def _merge_tombstones(self, tombstones: Tombstones) -> None:
        for record in self.store.merge_tombstones(tombstones):
            self._released(record)
        for message_id in [i for i in self._recovered if self.store.is_tombstoned(i)]:
            del self._recovered[message_id]
        self._apply_own_tombstones(tombstones)

    def _apply_own_tombstones(self, tombstones: Tombstones) -> None:
        """Acks written elsewhere for messages in our own queue."""
        queue = self.node.queue
        if not queue.depth:
            return
        for (owner, epoch), ranges in tombstones.items():
            if owner != self.me:
                continue
            for message_id in matching_ids(queue, owner, epoch, ranges):
                message = queue.get(message_id)
                if message is not None and message.state != PENDING:
                    self.node.forget_acked(message_id)

    def _released(self, record: Record | None) -> None:
        if record is not None and record.key is not None:
            self.node.idempotency.released(record.key, self._now())

    def own_acked(self, message: Message) -> None:
        self._tombstone(message.id)

    # -- acks anywhere -------------------------------------------------------

    async def ack_elsewhere(self, message_id: str, mid: MessageId) -> None:
        """Ack a message this node's queue does not hold."""
        if mid.node == self.me:
            if message_id in self._recovered:
                self._tombstone(message_id)
                return
            raise UnknownMessage(message_id)
        owner = self.peers.get(mid.node)
        if owner is None or self.store.is_tombstoned(message_id):
            raise UnknownMessage(message_id)
        link = owner.link()
        if link is not None and owner.serving and owner.is_connected(self._now()):
            try:
                answer = await self._call(link, cmd.Ack, ids=[message_id])
            except Exception as error:  # the owner is unreachable: tombstone here
                self.log.debug("ack forward to {peer} failed: {error}",
                               peer=mid.node, error=error)
            else:
                if message_id in answer["acked"]:
                    self._released(self.store.tombstone(message_id))
                    return
        if self.store.get(message_id) is None:
            raise UnknownMessage(message_id)
        self._tombstone(message_id)

    async def lease_elsewhere(self, message_id: str, mid: MessageId,
                              visibility: float) -> None:
        """Nack (``visibility`` 0) or touch a message owned by a peer."""
        owner = self.peers.get(mid.node)
        if owner is None or self.store.is_tombstoned(message_id):
            raise UnknownMessage(message_id)
        link = owner.link()
        if link is None or not owner.serving or not owner.is_connected(self._now()):
            raise NotReady(f"the owner of {message_id} ({mid.node}) is unreachable")
        try:
            answer = await self._call(link, cmd.Lease, id=message_id,
                                      visibility=float(visibility))
        except Exception as error:
            raise NotReady(f"the owner of {message_id} did not answer: {error}") from None
        if answer["outcome"] == "unknown":
            raise UnknownMessage(message_id)
        if answer["outcome"] == "not_leased":
            raise NotLeased(message_id)

    def on_lease(self, message_id: str, visibility: float) -> str:
        if not self.serving:
            raise cmd.NotHolder(self.node.not_ready_reason or "not serving")
        try:
            self.node.change_own_lease(message_id, visibility)
        except UnknownMessage:
            return "unknown"
        except NotLeased:
            return "not_leased"
        return "ok"

    # -- idempotency keys anywhere ------------------------------------------

    async def confirm_key(self, key: str, digest: bytes, first: str) -> str | None:
        """Ask the owner of ``first`` whether it accepted a push under
        ``key``; its id, or None.  NotReady when the owner is unreachable:
        answering from a replica could confirm a push that is withdrawn."""
        owner = self.peers.get(parse_id(first).node)
        link = owner.link() if owner is not None else None
        if owner is None or link is None or not owner.serving \
                or not owner.is_connected(self._now()):
            raise NotReady(
                f"the node that took the first push with this key ({parse_id(first).node}) "
                "is unreachable"
            )
        try:
            answer = await self._call(link, cmd.KeyLookup, timeout=self.replication_timeout
                                      + CALL_TIMEOUT, key=key, digest=digest)
        except cmd.KeyConflict:
            raise IdempotencyConflict(key, first) from None
        except Exception as error:
            raise NotReady(f"the node that took the first push with this key did not "
                           f"answer: {error}") from None
        return answer["id"] or None

    def on_key_lookup(self, key: str, digest: bytes) -> Deferred:
        if not self.serving:
            raise cmd.NotHolder(self.node.not_ready_reason or "not serving")
        def conflict(failure: Failure) -> None:
            failure.trap(IdempotencyConflict)
            raise cmd.KeyConflict(key)

        d = Deferred.fromCoroutine(self.node.own_key(key, digest))
        d.addCallbacks(lambda first: {"id": first or ""}, conflict)
        return d

    def on_ack(self, ids: list[str]) -> tuple[list[str], list[str]]:
        if not self.serving:
            raise cmd.NotHolder(self.node.not_ready_reason or "not serving")
        acked, unknown = [], []
        for message_id in ids:
            try:
                self.node.ack_own(message_id)
            except (UnknownMessage, ValueError):
                unknown.append(message_id)
            else:
                acked.append(message_id)
        return acked, unknown

    # -- gets anywhere -------------------------------------------------------

    def _ready_peers(self) -> list[Peer]:
        peers = [p for p in self.connected() if p.serving]
        peers.sort(key=lambda p: -p.ready)
        return peers

    async def take_remote(self, count: int, visibility: float) -> list[Record]:
        """Lease up to ``count`` messages from a peer with ready work."""
        for peer in self._ready_peers():
            records = await self._take_from(peer, count, visibility)
            if records:
                return records
        return []

    async def _take_from(self, peer: Peer, count: int, visibility: float) -> list[Record]:
        link = peer.link()
        if link is None:
            return []
        try:
            # amp.Float refuses an int ("Bad float value"): coerce here.
            answer = await self._call(link, cmd.Take, count=count,
                                      visibility=float(visibility))
        except Exception as error:
            self.log.debug("take from {peer} failed: {error}", peer=peer.node_id, error=error)
            return []
        records = decode_records(answer["records"])
        peer.ready = max(0, peer.ready - len(records)) if records else 0
        return records

    def on_take(self, count: int, visibility: float) -> bytes:
        if not self.serving:
            raise cmd.NotHolder(self.node.not_ready_reason or "not serving")
        return encode_records(self.node.take_own(count, visibility))

    def feed_waiters(self) -> None:
        """Serve parked long polls from peers that have ready work."""
        if self._feeding or not self.node.has_waiters():
            return
        candidates = [p for p in self._ready_peers() if p.ready > 0]
        if not candidates:
            return
        self._feeding = True
        d = Deferred.fromCoroutine(self._feed(candidates))
        d.addErrback(lambda f: self.log.failure("feeding long polls failed", f))

    async def _feed(self, candidates: list[Peer]) -> None:
        try:
            for peer in candidates:
                while peer.ready > 0:
                    waiter = self.node.claim_waiter()
                    if waiter is None:
                        return
                    records = await self._take_from(peer, waiter.count, waiter.visibility)
                    if not self.node.answer_waiter(waiter, records):
                        break
        finally:
            self._feeding = False

    # -- state transfer (sync) -----------------------------------------------

    def _start_sync(self, peer: Peer) -> None:
        if peer.synced or peer.syncing or not peer.links:
            return
        peer.syncing = True
        d = Deferred.fromCoroutine(self._sync_from(peer))
        d.addErrback(lambda f: self.log.failure("sync from {peer} failed", f,
                                                peer=peer.node_id))

    async def _sync_from(self, peer: Peer) -> None:
        try:
            link = peer.link()
            if link is None:
                return
            serving = peer.serving
            start = await self._call(link, cmd.SyncStart)
            self._merge_tombstones(decode_tombstones(start["tombstones"]))
            self._merge_epochs(json.loads(start["epochs"]))
            more, count = True, 0
            while more:
                page = await self._call(link, cmd.SyncPage, token=start["token"])
                records = decode_records(page["records"])
                count += len(records)
                self._merge_records(records)
                more = page["more"]
        except Exception as error:
            self.log.warn("sync from {peer} failed ({error}); retrying",
                          peer=peer.node_id, error=error)
            peer.syncing = False
            self.clock.callLater(RESYNC_DELAY, self._start_sync, peer)
            return
        peer.syncing = False
        if not peer.links:
            return
        peer.synced = True
        peer.synced_serving = serving
        self.log.info("synced {count} records from {peer}", count=count, peer=peer.node_id)
        self._maybe_finish_recovery()

    def _merge_epochs(self, epochs: dict[str, int]) -> None:
        for owner, epoch in epochs.items():
            if owner == self.me and self.serving and epoch > self.node.epoch:
                self._fence(f"epoch {epoch} of {self.me} exists")
            # Our own too: recovery must pick an epoch above every one seen.
            self.store.note_epoch(owner, int(epoch))

    def _merge_records(self, records: Iterable[Record]) -> int:
        """Union ``records`` in; how many were new."""
        added = 0
        for record in records:
            mid = parse_id(record.id)
            if mid.node != self.me:
                if self.store.add(record):
                    added += 1
                    self._remember_key(record)
                continue
            if self.store.is_tombstoned(record.id):
                continue
            if self.recovering:
                self._recovered.setdefault(record.id, record)
            elif mid.epoch < self.node.epoch and record.id not in self.node.queue:
                # Our own message from before a restart, reaching us late.
                self.node.restore([record])
        return added

    def _remember_key(self, record: Record) -> None:
        if record.key is not None:
            self.node.idempotency.remember(record.key, body_digest(record.body), record.id)

    def on_sync_start(self) -> dict:
        token = uuid.uuid4().hex
        own = [m for m in self.node.queue.messages() if m.state != PENDING]
        snapshot = [*own, *self._recovered.values(), *self.store.records()]
        epochs = dict(self.store.epochs)
        if self.serving:
            epochs[self.me] = self.node.epoch
        session = _SyncSession(iter(snapshot))
        self._sessions[token] = session
        self._touch_session(token, session)
        return {
            "token": token,
            "tombstones": encode_tombstones(self.store.tombstones),
            "epochs": json.dumps(epochs).encode("utf-8"),
            "total": len(snapshot),
        }

    def on_sync_page(self, token: str) -> dict:
        session = self._sessions.get(token)
        if session is None:
            raise cmd.UnknownSync(token)
        page: list[Any] = []
        size = 0
        for message in session.records:
            page.append(message)
            size += len(message.body) + 64
            if size >= SYNC_PAGE_BYTES or len(page) >= SYNC_PAGE_RECORDS:
                break
        more = bool(page) and (size >= SYNC_PAGE_BYTES or len(page) >= SYNC_PAGE_RECORDS)
        if more:
            self._touch_session(token, session)
        else:
            self._end_session(token)
        return {"records": encode_records(page), "more": more}

    def _touch_session(self, token: str, session: _SyncSession) -> None:
        if session.timer is not None and session.timer.active():
            session.timer.cancel()
        session.timer = self.clock.callLater(SYNC_SESSION_IDLE, self._end_session, token)

    def _end_session(self, token: str) -> None:
        session = self._sessions.pop(token, None)
        if session is not None and session.timer is not None and session.timer.active():
            session.timer.cancel()

    # -- recovery ------------------------------------------------------------

    def _maybe_finish_recovery(self) -> None:
        """Serve once enough peers are synced.

        ``syncs_needed`` serving peers have seen every accepted message, but
        a withdrawn push's tombstone may be missing on one of them; so,
        within ``RECOVERY_GRACE`` of start, also wait for every peer that is
        up, whose tombstones then win.
        """
        if not self.recovering:
            return
        serving_synced = sum(1 for p in self.peers.values() if p.synced_serving)
        all_synced = all(p.synced for p in self.peers.values())
        if not all_synced and serving_synced < self.syncs_needed:
            self.node.set_not_ready(self._recovery_reason())
            return
        waited = self._now() - self._started
        if not all_synced and waited < RECOVERY_GRACE:
            self.node.set_not_ready(
                self._recovery_reason() + "; waiting briefly for the other peers"
            )
            if self._grace_timer is None or not self._grace_timer.active():
                self._grace_timer = self.clock.callLater(
                    RECOVERY_GRACE - waited, self._maybe_finish_recovery
                )
            return
        self._finish_recovery()

    def _finish_recovery(self) -> None:
        if self._grace_timer is not None and self._grace_timer.active():
            self._grace_timer.cancel()
        known = self.store.epochs.get(self.me, 0)
        epoch = max(known + 1, int(self._now() * 1000))
        self.store.note_epoch(self.me, epoch)
        recovered = sorted(self._recovered.values(), key=lambda r: parse_id(r.id)[1:])
        self._recovered.clear()
        self.recovering = False
        self.node.start_epoch(epoch)
        self.node.restore(recovered)
        self.node.set_not_ready(None)
        self.log.info("recovered {count} messages; serving as epoch {epoch}",
                      count=len(recovered), epoch=epoch)
        for peer in self.peers.values():
            for link in list(peer.links):
                d = self._call(link, cmd.Announce, node=self.me, epoch=epoch)
                d.addErrback(self._call_failed, "announce", peer)

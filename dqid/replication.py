"""Replication of pushes (group commit) and of tombstones.

A push is pending until ``min_copies`` holders (the owner included) have
it; the pushes of one reactor turn go to each peer as one ``Replicate``.
A push that cannot get its copies in time is withdrawn everywhere with a
tombstone, so it is never delivered later.  Tombstones (acks, withdrawn
pushes) travel the same way, batched per turn, as ``Forget``.

A mixin of :class:`dqid.cluster.Cluster`, which holds the state it uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from . import amp_commands as cmd
from .ids import parse_id
from .node import NotReady, NotReplicated
from .peers import Peer
from .queue import PENDING, Message
from .replica import Record, matching_ids
from .tombstones import Tombstones
from .wire import decode_records, decode_tombstones, encode_records, encode_tombstones

if TYPE_CHECKING:
    from .amp_protocol import PeerProtocol

REPLICATION_TIMEOUT = 5.0
# Replicate calls to one peer that may be unanswered at once.
MAX_IN_FLIGHT = 4


@dataclass(eq=False)
class _Batch:
    """The pushes of one reactor turn, replicated together."""

    messages: list[Message] = field(default_factory=list)
    waiters: list[Deferred] = field(default_factory=list)
    copies: int = 1
    targets: int = 0
    answered: int = 0
    done: bool = False
    failed: bool = False
    timer: IDelayedCall | None = None


class Replication:
    """Group-committed replication of pushes and tombstones."""

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
        counting = sum(1 for p in self.connected() if p.serving)
        if self.min_copies > 1 and counting + 1 < self.min_copies:
            self._fail_batch(
                batch, f"only {counting + 1} of {self.min_copies} required copies reachable"
            )
            return
        # Every peer with a link gets the copies, even one whose heartbeat is
        # late: a missed copy is only restored when the link drops.
        holders = self.linked()
        batch.targets = len(holders)
        for peer in holders:
            peer.backlog.append(batch)
            self._send_backlog(peer)
        if self.min_copies <= 1:
            batch.done = True
            return
        batch.timer = self.clock.callLater(self.replication_timeout, self._fail_batch,
                                           batch, "replication timed out")

    def _send_backlog(self, peer: Peer) -> None:
        """Send what waits for ``peer`` as one Replicate, unless
        ``MAX_IN_FLIGHT`` calls to it are unanswered: then it waits, and
        grows, until one is answered (group commit under load)."""
        if peer.in_flight >= MAX_IN_FLIGHT or not peer.backlog:
            return
        batches = [b for b in peer.backlog if not b.failed]
        peer.backlog = []
        link = peer.link()
        if link is None:
            self._count_answers(batches, held=False)
            return
        if not batches:
            return
        payload = encode_records([m for b in batches for m in b.messages])
        peer.in_flight += 1
        d = self._call(link, cmd.Replicate, timeout=self.replication_timeout,
                       owner=self.me, epoch=self.node.epoch, records=payload)
        d.addCallbacks(self._replicated, self._replicate_failed,
                       callbackArgs=(batches, peer), errbackArgs=(batches, peer))

    def _replicated(self, answer: dict, batches: list[_Batch], peer: Peer) -> None:
        peer.in_flight -= 1
        peer.last_seen = self._now()
        self._count_answers(batches, held=answer["held"])
        self._send_backlog(peer)

    def _replicate_failed(self, failure: Failure, batches: list[_Batch], peer: Peer) -> None:
        peer.in_flight -= 1
        self._call_failed(failure, "replicate", peer)
        self._count_answers(batches, held=False)
        self._send_backlog(peer)

    def drop_backlog(self, peer: Peer) -> None:
        """``peer`` is down: what waited for it will not reach it."""
        batches, peer.backlog = peer.backlog, []
        self._count_answers(batches, held=False)

    def _count_answers(self, batches: list[_Batch], held: bool) -> None:
        for batch in batches:
            batch.answered += 1
            if held:
                batch.copies += 1
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
        batch.done = batch.failed = True
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
        # Every peer with a link, even one whose heartbeat is late: a missed
        # tombstone is only restored when the link drops.
        for peer in self.linked():
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


"""Replication of pushes (group commit) and of tombstones.

A push is pending until ``min_copies`` holders (the owner included) have
it; the pushes of one reactor turn go to each peer as one ``Replicate``,
and at most ``MAX_IN_FLIGHT`` of those calls are unanswered per peer (what
waits goes as one call when one is answered).  A push that cannot get its
copies in time is withdrawn everywhere with a tombstone, so it is never
delivered later.  Tombstones (acks, withdrawn pushes) travel the same way,
batched per turn, as ``Tombstones``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import amp_commands as cmd
from .errors import NotReady, NotReplicated
from .holdings import Holdings
from .ids import parse_id
from .links import Links
from .peers import Link, Peer
from .queue import Message
from .readiness import Readiness
from .timings import Timings
from .tombstones import Tombstones
from .wire import (
    decode_records, decode_states, decode_tombstones, encode_records, encode_states,
    encode_tombstones,
)

# Replicate calls to one peer that may be unanswered at once.
MAX_IN_FLIGHT = 4


@dataclass(eq=False)
class Batch:
    """The pushes of one reactor turn, replicated together."""

    messages: list[Message] = field(default_factory=list)
    waiters: list[Deferred] = field(default_factory=list)
    copies: int = 1
    targets: int = 0
    answered: int = 0
    done: bool = False
    failed: bool = False
    timer: IDelayedCall | None = None


@dataclass(eq=False)
class Lane:
    """What goes to one peer: calls unanswered, batches waiting."""

    in_flight: int = 0
    backlog: list[Batch] = field(default_factory=list)


class Replicator:
    log = Logger()

    def __init__(self, links: Links, holdings: Holdings, readiness: Readiness,
                 epoch: Callable[[], int], clock: IReactorTime, timings: Timings,
                 min_copies: int, failed_call: Callable[[Failure, str, Peer], None],
                 work_arrived: Callable[[], None]) -> None:
        self.links = links
        self.holdings = holdings
        self.readiness = readiness
        self.epoch = epoch  # the node's own epoch, for its Replicate calls
        self.clock = clock
        self.timings = timings
        self.min_copies = min_copies
        self.failed_call = failed_call  # logs, and fences on StaleEpoch
        self.work_arrived = work_arrived  # a peer's ready count rose
        self._batch: Batch | None = None
        self._lanes: dict[str, Lane] = {name: Lane() for name in links.peers}
        self._outgoing: Tombstones | None = None

    def in_flight(self, peer: str) -> int:
        """Replicate calls to ``peer`` not answered yet."""
        return self._lanes[peer].in_flight

    def holders_reason(self) -> str | None:
        """Why a push cannot get its copies now, or None."""
        holders = 1 + len(self.links.serving())
        if holders < self.min_copies:
            return f"only {holders} of {self.min_copies} required copies reachable"
        return None

    # -- pushes --------------------------------------------------------------

    def replicate(self, messages: Sequence[Message]) -> Deferred:
        """Fires once ``min_copies`` nodes hold ``messages``."""
        if not self.readiness.serving:
            raise NotReady(self.readiness.refusal() or "not serving")
        batch = self._batch
        if batch is None:
            batch = self._batch = Batch()
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
        if self.min_copies > 1:
            reason = self.holders_reason()
            if reason is not None:
                self._fail_batch(batch, reason)
                return
        # Every peer with a link gets the copies, even one whose heartbeat is
        # late: a missed copy is only restored by anti-entropy.
        holders = self.links.linked()
        batch.targets = len(holders)
        for peer in holders:
            self._lanes[peer.node_id].backlog.append(batch)
            self._send_backlog(peer)
        if self.min_copies <= 1:
            batch.done = True
            return
        batch.timer = self.clock.callLater(self.timings.replication_timeout,
                                           self._fail_batch, batch, "replication timed out")

    def _send_backlog(self, peer: Peer) -> None:
        """Send what waits for ``peer`` as one Replicate, unless
        ``MAX_IN_FLIGHT`` calls to it are unanswered: then it waits, and
        grows, until one is answered (group commit under load)."""
        lane = self._lanes[peer.node_id]
        if lane.in_flight >= MAX_IN_FLIGHT or not lane.backlog:
            return
        batches = [b for b in lane.backlog if not b.failed]
        lane.backlog = []
        link = peer.link()
        if link is None:
            self._count_answers(batches, held=False)
            return
        if not batches:
            return
        payload = encode_records([m for b in batches for m in b.messages])
        lane.in_flight += 1
        d = self.links.call(link, cmd.Replicate, timeout=self.timings.replication_timeout,
                            owner=self.links.me, epoch=self.epoch(), records=payload)
        d.addCallbacks(self._replicated, self._replicate_failed,
                       callbackArgs=(batches, peer), errbackArgs=(batches, peer))

    def _replicated(self, answer: dict, batches: list[Batch], peer: Peer) -> None:
        self._lanes[peer.node_id].in_flight -= 1
        peer.last_seen = self.links.now()
        self._count_answers(batches, held=answer["held"])
        self._send_backlog(peer)

    def _replicate_failed(self, failure: Failure, batches: list[Batch], peer: Peer) -> None:
        self._lanes[peer.node_id].in_flight -= 1
        self.failed_call(failure, "replicate", peer)
        self._count_answers(batches, held=False)
        self._send_backlog(peer)

    def peer_down(self, peer: Peer) -> None:
        """``peer`` is down: what waited for it will not reach it."""
        lane = self._lanes[peer.node_id]
        batches, lane.backlog = lane.backlog, []
        self._count_answers(batches, held=False)

    def _count_answers(self, batches: list[Batch], held: bool) -> None:
        for batch in batches:
            batch.answered += 1
            if held:
                batch.copies += 1
            self._settle_batch(batch)

    def _settle_batch(self, batch: Batch) -> None:
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

    def _fail_batch(self, batch: Batch, why: str) -> None:
        if batch.done:
            return
        batch.done = batch.failed = True
        if batch.timer is not None and batch.timer.active():
            batch.timer.cancel()
        self.log.warn("{count} push(es) not replicated: {why}", count=len(batch.messages),
                      why=why)
        for message in batch.messages:
            self.tombstone(message.id)
        for waiter in batch.waiters:
            waiter.errback(NotReplicated(why))

    def on_replicate(self, link: Link, owner: str, epoch: int, records: bytes) -> bool:
        """Hold copies of ``owner``'s records; whether this node counts as
        a holder (it does not while it recovers)."""
        if owner != link.peer_id:
            raise cmd.NotHolder("replicate your own messages only")
        self.holdings.check_epoch(owner, epoch)
        decoded = decode_records(records)  # a WireError changes nothing
        if any(record.mid.node != owner for record in decoded):
            raise cmd.NotHolder("replicate your own messages only")
        self.holdings.note_epoch(owner, epoch)
        peer = self.links.peers[owner]
        peer.last_seen = self.links.now()
        added, written = self.holdings.merge_replicated(decoded)
        if added:
            peer.ready_count += added
            self.clock.callLater(0, self.work_arrived)
        if written is not None:  # --data-dir: held once the copies are on disk
            return written.addCallback(lambda _: self.readiness.serving)
        return self.readiness.serving

    # -- tombstones ----------------------------------------------------------

    def tombstone(self, message_id: str) -> Deferred | None:
        """Write one tombstone here and send it to every peer (this turn's
        tombstones go as one call per peer); with ``--data-dir``, a
        Deferred that fires once it is on disk here."""
        mid = parse_id(message_id)
        written = self.holdings.tombstone(message_id)
        if self._outgoing is None:
            self._outgoing = Tombstones()
            self.clock.callLater(0, self.flush_tombstones)
        self._outgoing.add(mid.node, mid.epoch, mid.seq)
        return written

    def states_changed(self, changed: list[Message]) -> None:
        """The node's ``changed`` messages changed state (the node gathers
        a turn's changes): send them to every linked peer."""
        if not changed:
            return
        self._to_every_linked_peer(cmd.States, "states", states=encode_states(changed))

    def flush_tombstones(self) -> None:
        tombstones, self._outgoing = self._outgoing, None
        if tombstones is None:
            return
        self._to_every_linked_peer(cmd.Tombstones, "tombstones",
                                   tombstones=encode_tombstones(tombstones))

    def _to_every_linked_peer(self, command: type, what: str, **arguments: bytes) -> None:
        """Every peer with a link, even one whose heartbeat is late: what
        misses a peer is only restored by anti-entropy."""
        for peer in self.links.linked():
            link = peer.link()
            assert link is not None
            d = self.links.call(link, command, **arguments)
            d.addErrback(self.failed_call, what, peer)

    def on_tombstones(self, payload: bytes) -> None:
        self.holdings.merge_tombstones(decode_tombstones(payload))

    def on_states(self, link: Link, payload: bytes) -> None:
        self.holdings.merge_states(decode_states(payload), link.peer_id or "")

"""One node's queue service: the pure queue driven by a clock.

QueueNode puts the pure :class:`~dqid.queue.WorkQueue` and
:class:`~dqid.idempotency.IdempotencyIndex` on a clock: it mints message
ids, runs the one lease timer, parks long polls until work arrives, and runs
a push through replication.  The web layer calls it; it knows nothing about
HTTP, and of its cluster only the small :class:`Remote` protocol below.

Operations, one name each: ``push`` (one message; ``push_many`` for a
batch), ``get``, ``ack``, ``nack``, ``touch``.  Each answers at once when
nothing has to wait for a peer (a value, or None) and otherwise returns a
Deferred.  ``ack_own`` and ``change_own_lease`` act on this node's own
queue only (a peer forwarded the request); ``apply_tombstone`` removes a
message acked elsewhere.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, NamedTuple, NoReturn, Protocol, Sequence

from twisted.internet.defer import (
    CancelledError, Deferred, FirstError, fail, gatherResults, succeed,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import __version__
from .errors import NotReady, NotReplicated
from .idempotency import IdempotencyIndex, body_digest
from .key_asks import KeyAsks, KeyRemote
from .ids import MessageId, id_prefix, parse_id, parse_ids, to_base36
from .queue import PENDING, Message, UnknownMessage, WorkQueue
from .readiness import Readiness
from .replica import Record, tombstones_of
from .tombstones import Tombstones

__all__ = ["LeaseChange", "NotReady", "NotReplicated", "PushItem", "PushResult", "QueueNode",
           "Remote"]


class Remote(KeyRemote, Protocol):
    """What a node asks of the rest of its cluster."""

    def replicate(self, messages: Sequence[Message]) -> Deferred:
        """Fires once enough holders have ``messages``; fails with
        NotReplicated (or NotReady) when they cannot be made."""

    async def take(self, count: int, visibility: float) -> list[Record]:
        """Lease up to ``count`` messages from a peer with ready work."""

    def ack(self, message_id: str, mid: MessageId) -> Deferred:
        """Ack a message this node's queue does not hold (fails with
        UnknownMessage when nobody knows it)."""

    def ack_many(self, acks: Sequence[tuple[str, MessageId]]) -> Deferred:
        """Ack messages this node's queue does not hold, together: fires
        with, per ack, True (acked) or False (nobody knows it)."""

    async def lease(self, message_id: str, mid: MessageId, change: LeaseChange) -> None:
        """Nack, touch or kick a message owned by a peer."""

    def tombstone(self, message_id: str) -> Deferred | None:
        """This node's message was acked: tell every holder; a Deferred
        when the tombstone must reach the disk first."""

    def tombstone_many(self, message_ids: Sequence[str]) -> Deferred | None:
        """:meth:`tombstone` for a batch of this node's messages."""

    def states_changed(self, messages: list[Message]) -> None:
        """Deliveries, held states or due times of ``messages`` changed:
        tell every holder."""

    async def peek(self, message_id: str, mid: MessageId) -> tuple[Record, str]:
        """A message owned by a peer, and its state, changing nothing."""

    async def held(self, count: int) -> list[Record]:
        """Held messages of the other owners (asked, or from replicas)."""

    def stats(self) -> dict[str, Any]:
        """``min_copies`` and ``peers`` for /stats."""

    def stop(self) -> None:
        """The node is shutting down."""


class Journal(Protocol):
    """What a node with ``--data-dir`` keeps on disk (its Durability)."""

    def own(self, messages: Iterable[Message]) -> Deferred:
        """New messages of this node: fires once they are on disk."""

    def tombstone(self, mid: MessageId) -> Deferred:
        """An own message gone: fires once that is on disk."""

    def tombstones(self, tombstones: Tombstones) -> Deferred:
        """Own messages gone: fires once they are on disk."""

    def states(self, messages: Iterable[Message]) -> None:
        """Deliveries, held states or due times changed."""


class PushItem(NamedTuple):
    body: bytes
    content_type: str | None = None
    delay: float | None = None  # not delivered before this many seconds


class PushResult(NamedTuple):
    ids: list[str]
    created: bool  # False: an Idempotency-Key retry answered with the first id


@dataclass(frozen=True)
class LeaseChange:
    """What a nack, touch or kick asks of a message's owner."""

    action: str  # "nack", "touch" or "kick"
    receipt: str | None = None  # the lease it acts on (nack, touch)
    visibility: float = 0.0  # touch: the new lease, from now
    delay: float = 0.0  # nack: ready again only after this


@dataclass(eq=False)
class LongPoll:
    """A parked ``get`` waiting for work."""

    count: int
    visibility: float
    deferred: Deferred = field(init=False)
    timer: IDelayedCall | None = None


def first_error(failure: Failure) -> Failure:
    """The failure inside gatherResults' FirstError."""
    failure.trap(FirstError)
    return failure.value.subFailure


def acked_at(_: object, answers: list[bool], position: int) -> None:
    """An ack of a batch took effect: answer True at ``position``."""
    answers[position] = True


def unknown_at(failure: Failure, answers: list[bool], position: int) -> None:
    """An ack of a batch found no such message: answer False at ``position``
    (any other failure goes on)."""
    failure.trap(UnknownMessage)
    answers[position] = False


class QueueNode:
    log = Logger()

    def __init__(
        self,
        node_id: str,
        size: int,
        clock: IReactorTime,
        *,
        epoch: int,
        visibility: float = 30.0,
        idempotency_window: float = 300.0,
        readiness: Readiness | None = None,
        max_deliveries: int = 0,
    ) -> None:
        self.node_id = node_id
        self.clock = clock
        self.epoch = epoch
        self.default_visibility = visibility
        self.queue = WorkQueue(size, max_deliveries=max_deliveries)
        self.idempotency = IdempotencyIndex(idempotency_window)
        self.readiness = readiness if readiness is not None else Readiness()
        self.remote: Remote | None = None  # None: a standalone node
        self.journal: Journal | None = None  # None: nothing on disk
        self._publishing = False
        self._seq = 0
        self._id_prefix = ("", -1)  # (f"{node_id}.{epoch in base 36}.", epoch)
        self._long_polls: deque[LongPoll] = deque()
        self._timer: IDelayedCall | None = None
        self._outcomes: dict[str, list[Deferred]] = {}
        self.keys = KeyAsks(self)  # Idempotency-Keys across the cluster

    # -- epochs, ids, recovered messages ------------------------------------

    def attach(self, remote: Remote) -> None:
        """Join a cluster: pushes replicate through ``remote``, and changes
        of deliveries, held states and due times are kept for it."""
        self.remote = remote
        self.queue.changes = []

    def keep_on_disk(self, journal: Journal) -> None:
        """``--data-dir``: pushes, acks and state changes reach ``journal``
        (and a push or an ack is answered only once it is on disk)."""
        self.journal = journal
        if self.queue.changes is None:
            self.queue.changes = []

    def fence(self) -> None:
        """A newer incarnation of this node id serves: answer parked polls."""
        self._answer_all_long_polls()

    def start_epoch(self, epoch: int) -> None:
        """Mint ids in ``epoch`` from now on (after recovery)."""
        self.epoch = epoch
        self._seq = 0

    def restore(self, records: Iterable[Record], keep: bool = True) -> None:
        """Queue recovered messages again: ready (or held, or delayed, as
        they were), leases void.  ``keep``: also write them to the disk
        (they came from peers, not from this node's own data directory)."""
        records = list(records)
        if keep and self.journal is not None and records:
            self.journal.own(records).addErrback(lambda f: None)  # failed() says it
        now = self.clock.seconds()
        for record in records:
            self.queue.restore(record.id, record.body, record.content_type,
                               record.key, record.deliveries, held=record.held,
                               due=record.due, now=now)
            if record.key is not None:
                self.idempotency.remember(record.key, body_digest(record.body), record.id)
        self._schedule_wakeup()
        self._feed_long_polls()

    def new_id(self) -> str:
        self._seq += 1
        prefix, epoch = self._id_prefix
        if epoch != self.epoch:
            prefix, epoch = self._id_prefix = (
                id_prefix(self.node_id, self.epoch), self.epoch)
        return prefix + to_base36(self._seq)

    def accepted_messages(self) -> list[Message]:
        """This node's queued messages that were accepted (not pending)."""
        return [m for m in self.queue.messages() if m.state != PENDING]

    # -- push ----------------------------------------------------------------

    def _refuse_writes(self) -> None:
        refusal = self.readiness.refusal()
        if refusal is not None:
            raise NotReady(refusal)

    def push(self, item: PushItem, idempotency_key: str | None = None
             ) -> PushResult | Deferred:
        """Queue one message; with a key, a repeat answers the first id.

        A PushResult at once when nothing has to wait for a peer (a
        standalone node, no key to look up), else a Deferred of one."""
        self._refuse_writes()
        if idempotency_key is not None:
            return Deferred.fromCoroutine(self._push_with_key(item, idempotency_key))
        due = self._due(item.delay)
        if self.remote is None and self.journal is None:  # nothing to wait for
            message = self.queue.push(self.new_id(), item.body, item.content_type, due=due,
                                      now=self.clock.seconds())
            if due is not None:
                self._schedule_wakeup(due)
            elif self._long_polls:
                self._feed_long_polls()
            return PushResult([message.id], True)
        message = self.queue.reserve(self.new_id(), item.body, item.content_type, due=due)
        result = PushResult([message.id], True)
        waiting = self._accept([message])
        if waiting is None:
            return result
        return waiting.addCallback(lambda _: result)

    async def _push_with_key(self, item: PushItem, idempotency_key: str) -> PushResult:
        digest = body_digest(item.body)
        first = await self.keys.first_under(idempotency_key, digest)
        if first is not None:
            return PushResult([first], created=False)
        try:
            message = self.queue.reserve(self.new_id(), item.body, item.content_type,
                                         idempotency_key, due=self._due(item.delay))
            self.idempotency.remember(idempotency_key, digest, message.id)
            waiting = self._accept([message])
        finally:
            # Who waited on the ask finds this push, and (_accept having
            # begun) waits for its outcome.
            self.keys.asked(idempotency_key)
        if waiting is not None:
            await waiting
        return PushResult([message.id], created=True)

    async def own_key(self, key: str, digest: bytes, asker: str) -> str | None:
        """For peer ``asker``: our accepted id under ``key`` (KeyAsks)."""
        return await self.keys.own_key(key, digest, asker)

    def push_many(self, items: Sequence[PushItem]) -> PushResult | Deferred:
        """Queue all of ``items`` or none of them."""
        self._refuse_writes()
        entries = [(self.new_id(), i.body, i.content_type, None, self._due(i.delay))
                   for i in items]
        messages = self.queue.reserve_many(entries)
        result = PushResult([m.id for m in messages], created=True)
        waiting = self._accept(messages)
        if waiting is None:
            return result
        return waiting.addCallback(lambda _: result)

    def _accept(self, messages: list[Message]) -> Deferred | None:
        """Replicate pending ``messages`` (and write them to disk), then
        make them ready: None when that is done at once (no replication, no
        disk), else a Deferred that fires then (or fails with NotReplicated
        or NotReady); cancelling it leaves them to be settled all the same."""
        if self.remote is None and self.journal is None:
            self._commit(messages)
            return None
        for message in messages:
            if message.key is not None:  # a later push under it may wait on it
                self._outcomes[message.id] = []
        try:
            waits = []
            if self.journal is not None:
                waits.append(self.journal.own(messages))
            if self.remote is not None:
                waits.append(self.remote.replicate(messages))
            waiting = waits[0] if len(waits) == 1 else gatherResults(
                waits, consumeErrors=True).addErrback(first_error)
        except BaseException as reason:
            self._not_accepted(reason, messages)
        settled = waiting.addCallbacks(
            self._replicated, self._not_accepted,
            callbackArgs=(messages,), errbackArgs=(messages,),
        )
        # The client's answer: cancelling it (the client left) must not stop
        # the push half way, its copies held by peers and no tombstone sent;
        # it is accepted or withdrawn as if the client had stayed.
        answer: Deferred = Deferred()
        settled.chainDeferred(answer)
        return answer

    def _replicated(self, _: object, messages: list[Message]) -> None:
        if self._outcomes:
            for message in messages:
                self._settle(message.id, None)
        self._commit(messages)

    def _not_accepted(self, reason: BaseException | Failure, messages: list[Message]) -> NoReturn:
        if isinstance(reason, Failure):
            reason = reason.value
        for message in messages:
            self._withdraw(message)
            self._settle(message.id, reason)
        if isinstance(reason, (NotReplicated, NotReady, CancelledError)):
            raise reason
        raise NotReplicated(str(reason)) from reason

    def _due(self, delay: float | None) -> float | None:
        """The wall-clock time a push with ``delay`` is due, or None."""
        return self.clock.seconds() + delay if delay else None

    def _commit(self, messages: list[Message]) -> None:
        if self.queue.commit_many(messages, now=self.clock.seconds()):
            self._schedule_wakeup()
        if self._long_polls:
            self._feed_long_polls()

    def _withdraw(self, message: Message) -> None:
        if message.id in self.queue and message.state == PENDING:
            self.queue.withdraw(message.id)
            if self.journal is not None and self.remote is None:
                # Its record may be on disk: the tombstone keeps it from coming
                # back.  (In a cluster the replicator writes the tombstone.)
                self.journal.tombstone(parse_id(message.id)).addErrback(lambda f: None)
        if message.key is not None:
            self.idempotency.discard(message.key, message.id)

    def _settle(self, message_id: str, reason: BaseException | None) -> None:
        for waiting in self._outcomes.pop(message_id, []):
            if reason is None:
                waiting.callback(None)
            else:
                waiting.errback(NotReplicated(str(reason)))

    def outcome_of(self, message_id: str) -> Deferred:
        """Fires when ``message_id`` is accepted (at once if it already is)."""
        if message_id in self._outcomes:
            waiting: Deferred = Deferred()
            self._outcomes[message_id].append(waiting)
            return waiting
        return succeed(None)

    # -- get -----------------------------------------------------------------

    def get(self, visibility: float, wait: float = 0.0,
            count: int = 1) -> list[Any] | Deferred:
        """Lease up to ``count`` messages; wait up to ``wait`` s for the first.

        Served from this node's queue, else from a peer with ready work.  A
        list at once when this node has ready work (or nothing can come),
        else a Deferred of one; an empty list when nothing became ready in
        time.  Cancelling the Deferred (client gone) forgets the poll.
        """
        taken = self._take(count, visibility)
        if taken or (self.remote is None and wait <= 0):
            return taken
        return Deferred.fromCoroutine(self._get_later(visibility, wait, count))

    async def _get_later(self, visibility: float, wait: float, count: int) -> list[Any]:
        deadline = self.clock.seconds() + wait
        taken: list[Any] = []
        if self.remote is not None:
            taken = await self.remote.take(count, visibility)
            taken = taken or self._take(count, visibility)
        remaining = deadline - self.clock.seconds()
        if taken or remaining <= 0 or self.readiness.stopping:
            return taken
        poll = LongPoll(count, visibility)
        poll.deferred = Deferred(lambda _d: self._drop_long_poll(poll))
        poll.timer = self.clock.callLater(remaining, self._wait_over, poll)
        self._long_polls.append(poll)
        return await poll.deferred

    def take_own(self, count: int, visibility: float) -> list[Message]:
        """Lease up to ``count`` of this node's own ready messages."""
        return self._take(count, visibility)

    def has_long_polls(self) -> bool:
        return bool(self._long_polls)

    def claim_long_poll(self) -> LongPoll | None:
        """Take the first parked long poll out of line to serve it remotely."""
        return self._long_polls.popleft() if self._long_polls else None

    def answer_long_poll(self, poll: LongPoll, taken: list[Any]) -> bool:
        """Answer a claimed long poll; False (and back in line) if ``taken``
        is empty.  Messages for a poll that went away meanwhile come back
        when their lease runs out."""
        if poll.deferred.called:
            return bool(taken)
        if not taken:
            if poll.timer is not None and poll.timer.active():
                self._long_polls.appendleft(poll)
            else:
                poll.deferred.callback([])
            return False
        if poll.timer is not None and poll.timer.active():
            poll.timer.cancel()
        poll.timer = None
        poll.deferred.callback(taken)
        return True

    def _take(self, count: int, visibility: float) -> list[Message]:
        queue = self.queue
        if self.readiness.fenced or not queue.ready:
            return []
        now = self.clock.seconds()
        taken = []
        for _ in range(count):
            message = queue.take(now, visibility)
            if message is None:
                break
            taken.append(message)
        if taken:
            self._schedule_wakeup(now + visibility)
            if queue.changes:
                self._changed()
        return taken

    def _wait_over(self, poll: LongPoll) -> None:
        poll.timer = None
        if poll in self._long_polls:
            self._long_polls.remove(poll)
        if not poll.deferred.called:
            poll.deferred.callback([])

    def _drop_long_poll(self, poll: LongPoll) -> None:
        if poll in self._long_polls:
            self._long_polls.remove(poll)
        if poll.timer is not None and poll.timer.active():
            poll.timer.cancel()
        poll.timer = None

    def _feed_long_polls(self) -> None:
        while self._long_polls and self.queue.ready:
            poll = self._long_polls.popleft()
            taken = self._take(poll.count, poll.visibility)
            if poll.timer is not None and poll.timer.active():
                poll.timer.cancel()
            poll.timer = None
            poll.deferred.callback(taken)

    # -- ack -----------------------------------------------------------------

    def ack(self, message_id: str) -> Deferred | None:
        """Ack a message of any owner: None when done at once (a message
        of this node's queue), else a Deferred (the cluster forwards the
        ack to the owner or writes a tombstone)."""
        target = self._ack_here(message_id)
        if isinstance(target, MessageId):
            assert self.remote is not None  # (only then is the id returned)
            return self.remote.ack(message_id, target)
        return target

    def ack_many(self, message_ids: Sequence[str]) -> Deferred:
        """Ack a batch of messages of any owner: fires with, per id, True
        (acked) or False (unknown: nobody here knows it, or an earlier id
        of the batch acked it); fails with the first error other than that
        (the other acks still take effect).  The cluster takes the peers'
        messages together, so the acks for one owner settle as one."""
        acked = [False] * len(message_ids)
        waits: list[Deferred] = []
        own: list[str] = []  # this node's, acked here: told as one
        others: list[int] = []  # positions of the rest
        queue, fenced = self.queue, self.readiness.fenced
        for position, message_id in enumerate(message_ids):
            message = queue.get(message_id)  # as _acks_here, for each id
            if message is not None and message.state != PENDING and not fenced:
                self.apply_tombstone(message_id)
                own.append(message_id)
                acked[position] = True
            else:
                others.append(position)
        elsewhere: list[tuple[str, MessageId]] = []
        positions: list[int] = []
        mids = parse_ids([message_ids[position] for position in others])
        for position, mid in zip(others, mids):
            target = self._route_ack(message_ids[position], mid)
            if isinstance(target, MessageId):
                positions.append(position)
                elsewhere.append((message_ids[position], target))
            else:
                waits.append(target.addCallbacks(
                    acked_at, unknown_at, callbackArgs=(acked, position),
                    errbackArgs=(acked, position)))
        if own:
            written = self._tell_acked(own)
            if written is not None:
                waits.append(written)
        if elsewhere and self.remote is not None:
            def answered(answers: list[bool]) -> None:
                for position, answer in zip(positions, answers):
                    acked[position] = answer
            waits.append(self.remote.ack_many(elsewhere).addCallback(answered))
        if not waits:
            return succeed(acked)
        return gatherResults(waits, consumeErrors=True).addCallbacks(
            lambda _: acked, first_error)

    def _ack_here(self, message_id: str) -> Deferred | MessageId | None:
        """Ack ``message_id`` if this node's queue holds it (None, or a
        Deferred for the tombstone's disk write); else what
        :meth:`_route_ack` says."""
        if self._acks_here(message_id):
            return self.ack_own(message_id)
        try:
            mid: MessageId | None = parse_id(message_id)
        except ValueError:
            mid = None
        return self._route_ack(message_id, mid)

    def _route_ack(self, message_id: str, mid: MessageId | None) -> Deferred | MessageId:
        """For an id this node's queue does not hold (``mid``: its parsed
        id, None if it is not one): the parsed id, for the cluster to ack;
        else a failed Deferred (UnknownMessage, NotReady)."""
        if mid is None:
            return fail(UnknownMessage(message_id))
        if mid.node == self.node_id and self.readiness.fenced:
            return fail(NotReady(self.readiness.refusal() or "fenced"))
        if self.remote is None:  # a pending message, or none: not ackable
            return fail(UnknownMessage(message_id))
        return mid

    def _acks_here(self, message_id: str) -> bool:
        """Whether this node's queue holds ``message_id``, accepted, and
        the node may ack it (it is not fenced)."""
        message = self.queue.get(message_id)  # our queue holds our ids only
        return message is not None and message.state != PENDING and not self.readiness.fenced

    def ack_own(self, message_id: str) -> Deferred | None:
        """Ack a message of this node's queue and tell the holders: None,
        or a Deferred that fires once the tombstone is on disk."""
        self.apply_tombstone(message_id)
        if self.remote is not None:
            return self.remote.tombstone(message_id)
        if self.journal is not None:
            return self.journal.tombstone(parse_id(message_id))
        return None

    def _tell_acked(self, message_ids: Sequence[str]) -> Deferred | None:
        """Tell every holder (or the disk) that these messages of this
        node's queue were acked: None, or a Deferred that fires once the
        tombstones are on disk."""
        if self.remote is not None:
            return self.remote.tombstone_many(message_ids)
        if self.journal is not None:
            return self.journal.tombstones(tombstones_of(message_ids))
        return None

    def apply_tombstone(self, message_id: str) -> Message:
        """Remove a message of this node's queue that was acked (here, or
        elsewhere: its tombstone arrived)."""
        message = self.queue.ack(message_id)
        if message.key is not None:
            self.idempotency.released(message.key, self.clock.seconds())
        return message

    # -- nack, touch, kick, peek ---------------------------------------------

    def nack(self, message_id: str, receipt: str, delay: float = 0.0) -> Deferred | None:
        """End the lease ``receipt`` names: the message is ready again now,
        or after ``delay`` seconds (held after --max-deliveries)."""
        return self._lease(LeaseChange("nack", receipt, delay=delay), message_id)

    def touch(self, message_id: str, visibility: float, receipt: str) -> Deferred | None:
        """Extend the lease ``receipt`` names to ``visibility`` s from now."""
        return self._lease(LeaseChange("touch", receipt, visibility=visibility), message_id)

    def kick(self, message_id: str) -> Deferred | None:
        """Make a held message ready again."""
        return self._lease(LeaseChange("kick"), message_id)

    def _lease(self, change: "LeaseChange", message_id: str) -> Deferred | None:
        if message_id in self.queue and not self.readiness.fenced:  # our ids only
            self.change_own_lease(message_id, change)
            return None
        return Deferred.fromCoroutine(self._lease_elsewhere(message_id, change))

    async def _lease_elsewhere(self, message_id: str, change: "LeaseChange") -> None:
        try:
            mid = parse_id(message_id)
        except ValueError:
            raise UnknownMessage(message_id) from None
        if mid.node == self.node_id or self.remote is None:
            if self.readiness.fenced:
                raise NotReady(self.readiness.refusal() or "fenced")
            self.change_own_lease(message_id, change)
        else:
            await self.remote.lease(message_id, mid, change)

    def change_own_lease(self, message_id: str, change: "LeaseChange") -> Message:
        """Nack, touch or kick a message of this node's queue (UnknownMessage,
        LeaseLost, NotHeld when it cannot)."""
        queue = self.queue
        now = self.clock.seconds()
        if change.action == "touch":
            message = queue.touch(message_id, now, change.visibility, change.receipt)
            self._schedule_wakeup(now + change.visibility)
            return message
        if change.action == "nack":
            message = queue.nack(message_id, change.receipt, now=now, delay=change.delay)
            if change.delay:
                self._schedule_wakeup(now + change.delay)
        else:
            message = queue.kick(message_id)
        self._changed()
        self._feed_long_polls()
        return message

    def lookup(self, message_id: str) -> Message:
        message = self.queue.get(message_id)
        if message is None or message.state == PENDING:
            raise UnknownMessage(message_id)
        return message

    def peek(self, message_id: str) -> tuple[Any, str] | Deferred:
        """A message of any owner and its state name, changing nothing."""
        message = self.queue.get(message_id)
        if message is not None:
            return self.queue.peek(message_id)
        return Deferred.fromCoroutine(self._peek_elsewhere(message_id))

    async def _peek_elsewhere(self, message_id: str) -> tuple[Any, str]:
        try:
            mid = parse_id(message_id)
        except ValueError:
            raise UnknownMessage(message_id) from None
        if mid.node == self.node_id or self.remote is None:
            raise UnknownMessage(message_id)
        return await self.remote.peek(message_id, mid)

    def held_own(self, count: int) -> list[Message]:
        return self.queue.held_messages(count)

    def held(self, count: int) -> list[Any] | Deferred:
        """Up to ``count`` held messages: this node's, then other owners'."""
        own = self.queue.held_messages(count)
        if self.remote is None or len(own) >= count:
            return own
        d = Deferred.fromCoroutine(self.remote.held(count - len(own)))
        return d.addCallback(lambda others: [*own, *others])

    def _changed(self) -> None:
        """Tell the holders and the disk, at the end of this turn, what
        changed in the queue (deliveries, held states, due times)."""
        if self.queue.changes and not self._publishing:
            self._publishing = True
            self.clock.callLater(0, self._publish_changes)

    def _publish_changes(self) -> None:
        self._publishing = False
        changed = self.drain_changes()
        if not changed:
            return
        if self.remote is not None:
            self.remote.states_changed(changed)
        if self.journal is not None:
            self.journal.states(changed)

    def drain_changes(self) -> list[Message]:
        """The messages whose replicated state changed since the last call,
        still queued (each once)."""
        changes = self.queue.changes
        if not changes:
            return []
        self.queue.changes = []
        queued = self.queue.get
        return [m for m in dict.fromkeys(changes) if queued(m.id) is m]

    # -- the one timer: leases that run out, delays that end ----------------

    def _schedule_wakeup(self, added: float | None = None) -> None:
        """Set the one timer for the earliest lease deadline or due time.
        ``added``: such a time just given, when that is all that changed."""
        timer = self._timer
        if (added is not None and timer is not None and timer.getTime() <= added
                and timer.active()):
            return  # due no later than the new time: nothing to move
        wakeup = self.queue.next_wakeup()
        if wakeup is None:
            if timer is not None and timer.active():
                timer.cancel()
            self._timer = None
            return
        if timer is not None and timer.active():
            if timer.getTime() <= wakeup:
                return
            timer.cancel()
        delay = max(0.0, wakeup - self.clock.seconds())
        self._timer = self.clock.callLater(delay, self._wake_up)

    def _wake_up(self) -> None:
        self._timer = None
        if self.queue.advance(self.clock.seconds()):
            self._changed()
            self._feed_long_polls()
        self._schedule_wakeup()

    # -- lifecycle and stats -------------------------------------------------

    def shutdown(self) -> None:
        """Stop taking work; answer parked long polls with nothing."""
        self.readiness.stopping = True
        self._answer_all_long_polls()
        if self.remote is not None:
            self.remote.stop()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _answer_all_long_polls(self) -> None:
        while self._long_polls:
            poll = self._long_polls.popleft()
            if poll.timer is not None and poll.timer.active():
                poll.timer.cancel()
            poll.timer = None
            poll.deferred.callback([])

    def oldest_ready_age(self) -> float:
        """Seconds (to the millisecond) since the message next in line was
        enqueued; 0 when nothing is ready."""
        since = self.queue.oldest_ready_since()
        return 0.0 if since is None else round(max(0.0, self.clock.seconds() - since), 3)

    def stats(self) -> dict[str, Any]:
        queue = self.queue
        reason = self.readiness.reason()
        remote = self.remote.stats() if self.remote is not None else {
            "min_copies": 1, "peers": {}}
        return {
            "node": self.node_id,
            "version": __version__,
            "epoch": self.epoch,
            "ready_to_serve": reason is None,
            "not_ready_reason": reason,
            "size": queue.size,
            "depth": queue.depth,
            "ready": queue.ready,
            "leased": queue.leased,
            "delayed": queue.delayed,
            "held": queue.held,
            "oldest_ready_age": self.oldest_ready_age() if queue.ready else None,
            "max_deliveries": queue.max_deliveries,
            "pending": queue.pending,
            "min_copies": remote["min_copies"],
            "waiting_gets": len(self._long_polls),
            "counters": queue.counters.as_dict(),
            "peers": remote["peers"],
        }

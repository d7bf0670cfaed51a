"""One node's queue service: the pure queue driven by a clock.

QueueNode puts the pure :class:`~dqid.queue.WorkQueue` and
:class:`~dqid.idempotency.IdempotencyIndex` on a clock: it mints message
ids, runs the one lease timer, parks long polls until work arrives, and runs
a push through replication (a hook that a standalone node answers at once).
The web layer calls it; it knows nothing about HTTP.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, NamedTuple, NoReturn, Sequence

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .idempotency import IdempotencyIndex, body_digest
from .ids import parse_id, to_base36
from .queue import PENDING, Message, UnknownMessage, WorkQueue

if TYPE_CHECKING:
    from .cluster import Cluster
    from .replica import Record


class NotReady(Exception):
    """The node cannot take writes now (starting, recovering, stopping)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotReplicated(Exception):
    """Not enough copies of a push could be made in time."""


class PushItem(NamedTuple):
    body: bytes
    content_type: str | None = None


class PushResult(NamedTuple):
    ids: list[str]
    created: bool  # False: an Idempotency-Key retry answered with the first id


@dataclass(eq=False)
class _Waiter:
    count: int
    visibility: float
    deferred: Deferred = field(init=False)
    timer: IDelayedCall | None = None


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
        min_copies: int = 1,
        idempotency_window: float = 300.0,
    ) -> None:
        self.node_id = node_id
        self.clock = clock
        self.epoch = epoch
        self.default_visibility = visibility
        self.min_copies = min_copies
        self.queue = WorkQueue(size)
        self.idempotency = IdempotencyIndex(idempotency_window)
        self.cluster: Cluster | None = None
        self.not_ready_reason: str | None = None
        self.fenced = False
        self._seq = 0
        self._id_prefix = ("", -1)  # (f"{node_id}.{epoch in base 36}.", epoch)
        self._waiters: deque[_Waiter] = deque()
        self._lease_timer: IDelayedCall | None = None
        self._outcomes: dict[str, list[Deferred]] = {}

    # -- readiness -----------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        return self.not_ready_reason is None

    def set_not_ready(self, reason: str | None) -> None:
        self.not_ready_reason = reason

    def readiness(self) -> str | None:
        """Why this node cannot take writes now, or None when it can."""
        if self.not_ready_reason is not None:
            return self.not_ready_reason
        if self.cluster is not None:
            return self.cluster.write_reason()
        return None

    def fence(self, reason: str) -> None:
        """A newer incarnation of this node id serves: serve nothing more."""
        self.fenced = True
        self.not_ready_reason = reason
        self._answer_all_waiters()

    def start_epoch(self, epoch: int) -> None:
        """Mint ids in ``epoch`` from now on (after recovery)."""
        self.epoch = epoch
        self._seq = 0

    def restore(self, records: Iterable["Record"]) -> None:
        """Queue recovered messages again: ready, leases void."""
        for record in records:
            self.queue.restore(record.id, record.body, record.content_type,
                               record.key, record.deliveries)
            if record.key is not None:
                self.idempotency.remember(record.key, body_digest(record.body), record.id)
        self._feed_waiters()

    def new_id(self) -> str:
        self._seq += 1
        prefix, epoch = self._id_prefix
        if epoch != self.epoch:
            prefix, epoch = self._id_prefix = (
                f"{self.node_id}.{to_base36(self.epoch)}.", self.epoch)
        return prefix + to_base36(self._seq)

    # -- push ----------------------------------------------------------------

    async def push(
        self, item: PushItem, idempotency_key: str | None = None
    ) -> PushResult:
        """Queue one message; with a key, a repeat answers the first id."""
        result = self.push_now(item, idempotency_key)
        if isinstance(result, Deferred):
            return await result
        return result

    def push_now(
        self, item: PushItem, idempotency_key: str | None = None
    ) -> PushResult | Deferred:
        """:meth:`push`, answered at once when nothing has to wait for a peer
        (a standalone node, no key to look up): a PushResult, or else a
        Deferred that fires with one."""
        if self.not_ready_reason is not None:
            raise NotReady(self.not_ready_reason)
        if idempotency_key is not None:
            return Deferred.fromCoroutine(self._push_with_key(item, idempotency_key))
        if self.cluster is None:  # nothing to wait for
            message = self.queue.push(self.new_id(), item.body, item.content_type)
            if self._waiters:
                self._feed_waiters()
            return PushResult([message.id], True)
        message = self.queue.reserve(self.new_id(), item.body, item.content_type)
        result = PushResult([message.id], True)
        waiting = self._accept_now([message])
        if waiting is None:
            return result
        return waiting.addCallback(lambda _: result)

    async def _push_with_key(self, item: PushItem, idempotency_key: str) -> PushResult:
        digest = body_digest(item.body)
        now = self.clock.seconds()
        first = self.idempotency.lookup(idempotency_key, digest, now)
        if first is not None:
            first = await self._confirm_first(idempotency_key, digest, first)
        if first is not None:
            return PushResult([first], created=False)
        message = self.queue.reserve(self.new_id(), item.body, item.content_type,
                                     idempotency_key)
        self.idempotency.remember(idempotency_key, digest, message.id)
        await self._accept([message])
        return PushResult([message.id], created=True)

    async def _confirm_first(self, key: str, digest: bytes, first: str) -> str | None:
        """The accepted id of an earlier push under ``key``, or None when
        that push was never accepted (withdrawn) and the key is free."""
        if parse_id(first).node == self.node_id or self.cluster is None:
            await self._outcome_of(first)  # NotReplicated if it is withdrawn
            return first
        # Only the owner knows whether its push was accepted or withdrawn.
        confirmed = await self.cluster.confirm_key(key, digest, first)
        if confirmed is None:
            self.idempotency.forget(key, first)
        return confirmed

    async def own_key(self, key: str, digest: bytes) -> str | None:
        """For a peer: our accepted id under ``key``; None if there is none.
        Waits for a push still being replicated."""
        first = self.idempotency.lookup(key, digest, self.clock.seconds())
        if first is None or parse_id(first).node != self.node_id:
            return None
        try:
            await self._outcome_of(first)
        except NotReplicated:
            return None
        return first

    async def push_many(self, items: Sequence[PushItem]) -> PushResult:
        """Queue all of ``items`` or none of them."""
        if self.not_ready_reason is not None:
            raise NotReady(self.not_ready_reason)
        entries = [(self.new_id(), i.body, i.content_type, None) for i in items]
        messages = self.queue.reserve_many(entries)
        await self._accept(messages)
        return PushResult([m.id for m in messages], created=True)

    async def _accept(self, messages: list[Message]) -> None:
        """Replicate pending ``messages``, then make them ready."""
        waiting = self._accept_now(messages)
        if waiting is not None:
            await waiting

    def _accept_now(self, messages: list[Message]) -> Deferred | None:
        """Replicate pending ``messages``, then make them ready: None when
        that is done at once (no replication), else a Deferred that fires
        then (or fails with NotReplicated, NotReady or CancelledError)."""
        if self.cluster is None:
            self._commit(messages)
            return None
        for message in messages:
            self._outcomes[message.id] = []
        try:
            waiting = self.cluster.replicate(messages)
        except BaseException as reason:
            self._not_accepted(reason, messages)
        return waiting.addCallbacks(
            self._replicated, self._not_accepted,
            callbackArgs=(messages,), errbackArgs=(messages,),
        )

    def _replicated(self, _: object, messages: list[Message]) -> None:
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

    def _commit(self, messages: list[Message]) -> None:
        commit = self.queue.commit
        for message in messages:
            commit(message.id)
        if self._waiters:
            self._feed_waiters()

    def _withdraw(self, message: Message) -> None:
        if message.id in self.queue and message.state == PENDING:
            self.queue.withdraw(message.id)
        if message.key is not None:
            self.idempotency.forget(message.key, message.id)

    def _settle(self, message_id: str, reason: BaseException | None) -> None:
        for waiting in self._outcomes.pop(message_id, []):
            if reason is None:
                waiting.callback(None)
            else:
                waiting.errback(NotReplicated(str(reason)))

    def _outcome_of(self, message_id: str) -> Deferred:
        """Fires when ``message_id`` is accepted (at once if it already is)."""
        if message_id in self._outcomes:
            waiting: Deferred = Deferred()
            self._outcomes[message_id].append(waiting)
            return waiting
        return succeed(None)

    # -- delivery ------------------------------------------------------------

    async def get(self, visibility: float, wait: float = 0.0, count: int = 1) -> list[Any]:
        """Lease up to ``count`` messages; wait up to ``wait`` s for the first.

        Served from this node's queue, else from a peer with ready work.
        Returns an empty list when nothing became ready in time.  Cancelling
        (client gone) forgets the waiter.
        """
        deadline = self.clock.seconds() + wait
        taken: list[Any] = self._take(count, visibility)
        if not taken and self.cluster is not None:
            taken = await self.cluster.take_remote(count, visibility)
            taken = taken or self._take(count, visibility)
        remaining = deadline - self.clock.seconds()
        if taken or remaining <= 0 or self.not_ready_reason == "shutting_down":
            return taken
        waiter = _Waiter(count, visibility)
        waiter.deferred = Deferred(lambda _d: self._drop_waiter(waiter))
        waiter.timer = self.clock.callLater(remaining, self._wait_over, waiter)
        self._waiters.append(waiter)
        return await waiter.deferred

    def get_now(self, visibility: float, wait: float = 0.0,
                count: int = 1) -> list[Any] | Deferred:
        """:meth:`get`, answered at once when this node has ready work (or
        nothing can come): a list, or else a Deferred that fires with one."""
        taken = self._take(count, visibility)
        if taken or (self.cluster is None and wait <= 0):
            return taken
        return Deferred.fromCoroutine(self.get(visibility, wait, count))

    def take_own(self, count: int, visibility: float) -> list[Message]:
        return self._take(count, visibility)

    def has_waiters(self) -> bool:
        return bool(self._waiters)

    def claim_waiter(self) -> _Waiter | None:
        """Take the first parked long poll out of line to serve it remotely."""
        return self._waiters.popleft() if self._waiters else None

    def answer_waiter(self, waiter: _Waiter, taken: list[Any]) -> bool:
        """Answer a claimed waiter; False (and back in line) if ``taken`` is
        empty.  Messages for a waiter that went away meanwhile come back
        when their lease runs out."""
        if waiter.deferred.called:
            return bool(taken)
        if not taken:
            if waiter.timer is not None and waiter.timer.active():
                self._waiters.appendleft(waiter)
            else:
                waiter.deferred.callback([])
            return False
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        waiter.timer = None
        waiter.deferred.callback(taken)
        return True

    def _take(self, count: int, visibility: float) -> list[Message]:
        queue = self.queue
        if self.fenced or not queue.ready:
            return []
        now = self.clock.seconds()
        taken = []
        for _ in range(count):
            message = queue.take(now, visibility)
            if message is None:
                break
            taken.append(message)
        if taken:
            self._schedule_expiry(now + visibility)
        return taken

    def _wait_over(self, waiter: _Waiter) -> None:
        waiter.timer = None
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        if not waiter.deferred.called:
            waiter.deferred.callback([])

    def _drop_waiter(self, waiter: _Waiter) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        waiter.timer = None

    def _feed_waiters(self) -> None:
        while self._waiters and self.queue.ready:
            waiter = self._waiters.popleft()
            taken = self._take(waiter.count, waiter.visibility)
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
            waiter.timer = None
            waiter.deferred.callback(taken)

    def ack_now(self, message_id: str) -> Deferred | None:
        """:meth:`ack`, done at once for a message of this node's queue:
        None, or else a Deferred."""
        message = self.queue.get(message_id)  # our queue holds our ids only
        if message is not None and message.state != PENDING and not self.fenced:
            self.ack_own(message_id)
            return None
        return Deferred.fromCoroutine(self.ack(message_id))

    async def ack(self, message_id: str) -> None:
        """Ack a message of any owner (the cluster forwards or tombstones)."""
        try:
            mid = parse_id(message_id)
        except ValueError:
            raise UnknownMessage(message_id) from None
        if mid.node == self.node_id and self.fenced:
            raise NotReady(self.not_ready_reason or "fenced")
        message = self.queue.get(message_id)
        if message is not None and message.state != PENDING:
            self.ack_own(message_id)
        elif self.cluster is not None:
            await self.cluster.ack_elsewhere(message_id, mid)
        else:
            raise UnknownMessage(message_id)

    def ack_own(self, message_id: str) -> Message:
        """Ack a message of this node's queue and tell the peers."""
        message = self.forget_acked(message_id)
        if self.cluster is not None:
            self.cluster.own_acked(message)
        return message

    def forget_acked(self, message_id: str) -> Message:
        """Drop an acked message from this node's queue."""
        message = self.queue.ack(message_id)
        if message.key is not None:
            self.idempotency.released(message.key, self.clock.seconds())
        return message

    def lease_now(self, message_id: str, visibility: float) -> Deferred | None:
        """Nack (``visibility`` 0) or touch, done at once for a message of
        this node's queue: None, or else a Deferred."""
        if message_id in self.queue and not self.fenced:  # our ids only
            self.change_own_lease(message_id, visibility)
            return None
        return Deferred.fromCoroutine(self._change_lease(message_id, visibility))

    async def _change_lease(self, message_id: str, visibility: float) -> None:
        try:
            mid = parse_id(message_id)
        except ValueError:
            raise UnknownMessage(message_id) from None
        if mid.node == self.node_id or self.cluster is None:
            if self.fenced:
                raise NotReady(self.not_ready_reason or "fenced")
            self.change_own_lease(message_id, visibility)
        else:
            await self.cluster.lease_elsewhere(message_id, mid, visibility)

    def change_own_lease(self, message_id: str, visibility: float) -> Message:
        """Nack (``visibility`` 0) or touch a message of this node's queue."""
        if visibility <= 0:
            message = self.queue.nack(message_id)
            self._feed_waiters()
        else:
            now = self.clock.seconds()
            message = self.queue.touch(message_id, now, visibility)
            self._schedule_expiry(now + visibility)
        return message

    def lookup(self, message_id: str) -> Message:
        message = self.queue.get(message_id)
        if message is None or message.state == PENDING:
            raise UnknownMessage(message_id)
        return message

    # -- the lease timer -----------------------------------------------------

    def _schedule_expiry(self, added: float | None = None) -> None:
        """Set the one lease timer for the earliest live lease.  ``added``:
        the deadline of a lease just given, when that is all that changed."""
        timer = self._lease_timer
        if (added is not None and timer is not None and timer.getTime() <= added
                and timer.active()):
            return  # due no later than the new lease: nothing to move
        deadline = self.queue.next_deadline()
        if deadline is None:
            if timer is not None and timer.active():
                timer.cancel()
            self._lease_timer = None
            return
        if timer is not None and timer.active():
            if timer.getTime() <= deadline:
                return
            timer.cancel()
        delay = max(0.0, deadline - self.clock.seconds())
        self._lease_timer = self.clock.callLater(delay, self._expire_leases)

    def _expire_leases(self) -> None:
        self._lease_timer = None
        if self.queue.expire(self.clock.seconds()):
            self._feed_waiters()
        self._schedule_expiry()

    # -- lifecycle and stats -------------------------------------------------

    def shutdown(self) -> None:
        """Stop taking work; answer parked long polls with nothing."""
        self.not_ready_reason = "shutting_down"
        self._answer_all_waiters()
        if self.cluster is not None:
            self.cluster.stop()
        if self._lease_timer is not None and self._lease_timer.active():
            self._lease_timer.cancel()
        self._lease_timer = None

    def _answer_all_waiters(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
            waiter.timer = None
            waiter.deferred.callback([])

    def stats(self) -> dict[str, Any]:
        queue = self.queue
        return {
            "node": self.node_id,
            "epoch": self.epoch,
            "ready_to_serve": self.readiness() is None,
            "not_ready_reason": self.readiness(),
            "size": queue.size,
            "depth": queue.depth,
            "ready": queue.ready,
            "leased": queue.leased,
            "pending": queue.pending,
            "min_copies": self.min_copies,
            "waiting_gets": len(self._waiters),
            "counters": queue.counters.as_dict(),
            "peers": self.cluster.peer_stats() if self.cluster is not None else {},
        }

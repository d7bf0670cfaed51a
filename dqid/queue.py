"""The bounded work queue of one node: pure state, time passed in.

A message is *pending* while it is being replicated, *ready* when it may be
delivered, *leased* while a worker holds it, *delayed* until its due time
and *held* once it was delivered ``max_deliveries`` times without an ack
(a poison message: kept until a person kicks or acks it).  Capacity counts
all five.  Ready messages are delivered in the order they entered the
queue; a message whose lease expires (or is nacked) goes back to its
original place in line, and a delayed one joins the end of the line when
it is due.  Each lease has its own receipt; a nack or touch that names a
receipt acts only on that lease.  The only way out of the queue is
:meth:`WorkQueue.ack` (or :meth:`WorkQueue.withdraw` for a push that was
never accepted).

Nothing here imports the reactor: every call that depends on time takes
``now`` (seconds, any origin; due times use the same one).
"""

from __future__ import annotations

import heapq
import secrets
from collections import deque
from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterator, Mapping, Sequence

PENDING = 0
READY = 1
LEASED = 2
GONE = 3  # acked or withdrawn: no longer in the queue
HELD = 4
DELAYED = 5

# What GET /messages/ID answers in Dqid-State.
STATE_NAMES = {
    PENDING: "pending",
    READY: "ready",
    LEASED: "leased",
    DELAYED: "delayed",
    HELD: "held",
}


class QueueFull(Exception):
    """The queue holds ``size`` messages already."""


class UnknownMessage(KeyError):
    """No message with that id is queued (acked, withdrawn or never pushed)."""


class NotLeased(Exception):
    """The message is queued but not leased, so its lease cannot change."""


class LeaseLost(NotLeased):
    """The receipt is not the current lease's: that lease expired or was
    nacked, or the message was delivered again since.  (A kind of
    :class:`NotLeased`: catch it first to answer ``lease_lost``.)"""


class NotHeld(Exception):
    """The message is queued but not held, so it cannot be kicked."""


class Lease(float):
    """A lease's deadline that carries the lease's receipt.

    While a message is leased its ``deadline`` slot holds one of these: a
    float like any deadline, so the receipt takes room only in leased
    messages, not a slot in every message.  It also keeps the message's
    enqueue time (``entered``) while the lease lasts.
    """

    __slots__ = ("receipt", "entered")

    receipt: str
    entered: float


class Message:
    """One queued message: slots only, a queue may hold many of them.

    Most messages have neither a Content-Type nor an Idempotency-Key; those
    two fields take room only in the messages that have them
    (:class:`TaggedMessage`).  Make messages with :func:`new_message`.

    ``deadline`` holds the time that matters in the message's state: the
    lease's deadline (a :class:`Lease`, with its receipt and enqueue time)
    while leased, the due time while delayed, the enqueue time while ready
    or held (0.0 when it was not told), and 0.0 while pending.
    """

    __slots__ = ("id", "body", "order", "deliveries", "state", "deadline")

    content_type: str | None = None
    key: str | None = None

    def __init__(self, id: str, body: bytes, order: int, deliveries: int = 0) -> None:
        self.id = id
        self.body = body
        self.order = order
        self.deliveries = deliveries
        self.state = PENDING
        self.deadline = 0.0

    @property
    def receipt(self) -> str | None:
        """The current lease's receipt, or None when not leased."""
        if self.state == LEASED:
            return getattr(self.deadline, "receipt", None)
        return None

    @property
    def due(self) -> float | None:
        """When a delayed message joins the line (or, while pending, will:
        a push with a delay), or None."""
        state = self.state
        if state == DELAYED or (state == PENDING and self.deadline):
            return self.deadline
        return None

    @property
    def held(self) -> bool:
        return self.state == HELD

    @property
    def state_name(self) -> str:
        return STATE_NAMES[self.state]

    def __lt__(self, other: "Message") -> bool:
        """Place in line: order, then id (restored orders may repeat)."""
        if self.order != other.order:
            return self.order < other.order
        return self.id < other.id

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(id={self.id!r}, order={self.order}, "
                f"state={self.state}, deliveries={self.deliveries}, "
                f"deadline={self.deadline}, content_type={self.content_type!r}, "
                f"key={self.key!r})")


class TaggedMessage(Message):
    """A message with a Content-Type or an Idempotency-Key."""

    __slots__ = ("content_type", "key")

    def __init__(self, id: str, body: bytes, order: int, deliveries: int,
                 content_type: str | None, key: str | None) -> None:
        Message.__init__(self, id, body, order, deliveries)
        self.content_type = content_type
        self.key = key


def new_message(message_id: str, body: bytes, content_type: str | None, order: int,
                key: str | None = None, deliveries: int = 0) -> Message:
    if content_type is None and key is None:
        return Message(message_id, body, order, deliveries)
    return TaggedMessage(message_id, body, order, deliveries, content_type, key)


@dataclass(slots=True)
class Counters:
    pushed: int = 0
    delivered: int = 0
    redelivered: int = 0
    acked: int = 0
    nacked: int = 0
    expired: int = 0
    rejected_full: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "pushed": self.pushed,
            "delivered": self.delivered,
            "redelivered": self.redelivered,
            "acked": self.acked,
            "nacked": self.nacked,
            "expired": self.expired,
            "rejected_full": self.rejected_full,
        }


# Stale entries (acked in place) tolerated in a line before it is compacted.
_SLACK = 64
# Enqueue times this close to the last one share its float object: a queue
# of many messages keeps few of them (and the age is at most this much off).
STAMP_RESOLUTION = 0.1


class WorkQueue:
    """The messages of one node's queue and their three lines.

    The ready line is a deque of messages while they come in order (the
    common case: pushes), plus a small heap for messages that come back out
    of order (expired, nacked, kicked, restored).  The lease line, the one
    timer structure for every lease, has the same shape for (deadline, id)
    pairs: with one visibility, deadlines grow as leases are given out.  The
    due line of delayed messages has it too, in (due time, place) order.
    Entries that went stale (a ready or delayed message acked in place; an
    acked, nacked or touched lease) are skipped when they reach the front,
    and a line is compacted when its stale entries grow many, so memory
    follows what is queued.  Per message that is one ``Message``, its entry
    in the id map and one line entry: no tuples, no per-message timers.
    Held messages are in no line, only in a map of their own.

    ``max_deliveries`` (0: no limit): a message delivered that many times
    whose lease ends without an ack (nack, expiry, release) is held.
    ``receipt_prefix`` starts every receipt this queue gives; by default a
    random one, so a replacement queue never repeats a receipt.
    """

    __slots__ = ("size", "counters", "max_deliveries", "_messages", "_ready", "_ready_heap",
                 "_ready_count", "_ready_stale", "_leases", "_lease_heap", "_leased",
                 "_pending", "_next_order", "_receipt_prefix", "_leases_given", "_held",
                 "_due_line", "_due_heap", "_delayed", "_pending_due", "_stamp",
                 "changes", "by_id")

    def __init__(
        self,
        size: int,
        counters: Counters | None = None,
        *,
        max_deliveries: int = 0,
        receipt_prefix: str | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        if max_deliveries < 0:
            raise ValueError("max_deliveries must be 0 (no limit) or more")
        self.size = size
        self.counters = counters if counters is not None else Counters()
        self.max_deliveries = max_deliveries
        self._messages: dict[str, Message] = {}
        # Every message held (any state), by id: a read-only view.
        self.by_id: Mapping[str, Message] = MappingProxyType(self._messages)
        self._ready: deque[Message] = deque()
        self._ready_heap: list[Message] = []
        self._ready_count = 0
        self._ready_stale = 0
        self._leases: deque[tuple[float, str]] = deque()
        self._lease_heap: list[tuple[float, str]] = []
        self._leased = 0
        self._pending = 0
        self._next_order = 0
        self._receipt_prefix = (
            receipt_prefix if receipt_prefix is not None else secrets.token_urlsafe(6))
        self._leases_given = 0
        self._held: dict[str, Message] = {}
        self._due_line: deque[Message] = deque()
        self._due_heap: list[tuple[float, Message]] = []
        self._delayed = 0
        self._pending_due: dict[str, float] = {}  # reserved with a due time
        self._stamp = 0.0  # the last enqueue time given out
        # When a list: every message whose deliveries, held state or due
        # time changed is appended (for replicas to learn); None: not kept.
        self.changes: list[Message] | None = None

    def __repr__(self) -> str:
        return (f"WorkQueue(size={self.size}, depth={self.depth}, ready={self.ready}, "
                f"leased={self.leased}, pending={self.pending}, delayed={self.delayed}, "
                f"held={self.held})")

    # -- sizes ---------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Pending + ready + leased + delayed + held: what counts against ``size``."""
        return len(self._messages)

    @property
    def ready(self) -> int:
        return self._ready_count

    @property
    def leased(self) -> int:
        return self._leased

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def delayed(self) -> int:
        return self._delayed

    @property
    def held(self) -> int:
        return len(self._held)

    def room(self) -> int:
        return max(0, self.size - len(self._messages))

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._messages

    def __len__(self) -> int:
        return len(self._messages)

    def __iter__(self) -> Iterator[str]:
        """The ids of every message held (any state)."""
        return iter(self._messages)

    def get(self, message_id: str) -> Message | None:
        return self._messages.get(message_id)

    def messages(self) -> Iterator[Message]:
        return iter(self._messages.values())

    def peek(self, message_id: str) -> tuple[Message, str]:
        """A queued message (any state) and its state's name, changing nothing."""
        message = self._messages.get(message_id)
        if message is None:
            raise UnknownMessage(message_id)
        return message, STATE_NAMES[message.state]

    def held_messages(self, count: int) -> list[Message]:
        """Up to ``count`` held messages, oldest (earliest in line) first."""
        if count <= 0 or not self._held:
            return []
        return heapq.nsmallest(count, self._held.values())

    # -- entering the queue --------------------------------------------------

    def reserve(
        self,
        message_id: str,
        body: bytes,
        content_type: str | None = None,
        key: str | None = None,
        due: float | None = None,
    ) -> Message:
        """Take a slot for a push that is not accepted yet (pending).

        With ``due``, the commit makes it delayed until then, not ready.
        """
        messages = self._messages
        if len(messages) >= self.size:
            self.counters.rejected_full += 1
            raise QueueFull(f"queue holds {len(messages)} of {self.size}")
        if message_id in messages:
            raise ValueError(f"duplicate message id {message_id!r}")
        message = new_message(message_id, body, content_type, self._next_order, key)
        self._next_order += 1
        messages[message_id] = message
        self._pending += 1
        if due is not None:
            self._pending_due[message_id] = due
            message.deadline = due  # what a replica of the pending push holds
        return message

    def reserve_many(
        self, entries: list[tuple[str, bytes, str | None, str | None]]
        | list[tuple[str, bytes, str | None, str | None, float | None]]
    ) -> list[Message]:
        """Reserve all of ``entries`` or, if they do not all fit, none.

        Each entry is ``(id, body, content_type, key)`` with, optionally, a
        fifth item: its due time (or None).
        """
        if len(self._messages) + len(entries) > self.size:
            self.counters.rejected_full += len(entries)
            raise QueueFull(f"queue holds {len(self._messages)} of {self.size}")
        ids = [entry[0] for entry in entries]
        if len(set(ids)) != len(ids) or not self._messages.keys().isdisjoint(ids):
            raise ValueError("duplicate message id")
        return [self.reserve(*entry) for entry in entries]

    def commit(self, message_id: str, due: float | None = None, *,
               now: float | None = None) -> Message:
        """A pending message is accepted: it becomes ready, or delayed until
        ``due`` (given here or when it was reserved).  ``now``: its enqueue
        time (:meth:`oldest_ready_since`)."""
        message = self._messages.get(message_id)
        if message is None or message.state != PENDING:
            raise UnknownMessage(message_id)
        self._pending -= 1
        self.counters.pushed += 1
        if self._pending_due:
            reserved_due = self._pending_due.pop(message_id, None)
            if due is None:
                due = reserved_due
        if due is None:
            self._make_ready(message, self._stamped(now))
        else:
            self._delay(message, due)
        return message

    def commit_many(self, messages: Sequence[Message], now: float | None = None) -> bool:
        """Commit pending ``messages`` (reserved here), as :meth:`commit`
        each with its reserved due time; True if one of them is delayed."""
        if self._pending_due:  # some were reserved with a due time
            return any([self.commit(m.id, now=now).state == DELAYED for m in messages])
        held = self._messages
        for message in messages:
            if message.state != PENDING or held.get(message.id) is not message:
                raise UnknownMessage(message.id)
        entered = self._stamped(now)
        self._pending -= len(messages)
        self.counters.pushed += len(messages)
        make_ready = self._make_ready
        for message in messages:
            make_ready(message, entered)
        return False

    def withdraw(self, message_id: str) -> Message:
        """A pending message was not accepted: free its slot."""
        message = self._messages.get(message_id)
        if message is None or message.state != PENDING:
            raise UnknownMessage(message_id)
        del self._messages[message_id]
        self._pending -= 1
        if self._pending_due:
            self._pending_due.pop(message_id, None)
        return message

    def push(
        self,
        message_id: str,
        body: bytes,
        content_type: str | None = None,
        key: str | None = None,
        due: float | None = None,
        *,
        now: float | None = None,
    ) -> Message:
        """Reserve and accept at once (no replication): ready, or delayed
        until ``due``.  ``now``: its enqueue time."""
        message = self.reserve(message_id, body, content_type, key)
        self._pending -= 1
        self.counters.pushed += 1
        if due is None:
            self._make_ready(message, self._stamped(now))
        else:
            self._delay(message, due)
        return message

    def restore(
        self,
        message_id: str,
        body: bytes,
        content_type: str | None = None,
        key: str | None = None,
        deliveries: int = 0,
        order: int | None = None,
        *,
        held: bool = False,
        due: float | None = None,
        now: float | None = None,
    ) -> Message:
        """Put back an accepted message (recovery), even over ``size``:
        held if ``held``, else delayed until ``due`` if given, else ready.
        ``now``: its enqueue time here.

        Recovered messages were acknowledged to their producers, so they are
        never refused for lack of room.  ``order`` places them in line (the
        caller gives older messages smaller numbers); without it they go last.
        A message already queued is kept as it is.
        """
        existing = self._messages.get(message_id)
        if existing is not None:
            return existing
        if order is None:
            order = self._next_order
        self._next_order = max(self._next_order, order + 1)
        message = new_message(message_id, body, content_type, order, key, deliveries)
        self._messages[message_id] = message
        if held:
            self._hold(message, self._stamped(now))
        elif due is not None:
            self._delay(message, due)
        else:
            self._make_ready(message, self._stamped(now))
        return message

    # -- delivery ------------------------------------------------------------

    def take(self, now: float, visibility: float) -> Message | None:
        """Lease the first ready message for ``visibility`` seconds, with a
        new receipt (``message.receipt``)."""
        if not self._ready_count:
            return None
        ready, heap = self._ready, self._ready_heap
        # Only messages acked in place (GONE) are stale in the ready line.
        while ready and ready[0].state != READY:
            ready.popleft()
            self._ready_stale -= 1
        while heap and heap[0].state != READY:
            heapq.heappop(heap)
            self._ready_stale -= 1
        if ready and (not heap or ready[0] < heap[0]):
            message = ready.popleft()
        else:
            message = heapq.heappop(heap)
        self._ready_count -= 1
        if not self._ready_count and self._ready_stale:  # only stale ones left
            ready.clear()
            heap.clear()
            self._ready_stale = 0
        message.state = LEASED
        deliveries = message.deliveries = message.deliveries + 1
        if self.changes is not None:
            self.changes.append(message)
        self._leases_given += 1
        lease = Lease(now + visibility)
        lease.receipt = self._receipt_prefix + format(self._leases_given, "x")
        lease.entered = message.deadline  # the enqueue time, while ready
        message.deadline = lease
        self._leased += 1
        self._add_lease(lease, message.id)
        counters = self.counters
        counters.delivered += 1
        if deliveries > 1:
            counters.redelivered += 1
        return message

    def ack(self, message_id: str) -> Message:
        """Remove a queued message (any state but pending) for good."""
        message = self._messages.get(message_id)
        if message is None or message.state == PENDING:
            raise UnknownMessage(message_id)
        del self._messages[message_id]
        state = message.state
        message.state = GONE
        if state == LEASED:
            self._leased -= 1
            self._lease_gone()
        elif state == READY:
            self._ready_count -= 1
            self._ready_gone()
        elif state == HELD:
            del self._held[message_id]
        else:  # DELAYED
            self._delayed -= 1
            self._due_gone()
        self.counters.acked += 1
        return message

    def nack(
        self,
        message_id: str,
        receipt: str | None = None,
        *,
        now: float | None = None,
        delay: float = 0.0,
    ) -> Message:
        """End a lease without an ack: the message is ready again now (at
        its place in line), or delayed until ``now + delay``, or held once
        it has been delivered ``max_deliveries`` times.

        With ``receipt``, only the current lease may be nacked (one that has
        not run out by ``now``, when given): else :class:`LeaseLost`.
        Without one, a message that is not leased is left as it is.
        """
        if delay < 0:
            raise ValueError("delay must not be negative")
        if delay and now is None:
            raise ValueError("a delay needs now")
        message = self._messages.get(message_id)
        if message is None or message.state == PENDING:
            raise UnknownMessage(message_id)
        if receipt is not None:
            if not self._holds_lease(message, receipt, now):
                raise LeaseLost(message_id)
        elif message.state != LEASED:
            return message
        self._leased -= 1
        self.counters.nacked += 1
        self._lease_ended(message, now + delay if delay and now is not None else None)
        if delay and self.changes is not None:
            self.changes.append(message)
        self._lease_gone()
        return message

    def touch(
        self, message_id: str, now: float, visibility: float, receipt: str | None = None
    ) -> Message:
        """Set a leased message's deadline to ``now + visibility``; its
        receipt stays.  With ``receipt``, only a current lease (not run out
        by ``now``) with that receipt: else :class:`LeaseLost`."""
        message = self._messages.get(message_id)
        if message is None or message.state == PENDING:
            raise UnknownMessage(message_id)
        if receipt is not None:
            if not self._holds_lease(message, receipt, now):
                raise LeaseLost(message_id)
        elif message.state != LEASED:
            raise NotLeased(message_id)
        lease = Lease(now + visibility)
        lease.receipt = message.deadline.receipt  # type: ignore[union-attr]
        lease.entered = message.deadline.entered  # type: ignore[union-attr]
        message.deadline = lease
        self._add_lease(lease, message_id)
        self._lease_gone()  # the old deadline's entry
        return message

    def kick(self, message_id: str) -> Message:
        """Make a held message ready again, at its place in line."""
        message = self._messages.get(message_id)
        if message is None or message.state == PENDING:
            raise UnknownMessage(message_id)
        if message.state != HELD:
            raise NotHeld(message_id)
        del self._held[message_id]
        self._make_ready(message, message.deadline)  # held: the enqueue time
        if self.changes is not None:
            self.changes.append(message)
        return message

    def release_all_leases(self) -> int:
        """End every lease (a restarted node voids leases): ready again, or
        held when delivered ``max_deliveries`` times."""
        leased = [m for m in self._messages.values() if m.state == LEASED]
        leased.sort()
        for message in leased:
            self._leased -= 1
            self._lease_ended(message, None)
        self._leases.clear()
        self._lease_heap.clear()
        return len(leased)

    # -- time ------------------------------------------------------------------

    def expire(self, now: float) -> int:
        """End every lease whose deadline has passed (ready again, or held
        when delivered ``max_deliveries`` times); how many ended."""
        expired = 0
        while (message := self._first_lease(now)) is not None:
            self._leased -= 1
            self.counters.expired += 1
            self._lease_ended(message, None)
            expired += 1
        if expired:
            self._lease_gone()
        return expired

    def promote_due(self, now: float) -> int:
        """Every delayed message due by ``now`` joins the end of the line,
        in due-time order; how many did."""
        promoted = 0
        while (message := self._first_due(now)) is not None:
            self._delayed -= 1
            message.order = self._next_order
            self._next_order += 1
            self._make_ready(message, message.deadline)  # enqueued when it was due
            promoted += 1
        return promoted

    def advance(self, now: float) -> int:
        """:meth:`expire` and :meth:`promote_due`: what the node's one timer
        does when :meth:`next_wakeup` comes; how many messages changed."""
        return self.expire(now) + self.promote_due(now)

    def oldest_ready_since(self) -> float | None:
        """The enqueue time of the message first in the ready line (the
        next one delivered): when it was pushed, restored or became due, as
        the ``now`` of that call said (to :data:`STAMP_RESOLUTION`); a
        message that comes back (lease over, kicked) keeps its time.  None
        when nothing is ready; 0.0 when that time was not told."""
        if not self._ready_count:
            return None
        ready, heap = self._ready, self._ready_heap
        while ready and ready[0].state != READY:  # as take() drops them
            ready.popleft()
            self._ready_stale -= 1
        while heap and heap[0].state != READY:
            heapq.heappop(heap)
            self._ready_stale -= 1
        if ready and (not heap or ready[0] < heap[0]):
            return ready[0].deadline
        return heap[0].deadline if heap else None

    def next_deadline(self) -> float | None:
        """The earliest live lease deadline, or None when nothing is leased."""
        message = self._first_lease(None)
        return None if message is None else float(message.deadline)

    def next_due(self) -> float | None:
        """The earliest due time of a delayed message, or None."""
        message = self._first_due(None)
        return None if message is None else message.deadline

    def next_wakeup(self) -> float | None:
        """When :meth:`advance` next has work: the earlier of
        :meth:`next_deadline` and :meth:`next_due`, or None."""
        deadline = self.next_deadline()
        due = self.next_due()
        if deadline is None:
            return due
        if due is None:
            return deadline
        return min(deadline, due)

    # -- state changes -----------------------------------------------------------

    def _stamped(self, now: float | None) -> float:
        """The enqueue time to keep for ``now`` (0.0: not told): the last
        one given out when it is less than STAMP_RESOLUTION older (one
        float object for many messages)."""
        if now is None:
            return 0.0
        last = self._stamp
        if 0.0 <= now - last < STAMP_RESOLUTION:
            return last
        self._stamp = now
        return now

    def _holds_lease(self, message: Message, receipt: str, now: float | None) -> bool:
        """Is ``receipt`` the current lease's, not run out by ``now``?"""
        if message.state != LEASED:
            return False
        lease = message.deadline
        return (getattr(lease, "receipt", None) == receipt
                and (now is None or now < lease))

    def _lease_ended(self, message: Message, due: float | None) -> None:
        """A lease ended without an ack (the caller counts it)."""
        limit = self.max_deliveries
        entered = getattr(message.deadline, "entered", 0.0)
        if limit and message.deliveries >= limit:
            self._hold(message, entered)
        elif due is not None:
            self._delay(message, due)
        else:
            self._make_ready(message, entered)

    def _hold(self, message: Message, entered: float) -> None:
        message.state = HELD
        message.deadline = entered
        self._held[message.id] = message
        if self.changes is not None:
            self.changes.append(message)

    # -- the ready line --------------------------------------------------------

    def _make_ready(self, message: Message, entered: float) -> None:
        """``entered``: the message's enqueue time (0.0: not known)."""
        message.state = READY
        message.deadline = entered
        self._ready_count += 1
        ready = self._ready
        if not ready or ready[-1].order < message.order:
            ready.append(message)
        else:  # out of order: back to its place in line
            heapq.heappush(self._ready_heap, message)

    def _ready_gone(self) -> None:
        """A ready message was acked in place: its entry went stale."""
        if not self._ready_count:  # every entry is stale
            self._ready.clear()
            self._ready_heap.clear()
            self._ready_stale = 0
            return
        self._ready_stale += 1
        # Stale entries hold acked messages: keep them few (amortised O(1)).
        if self._ready_stale > _SLACK and self._ready_stale * 8 > self._ready_count:
            self._ready = deque(m for m in self._ready if m.state == READY)
            self._ready_heap = [m for m in self._ready_heap if m.state == READY]
            heapq.heapify(self._ready_heap)
            self._ready_stale = 0

    # -- the due line ------------------------------------------------------------
    # Ordered by (due time, place in line).  A message is delayed once per
    # entry: the entry leaves the line when the message is promoted, so the
    # only stale entries are of messages acked while delayed (GONE).

    def _delay(self, message: Message, due: float) -> None:
        message.state = DELAYED
        due = message.deadline = float(due)
        self._delayed += 1
        line = self._due_line
        if not line or (line[-1].deadline, line[-1]) < (due, message):
            line.append(message)
        else:
            heapq.heappush(self._due_heap, (due, message))

    def _first_due(self, due: float | None) -> Message | None:
        """The delayed message first in the due line, dropping stale entries
        on the way; with ``due``, only if it is due by then, and then its
        entry is removed."""
        line, heap = self._due_line, self._due_heap
        while line and line[0].state != DELAYED:
            line.popleft()
        while heap and heap[0][1].state != DELAYED:
            heapq.heappop(heap)
        if line and (not heap or (line[0].deadline, line[0]) < heap[0]):
            message = line[0]
            if due is not None:
                if message.deadline > due:
                    return None
                line.popleft()
            return message
        if heap:
            message = heap[0][1]
            if due is not None:
                if message.deadline > due:
                    return None
                heapq.heappop(heap)
            return message
        return None

    def _due_gone(self) -> None:
        """A delayed message was acked: compact when stale entries dominate."""
        line, heap = self._due_line, self._due_heap
        if not self._delayed:  # every entry is stale
            line.clear()
            heap.clear()
            return
        stale = len(line) + len(heap) - self._delayed
        if stale > _SLACK and stale > self._delayed:
            self._due_line = deque(m for m in line if m.state == DELAYED)
            self._due_heap = [entry for entry in heap if entry[1].state == DELAYED]
            heapq.heapify(self._due_heap)

    # -- the lease line --------------------------------------------------------
    # Entries are (deadline, message id): a stale one (acked, nacked, expired
    # or touched since) keeps no message alive, and is known by the message
    # being gone, not leased, or leased until another deadline.

    def _add_lease(self, deadline: float, message_id: str) -> None:
        leases = self._leases
        if not leases or leases[-1][0] <= deadline:
            leases.append((deadline, message_id))
        else:
            heapq.heappush(self._lease_heap, (deadline, message_id))

    def _live_lease(self, entry: tuple[float, str]) -> Message | None:
        message = self._messages.get(entry[1])
        if message is not None and message.state == LEASED and message.deadline == entry[0]:
            return message
        return None

    def _first_lease(self, due: float | None) -> Message | None:
        """The live lease with the earliest deadline, dropping stale entries
        on the way; with ``due``, only if that deadline is ``<= due``, and
        then its entry is removed."""
        leases, heap = self._leases, self._lease_heap
        live = self._live_lease
        while True:
            if leases and (not heap or leases[0][0] <= heap[0][0]):
                entry = leases[0]
                in_heap = False
            elif heap:
                entry = heap[0]
                in_heap = True
            else:
                return None
            message = live(entry)
            if message is not None and (due is None or entry[0] > due):
                return None if due is not None else message
            if in_heap:
                heapq.heappop(heap)
            else:
                leases.popleft()
            if message is not None:  # due: taken out of the line
                return message

    def _lease_gone(self) -> None:
        """A lease ended or moved: compact when stale entries dominate."""
        leases, heap = self._leases, self._lease_heap
        if not self._leased:  # every entry is stale
            leases.clear()
            heap.clear()
            return
        stale = len(leases) + len(heap) - self._leased
        if stale > _SLACK and stale > self._leased:
            live = sorted({entry for entry in (*leases, *heap) if self._live_lease(entry)})
            self._leases = deque(live)
            self._lease_heap = []

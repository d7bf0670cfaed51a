"""The bounded work queue of one node: pure state, time passed in.

A message is *pending* while it is being replicated, *ready* when it may be
delivered and *leased* while a worker holds it.  Capacity counts all three.
Ready messages are delivered in the order they entered the queue; a message
whose lease expires (or is nacked) goes back to its original place in line.
The only way out of the queue is :meth:`WorkQueue.ack` (or
:meth:`WorkQueue.withdraw` for a push that was never accepted).

Nothing here imports the reactor: every call that depends on time takes
``now`` (seconds, any monotonic origin).
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass
from typing import Iterator

PENDING = 0
READY = 1
LEASED = 2
GONE = 3


class QueueFull(Exception):
    """The queue holds ``size`` messages already."""


class UnknownMessage(KeyError):
    """No message with that id is queued (acked, withdrawn or never pushed)."""


class NotLeased(Exception):
    """The message is queued but not leased, so its lease cannot change."""


class Message:
    """One queued message: slots only, a queue may hold many of them.

    Most messages have neither a Content-Type nor an Idempotency-Key; those
    two fields take room only in the messages that have them
    (:class:`TaggedMessage`).  Make messages with :func:`new_message`.
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


class WorkQueue:
    """The messages of one node's queue and their two lines.

    The ready line is a deque of messages while they come in order (the
    common case: pushes), plus a small heap for messages that come back out
    of order (expired, nacked, restored).  The lease line, the one timer
    structure for every lease, has the same shape for (deadline, id) pairs:
    with one visibility, deadlines grow as leases are given out.  Entries
    that went stale (a ready message acked in place; an acked, nacked or
    touched lease) are skipped when they reach the front, and a line is
    compacted when its stale entries grow many, so memory follows what is
    queued.  Per message that is one ``Message``, its entry in the id map
    and one line entry: no tuples, no per-message timers.
    """

    __slots__ = ("size", "counters", "_messages", "_ready", "_ready_heap", "_ready_count",
                 "_ready_stale", "_leases", "_lease_heap", "_leased", "_pending",
                 "_next_order")

    def __init__(self, size: int, counters: Counters | None = None) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self.size = size
        self.counters = counters if counters is not None else Counters()
        self._messages: dict[str, Message] = {}
        self._ready: deque[Message] = deque()
        self._ready_heap: list[Message] = []
        self._ready_count = 0
        self._ready_stale = 0
        self._leases: deque[tuple[float, str]] = deque()
        self._lease_heap: list[tuple[float, str]] = []
        self._leased = 0
        self._pending = 0
        self._next_order = 0

    def __repr__(self) -> str:
        return (f"WorkQueue(size={self.size}, depth={self.depth}, ready={self.ready}, "
                f"leased={self.leased}, pending={self.pending})")

    # -- sizes ---------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Ready + leased + pending: what counts against ``size``."""
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

    # -- entering the queue --------------------------------------------------

    def reserve(
        self,
        message_id: str,
        body: bytes,
        content_type: str | None = None,
        key: str | None = None,
    ) -> Message:
        """Take a slot for a push that is not accepted yet (pending)."""
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
        return message

    def reserve_many(
        self, entries: list[tuple[str, bytes, str | None, str | None]]
    ) -> list[Message]:
        """Reserve all of ``entries`` or, if they do not all fit, none."""
        if len(self._messages) + len(entries) > self.size:
            self.counters.rejected_full += len(entries)
            raise QueueFull(f"queue holds {len(self._messages)} of {self.size}")
        seen: set[str] = set()
        for message_id, *_rest in entries:
            if message_id in self._messages or message_id in seen:
                raise ValueError(f"duplicate message id {message_id!r}")
            seen.add(message_id)
        return [self.reserve(*entry) for entry in entries]

    def commit(self, message_id: str) -> Message:
        """A pending message is accepted: it becomes ready."""
        message = self._messages.get(message_id)
        if message is None or message.state != PENDING:
            raise UnknownMessage(message_id)
        self._pending -= 1
        self.counters.pushed += 1
        self._make_ready(message)
        return message

    def withdraw(self, message_id: str) -> Message:
        """A pending message was not accepted: free its slot."""
        message = self._messages.get(message_id)
        if message is None or message.state != PENDING:
            raise UnknownMessage(message_id)
        del self._messages[message_id]
        self._pending -= 1
        return message

    def push(
        self,
        message_id: str,
        body: bytes,
        content_type: str | None = None,
        key: str | None = None,
    ) -> Message:
        """Reserve and accept at once (no replication)."""
        message = self.reserve(message_id, body, content_type, key)
        self._pending -= 1
        self.counters.pushed += 1
        self._make_ready(message)
        return message

    def restore(
        self,
        message_id: str,
        body: bytes,
        content_type: str | None = None,
        key: str | None = None,
        deliveries: int = 0,
        order: int | None = None,
    ) -> Message:
        """Put back an accepted message (recovery): ready, even over ``size``.

        Recovered messages were acknowledged to their producers, so they are
        never refused for lack of room.  ``order`` places them in line (the
        caller gives older messages smaller numbers); without it they go last.
        """
        existing = self._messages.get(message_id)
        if existing is not None:
            return existing
        if order is None:
            order = self._next_order
        self._next_order = max(self._next_order, order + 1)
        message = new_message(message_id, body, content_type, order, key, deliveries)
        self._messages[message_id] = message
        self._make_ready(message)
        return message

    # -- delivery ------------------------------------------------------------

    def take(self, now: float, visibility: float) -> Message | None:
        """Lease the first ready message for ``visibility`` seconds."""
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
        deadline = message.deadline = now + visibility
        self._leased += 1
        self._add_lease(deadline, message.id)
        counters = self.counters
        counters.delivered += 1
        if deliveries > 1:
            counters.redelivered += 1
        return message

    def ack(self, message_id: str) -> Message:
        """Remove a ready or leased message for good."""
        message = self._messages.get(message_id)
        if message is None or message.state == PENDING:
            raise UnknownMessage(message_id)
        del self._messages[message_id]
        if message.state == LEASED:
            self._leased -= 1
            message.state = GONE
            self._lease_gone()
        else:
            self._ready_count -= 1
            message.state = GONE
            self._ready_gone()
        self.counters.acked += 1
        return message

    def nack(self, message_id: str) -> Message:
        """Make a leased message ready again now; no-op if it is ready."""
        message = self._messages.get(message_id)
        if message is None or message.state == PENDING:
            raise UnknownMessage(message_id)
        if message.state == LEASED:
            self._leased -= 1
            self.counters.nacked += 1
            self._make_ready(message)
            self._lease_gone()
        return message

    def touch(self, message_id: str, now: float, visibility: float) -> Message:
        """Set a leased message's deadline to ``now + visibility``."""
        message = self._messages.get(message_id)
        if message is None or message.state == PENDING:
            raise UnknownMessage(message_id)
        if message.state != LEASED:
            raise NotLeased(message_id)
        deadline = message.deadline = now + visibility
        self._add_lease(deadline, message_id)
        self._lease_gone()  # the old deadline's entry
        return message

    def release_all_leases(self) -> int:
        """Make every leased message ready (a restarted node voids leases)."""
        leased = [m for m in self._messages.values() if m.state == LEASED]
        leased.sort()
        for message in leased:
            self._leased -= 1
            self._make_ready(message)
        self._leases.clear()
        self._lease_heap.clear()
        return len(leased)

    def expire(self, now: float) -> int:
        """Make every lease whose deadline has passed ready again."""
        expired = 0
        while (message := self._first_lease(now)) is not None:
            self._leased -= 1
            self.counters.expired += 1
            self._make_ready(message)
            expired += 1
        if expired:
            self._lease_gone()
        return expired

    def next_deadline(self) -> float | None:
        """The earliest live lease deadline, or None when nothing is leased."""
        message = self._first_lease(None)
        return None if message is None else message.deadline

    # -- the ready line --------------------------------------------------------

    def _make_ready(self, message: Message) -> None:
        message.state = READY
        message.deadline = 0.0
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

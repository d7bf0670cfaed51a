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
from dataclasses import dataclass, field
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


@dataclass(slots=True, eq=False)
class Message:
    id: str
    body: bytes
    content_type: str | None
    order: int
    key: str | None = None
    deliveries: int = 0
    state: int = PENDING
    deadline: float = 0.0


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


@dataclass
class WorkQueue:
    size: int
    counters: Counters = field(default_factory=Counters)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError("size must be at least 1")
        self._messages: dict[str, Message] = {}
        # Ready messages by their place in line, (order, id): restored orders
        # may repeat, ids do not.  The heap holds places and may hold stale
        # ones (a ready message acked in place), skipped on pop.
        self._ready: dict[tuple[int, str], Message] = {}
        self._ready_heap: list[tuple[int, str]] = []
        # (deadline, place) per lease given out; stale entries (touched,
        # acked or nacked leases) are skipped by comparing the deadline.
        self._lease_heap: list[tuple[float, int, str]] = []
        self._next_order = 0
        self._pending = 0
        self._leased = 0

    # -- sizes ---------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Ready + leased + pending: what counts against ``size``."""
        return len(self._messages)

    @property
    def ready(self) -> int:
        return len(self._ready)

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
        return self.reserve_many([(message_id, body, content_type, key)])[0]

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
        reserved = []
        for message_id, body, content_type, key in entries:
            message = Message(message_id, body, content_type, self._next_order, key)
            self._next_order += 1
            self._messages[message_id] = message
            self._pending += 1
            reserved.append(message)
        return reserved

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
        self.reserve(message_id, body, content_type, key)
        return self.commit(message_id)

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
        message = Message(message_id, body, content_type, order, key, deliveries)
        self._messages[message_id] = message
        self._make_ready(message)
        return message

    # -- delivery ------------------------------------------------------------

    def take(self, now: float, visibility: float) -> Message | None:
        """Lease the first ready message for ``visibility`` seconds."""
        while self._ready_heap:
            place = heapq.heappop(self._ready_heap)
            message = self._ready.pop(place, None)
            if message is None:
                continue
            message.state = LEASED
            message.deliveries += 1
            message.deadline = now + visibility
            self._leased += 1
            heapq.heappush(self._lease_heap, (message.deadline, message.order, message.id))
            self.counters.delivered += 1
            if message.deliveries > 1:
                self.counters.redelivered += 1
            return message
        return None

    def ack(self, message_id: str) -> Message:
        """Remove a ready or leased message for good."""
        message = self._messages.get(message_id)
        if message is None or message.state == PENDING:
            raise UnknownMessage(message_id)
        del self._messages[message_id]
        if message.state == LEASED:
            self._leased -= 1
        else:
            del self._ready[message.order, message.id]
        message.state = GONE
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
        return message

    def touch(self, message_id: str, now: float, visibility: float) -> Message:
        """Set a leased message's deadline to ``now + visibility``."""
        message = self._messages.get(message_id)
        if message is None or message.state == PENDING:
            raise UnknownMessage(message_id)
        if message.state != LEASED:
            raise NotLeased(message_id)
        message.deadline = now + visibility
        heapq.heappush(self._lease_heap, (message.deadline, message.order, message.id))
        return message

    def release_all_leases(self) -> int:
        """Make every leased message ready (a restarted node voids leases)."""
        leased = [m for m in self._messages.values() if m.state == LEASED]
        for message in leased:
            self._leased -= 1
            self._make_ready(message)
        self._lease_heap.clear()
        return len(leased)

    def expire(self, now: float) -> int:
        """Make every lease whose deadline has passed ready again."""
        expired = 0
        heap = self._lease_heap
        while heap and heap[0][0] <= now:
            deadline, _order, message_id = heapq.heappop(heap)
            message = self._messages.get(message_id)
            if message is None or message.state != LEASED or message.deadline != deadline:
                continue
            self._leased -= 1
            self.counters.expired += 1
            self._make_ready(message)
            expired += 1
        return expired

    def next_deadline(self) -> float | None:
        """The earliest live lease deadline, or None when nothing is leased."""
        heap = self._lease_heap
        while heap:
            deadline, _order, message_id = heap[0]
            message = self._messages.get(message_id)
            if message is not None and message.state == LEASED and message.deadline == deadline:
                return deadline
            heapq.heappop(heap)
        return None

    def _make_ready(self, message: Message) -> None:
        message.state = READY
        message.deadline = 0.0
        self._ready[message.order, message.id] = message
        heapq.heappush(self._ready_heap, (message.order, message.id))

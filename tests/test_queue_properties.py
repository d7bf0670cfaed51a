"""Random sequences of queue operations checked against a simple model.

The machine pushes (directly, or reserve then commit/withdraw), takes, acks,
nacks, touches, releases leases and moves a float clock, expiring leases, on a
small queue so it is often full.  The model is a dict of queued messages with
their state and place in line.  As invariants, from DESIGN.md's promises:

(a) depth never exceeds size;
(b) a message leaves only by an ack;
(c) every accepted, never-acked message is ready or leased, and the counts of
    ready, leased and pending match the model;
(d) first deliveries are FIFO: among messages pushed directly (``push``) they
    are in push order; and no first delivery ever overtakes an accepted,
    never-delivered message pushed before it.  (A message reserved early but
    accepted late may be overtaken: it could not be delivered before it was
    accepted.)

and every take returns the ready message earliest in line, so a message
whose lease expired (or was nacked) comes back before later-pushed ones that
were never delivered.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from dqid import queue as queue_module
from dqid.queue import LEASED, PENDING, READY, NotLeased, QueueFull, UnknownMessage, WorkQueue

visibilities = st.floats(min_value=0.001, max_value=20.0, allow_nan=False)
steps = st.floats(min_value=0.0, max_value=25.0, allow_nan=False)


@dataclass
class Model:
    order: int
    state: int
    deadline: float = 0.0
    deliveries: int = 0


class QueueMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.next_number = 0
        self.model: dict[str, Model] = {}  # queued: pending, ready or leased
        self.gone: set[str] = set()  # acked, withdrawn or refused: not queued
        self.direct: set[str] = set()  # pushed with push(), not reserve()
        self.first_deliveries: list[str] = []
        self.deadlines_given: set[float] = set()  # by take and touch, ever
        self.counts = dict.fromkeys(
            ("pushed", "delivered", "redelivered", "acked", "nacked", "expired",
             "rejected_full"),
            0,
        )

    @initialize(size=st.integers(min_value=1, max_value=6))
    def start(self, size: int) -> None:
        self.size = size
        self.queue = WorkQueue(size)

    # -- helpers ------------------------------------------------------------

    def new_id(self) -> str:
        self.next_number += 1
        return f"m{self.next_number}"

    def ids_in(self, *states: int) -> list[str]:
        return sorted(i for i, m in self.model.items() if m.state in states)

    def known_ids(self) -> list[str]:
        return sorted(set(self.model) | self.gone)

    def reserve_model(self, message_id: str, state: int) -> None:
        self.model[message_id] = Model(order=self.next_number, state=state)

    # -- entering the queue -----------------------------------------------------

    @rule()
    def push(self) -> None:
        message_id = self.new_id()
        if len(self.model) >= self.size:
            with pytest.raises(QueueFull):
                self.queue.push(message_id, message_id.encode())
            self.counts["rejected_full"] += 1
            self.gone.add(message_id)
            return
        message = self.queue.push(message_id, message_id.encode())
        assert message.state == READY
        self.reserve_model(message_id, READY)
        self.direct.add(message_id)
        self.counts["pushed"] += 1

    @rule()
    def reserve(self) -> None:
        message_id = self.new_id()
        if len(self.model) >= self.size:
            with pytest.raises(QueueFull):
                self.queue.reserve(message_id, message_id.encode())
            self.counts["rejected_full"] += 1
            self.gone.add(message_id)
            return
        assert self.queue.reserve(message_id, message_id.encode()).state == PENDING
        self.reserve_model(message_id, PENDING)

    @precondition(lambda self: self.ids_in(PENDING))
    @rule(data=st.data(), accept=st.booleans())
    def settle(self, data, accept: bool) -> None:
        message_id = data.draw(st.sampled_from(self.ids_in(PENDING)))
        if accept:
            self.queue.commit(message_id)
            self.model[message_id].state = READY
            self.counts["pushed"] += 1
        else:
            self.queue.withdraw(message_id)
            del self.model[message_id]
            self.gone.add(message_id)

    # -- delivery ---------------------------------------------------------------

    @rule(visibility=visibilities)
    def take(self, visibility: float) -> None:
        ready = self.ids_in(READY)
        message = self.queue.take(self.now, visibility)
        if not ready:
            assert message is None
            return
        assert message is not None
        # The earliest in line: an expired or nacked message goes before
        # everything pushed after it, delivered or not.
        expected = min(ready, key=lambda i: self.model[i].order)
        assert message.id == expected
        entry = self.model[expected]
        entry.state = LEASED
        entry.deadline = self.now + visibility
        self.deadlines_given.add(entry.deadline)
        entry.deliveries += 1
        assert message.deliveries == entry.deliveries
        assert message.deadline == entry.deadline
        assert message.body == expected.encode()
        self.counts["delivered"] += 1
        if entry.deliveries == 1:
            # (d): nothing accepted and never delivered was pushed before it
            overtaken = [
                i for i in ready if self.model[i].deliveries == 0 and
                self.model[i].order < entry.order
            ]
            assert not overtaken, f"{expected} delivered before {overtaken}"
            self.first_deliveries.append(expected)
        else:
            self.counts["redelivered"] += 1

    @precondition(lambda self: self.known_ids())
    @rule(data=st.data())
    def ack(self, data) -> None:
        message_id = data.draw(st.sampled_from(self.known_ids()))
        entry = self.model.get(message_id)
        if entry is None or entry.state == PENDING:
            with pytest.raises(UnknownMessage):
                self.queue.ack(message_id)
            return
        assert self.queue.ack(message_id).id == message_id
        del self.model[message_id]
        self.gone.add(message_id)
        self.counts["acked"] += 1

    @precondition(lambda self: self.known_ids())
    @rule(data=st.data())
    def nack(self, data) -> None:
        message_id = data.draw(st.sampled_from(self.known_ids()))
        entry = self.model.get(message_id)
        if entry is None or entry.state == PENDING:
            with pytest.raises(UnknownMessage):
                self.queue.nack(message_id)
            return
        self.queue.nack(message_id)
        if entry.state == LEASED:
            entry.state = READY
            entry.deadline = 0.0
            self.counts["nacked"] += 1

    @precondition(lambda self: self.ids_in(LEASED))
    @rule(data=st.data(), visibility=visibilities)
    def touch_lease(self, data, visibility: float) -> None:
        """Move a lease's deadline: its old one becomes stale."""
        self.touch(data.draw(st.sampled_from(self.ids_in(LEASED))), visibility)

    @precondition(lambda self: self.known_ids())
    @rule(data=st.data(), visibility=visibilities)
    def touch_any(self, data, visibility: float) -> None:
        self.touch(data.draw(st.sampled_from(self.known_ids())), visibility)

    def touch(self, message_id: str, visibility: float) -> None:
        entry = self.model.get(message_id)
        if entry is None or entry.state == PENDING:
            with pytest.raises(UnknownMessage):
                self.queue.touch(message_id, self.now, visibility)
        elif entry.state == READY:
            with pytest.raises(NotLeased):
                self.queue.touch(message_id, self.now, visibility)
        else:
            entry.deadline = self.now + visibility
            self.deadlines_given.add(entry.deadline)
            assert self.queue.touch(message_id, self.now, visibility).deadline == entry.deadline

    @rule()
    def release_all_leases(self) -> None:
        leased = self.ids_in(LEASED)
        assert self.queue.release_all_leases() == len(leased)
        for message_id in leased:
            self.model[message_id].state = READY
            self.model[message_id].deadline = 0.0

    # -- time -------------------------------------------------------------------

    @rule()
    def next_deadline(self) -> None:
        """The lease timer is set for the earliest live lease.

        A rule, not an invariant: asking also drops stale deadlines, and the
        queue must be right whether or not anybody asked.
        """
        deadlines = [e.deadline for e in self.model.values() if e.state == LEASED]
        assert self.queue.next_deadline() == (min(deadlines) if deadlines else None)

    @rule(data=st.data())
    def advance_and_expire(self, data) -> None:
        """Move the clock forward, then expire what is due.

        The clock lands on a random time or exactly on a deadline some worker
        was given: a live one, or one since moved by a touch (a stale one).
        """
        targets = [st.builds(lambda step: self.now + step, steps)]
        given = sorted(d for d in self.deadlines_given if d > self.now)
        if given:
            targets.append(st.sampled_from(given))
        self.now = data.draw(st.one_of(targets))
        due = [i for i in self.ids_in(LEASED) if self.model[i].deadline <= self.now]
        assert self.queue.expire(self.now) == len(due)
        for message_id in due:
            self.model[message_id].state = READY
            self.model[message_id].deadline = 0.0
        self.counts["expired"] += len(due)

    # -- invariants -------------------------------------------------------------

    @invariant()
    def holds(self) -> None:
        queue = self.queue
        model = self.model
        # (a) depth never exceeds size
        assert queue.depth <= self.size
        assert queue.depth == len(model)
        assert queue.room() == self.size - len(model)
        # (b) a message leaves only by an ack
        for message_id, entry in model.items():
            message = queue.get(message_id)
            assert message is not None, f"{message_id} vanished without an ack"
            assert message.state == entry.state
            assert message.deliveries == entry.deliveries
        for message_id in self.gone:
            assert message_id not in queue
        assert {m.id for m in queue.messages()} == set(model)
        # (c) everything accepted and not acked is ready or leased; counts
        states = [entry.state for entry in model.values()]
        assert queue.pending == states.count(PENDING)
        assert queue.ready == states.count(READY)
        assert queue.leased == states.count(LEASED)
        assert queue.pending + queue.ready + queue.leased == queue.depth
        # (d) first deliveries of directly pushed messages are in push order
        numbers = [int(i[1:]) for i in self.first_deliveries if i in self.direct]
        assert numbers == sorted(numbers)
        assert queue.counters.as_dict() == self.counts


QueueMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestQueue = QueueMachine.TestCase


class CompactingQueueMachine(QueueMachine):
    """The same machine with the queue's lines compacted at every chance
    (no slack for stale entries), so compaction runs between any two steps."""

    def __init__(self) -> None:
        super().__init__()
        self.slack = queue_module._SLACK
        queue_module._SLACK = 0

    def teardown(self) -> None:
        queue_module._SLACK = self.slack
        super().teardown()


CompactingQueueMachine.TestCase.settings = QueueMachine.TestCase.settings
TestCompactingQueue = CompactingQueueMachine.TestCase


class TestRedeliveryPlace:
    """A directed case of the same property, readable on its own."""

    def test_expired_message_comes_back_before_later_never_delivered_ones(self):
        queue = WorkQueue(10)
        for message_id in ("a", "b", "c"):
            queue.push(message_id, b"")
        assert queue.take(0.0, 5.0).id == "a"
        assert queue.take(0.0, 50.0).id == "b"
        queue.push("d", b"")
        queue.expire(5.0)
        assert [queue.take(5.0, 50.0).id for _ in range(3)] == ["a", "c", "d"]

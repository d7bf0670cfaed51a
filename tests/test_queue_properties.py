"""Random sequences of queue operations checked against a simple model.

The machine pushes (directly, or reserve then commit/withdraw; with or
without a due time), takes, acks, nacks (with or without a receipt, with or
without a delay), touches (with or without a receipt), kicks held messages,
releases leases and moves a float clock, expiring leases and promoting due
messages, on a small queue (sometimes with a delivery limit) so it is often
full.  The model is a dict of queued messages with their state, place in
line, lease and due time.  As invariants, from DESIGN.md's promises and its
"Workers" section:

(a) depth counts every state (pending + ready + leased + delayed + held) and
    never exceeds size;
(b) a message leaves only by an ack (or a withdraw of a pending push);
(c) every accepted, never-acked message is ready, leased, delayed or held,
    and the count of each state matches the model;
(d) first deliveries are FIFO: among messages pushed directly (``push``)
    without a delay they are in push order; and no first delivery ever
    overtakes an accepted, never-delivered ready message before it in line.
    (A message reserved early but accepted late may be overtaken: it could
    not be delivered before it was accepted.)
(e) held messages are never delivered, and only a kick makes them ready;
(f) only the current lease's receipt (not run out) changes a lease: an old,
    nacked, expired or made-up receipt raises ``LeaseLost`` and changes
    nothing; every lease gets a receipt never given before;
(g) a delayed message is never delivered before its due time, and joins the
    end of the line when promoted;

and every take returns the ready message earliest in line, so a message
whose lease expired (or was nacked) comes back before later-pushed ones that
were never delivered.

``DQID_QUEUE_EXAMPLES`` sets how many examples each machine runs (default
250: about 5 s each); ``--hypothesis-seed`` varies them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from dqid import queue as queue_module
from dqid.queue import (
    DELAYED,
    GONE,
    HELD,
    LEASED,
    PENDING,
    READY,
    STATE_NAMES,
    LeaseLost,
    NotHeld,
    NotLeased,
    QueueFull,
    UnknownMessage,
    WorkQueue,
)

visibilities = st.floats(min_value=0.001, max_value=20.0, allow_nan=False)
steps = st.one_of(st.sampled_from([0.5, 1.0, 2.0, 5.0]),
                  st.floats(min_value=0.0, max_value=25.0, allow_nan=False))
# Short delays from a few values, so dues tie and come out of order often.
delays = st.one_of(st.sampled_from([0.0, 0.5, 1.0, 2.0, 5.0]),
                   st.floats(min_value=0.0, max_value=25.0, allow_nan=False))

EXAMPLES = int(os.environ.get("DQID_QUEUE_EXAMPLES", "250"))


@dataclass
class Model:
    order: int
    state: int
    deadline: float = 0.0  # of the lease, while leased
    deliveries: int = 0
    receipt: str | None = None  # of the lease, while leased
    due: float | None = None  # while delayed (or pending with a due time)


def delivery_order(queue: WorkQueue) -> list[str]:
    """The ids in the order takes would deliver them: the live entries of
    the ready line, earliest in line first (as ``take`` picks them)."""
    live = [m for m in (*queue._ready, *queue._ready_heap) if m.state == READY]
    return [m.id for m in sorted(live)]


def promotion_order(queue: WorkQueue) -> list[str]:
    """The ids of delayed messages in the order they join the line."""
    live = [m for m in queue._due_line if m.state == DELAYED]
    live += [m for _, m in queue._due_heap if m.state == DELAYED]
    return [m.id for m in sorted(live, key=lambda m: (m.deadline, m))]


class QueueMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.next_number = 0
        self.model: dict[str, Model] = {}  # queued, in any state
        self.gone: set[str] = set()  # acked, withdrawn or refused: not queued
        self.direct: set[str] = set()  # pushed with push() and no delay
        self.first_deliveries: list[str] = []
        self.deadlines_given: set[float] = set()  # by take and touch, ever
        self.dues_given: set[float] = set()
        self.receipts_given: dict[str, list[str]] = {}  # per message, every lease's
        self.counts = dict.fromkeys(
            ("pushed", "delivered", "redelivered", "acked", "nacked", "expired",
             "rejected_full"),
            0,
        )

    @initialize(size=st.integers(min_value=1, max_value=6),
                max_deliveries=st.sampled_from([0, 1, 1, 2, 3]),
                data=st.data())
    def start(self, size: int, max_deliveries: int, data) -> None:
        self.size = size
        self.max_deliveries = max_deliveries
        self.queue = WorkQueue(size, max_deliveries=max_deliveries)
        # Most examples start with work queued (pushed directly, no delay).
        for _ in range(data.draw(st.integers(min_value=0, max_value=size))):
            message_id = self.new_id()
            self.queue.push(message_id, message_id.encode())
            self.reserve_model(message_id, PENDING, None)
            self.accepted(message_id)
            self.direct.add(message_id)

    # -- helpers ------------------------------------------------------------

    def new_id(self) -> str:
        self.next_number += 1
        return f"m{self.next_number}"

    def new_order(self) -> int:
        """A place in line after every one given so far (ids skip it)."""
        self.next_number += 1
        return self.next_number

    def ids_in(self, *states: int) -> list[str]:
        return sorted(i for i, m in self.model.items() if m.state in states)

    def known_ids(self) -> list[str]:
        return sorted(set(self.model) | self.gone)

    def reserve_model(self, message_id: str, state: int, due: float | None) -> None:
        self.model[message_id] = Model(order=self.next_number, state=state, due=due)
        if due is not None:
            self.dues_given.add(due)

    def draw_due(self, data) -> float | None:
        """No due time (half the pushes), or one from now on."""
        if data.draw(st.booleans()):
            return None
        return self.now + data.draw(delays)

    def accepted(self, message_id: str) -> None:
        """A pending or pushed message is accepted: ready, or delayed."""
        entry = self.model[message_id]
        entry.state = READY if entry.due is None else DELAYED
        self.counts["pushed"] += 1

    def lease_ended(self, entry: Model, due: float | None) -> None:
        """A lease ended without an ack: held at the limit, else delayed or ready."""
        entry.deadline = 0.0
        entry.receipt = None
        if self.max_deliveries and entry.deliveries >= self.max_deliveries:
            entry.state = HELD
        elif due is not None:
            entry.state = DELAYED
            entry.due = due
            self.dues_given.add(due)
        else:
            entry.state = READY

    def draw_receipt(self, data, message_id: str) -> str | None:
        """No receipt, the current one (most often), an older one of the
        same message, one of another message, or one never given."""
        entry = self.model.get(message_id)
        current = entry.receipt if entry is not None else None
        older = [r for r in self.receipts_given.get(message_id, []) if r != current]
        other = [r for i, rs in self.receipts_given.items() if i != message_id for r in rs]
        kind = data.draw(st.sampled_from(
            ["current", "current", "current", "none", "made-up", "older", "other"]))
        if kind == "current" and current is not None:
            return current
        if kind == "older" and older:
            return data.draw(st.sampled_from(older))
        if kind == "other" and other:
            return data.draw(st.sampled_from(other))
        return "made-up" if kind == "made-up" else None

    def holds_lease(self, entry: Model | None, receipt: str) -> bool:
        return (entry is not None and entry.state == LEASED and entry.receipt == receipt
                and self.now < entry.deadline)

    # -- entering the queue -----------------------------------------------------

    @rule(data=st.data())
    def push(self, data) -> None:
        message_id = self.new_id()
        due = self.draw_due(data)
        if len(self.model) >= self.size:
            with pytest.raises(QueueFull):
                self.queue.push(message_id, message_id.encode(), due=due)
            self.counts["rejected_full"] += 1
            self.gone.add(message_id)
            return
        message = self.queue.push(message_id, message_id.encode(), due=due)
        self.reserve_model(message_id, PENDING, due)
        self.accepted(message_id)
        assert message.state == self.model[message_id].state
        if due is None:
            self.direct.add(message_id)

    @rule(data=st.data())
    def reserve(self, data) -> None:
        message_id = self.new_id()
        due = self.draw_due(data)
        if len(self.model) >= self.size:
            with pytest.raises(QueueFull):
                self.queue.reserve(message_id, message_id.encode(), due=due)
            self.counts["rejected_full"] += 1
            self.gone.add(message_id)
            return
        assert self.queue.reserve(message_id, message_id.encode(), due=due).state == PENDING
        self.reserve_model(message_id, PENDING, due)

    @rule(data=st.data(), accept=st.booleans())
    def settle(self, data, accept: bool) -> None:
        message_id = self.pick(data, PENDING)
        if self.model.get(message_id, Model(0, GONE)).state != PENDING:
            with pytest.raises(UnknownMessage):
                (self.queue.commit if accept else self.queue.withdraw)(message_id)
            return
        if accept:
            self.queue.commit(message_id)
            self.accepted(message_id)
        else:
            self.queue.withdraw(message_id)
            del self.model[message_id]
            self.gone.add(message_id)

    # -- delivery ---------------------------------------------------------------

    @rule(visibility=visibilities)
    def take(self, visibility: float) -> None:
        self.take_one(visibility)

    @rule(count=st.integers(min_value=2, max_value=4), visibility=visibilities)
    def take_batch(self, count: int, visibility: float) -> None:
        """Several takes at one time, as a batch get does."""
        for _ in range(count):
            self.take_one(visibility)

    def take_one(self, visibility: float) -> None:
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
        # (e) never a held one; (g) never one before its due time
        assert entry.state == READY
        assert entry.due is None or entry.due <= self.now
        entry.state = LEASED
        entry.due = None
        entry.deadline = self.now + visibility
        self.deadlines_given.add(entry.deadline)
        entry.deliveries += 1
        # (f) a receipt never given before
        assert message.receipt is not None
        assert all(message.receipt not in rs for rs in self.receipts_given.values())
        entry.receipt = message.receipt
        self.receipts_given.setdefault(expected, []).append(message.receipt)
        assert message.deliveries == entry.deliveries
        assert message.deadline == entry.deadline
        assert message.body == expected.encode()
        self.counts["delivered"] += 1
        if entry.deliveries == 1:
            # (d): nothing accepted, ready and never delivered is before it
            overtaken = [
                i for i in ready if self.model[i].deliveries == 0 and
                self.model[i].order < entry.order
            ]
            assert not overtaken, f"{expected} delivered before {overtaken}"
            self.first_deliveries.append(expected)
        else:
            self.counts["redelivered"] += 1

    def pick(self, data, *preferred: int) -> str:
        """A message id: often one in a ``preferred`` state, else any known
        one (queued or gone), else one never pushed."""
        wanted = self.ids_in(*preferred) if preferred else []
        if wanted and data.draw(st.sampled_from([True, True, True, False])):
            return data.draw(st.sampled_from(wanted))
        known = self.known_ids()
        return data.draw(st.sampled_from(known)) if known else "never"

    @rule(data=st.data())
    def ack(self, data) -> None:
        message_id = self.pick(data, HELD, DELAYED)
        entry = self.model.get(message_id)
        if entry is None or entry.state == PENDING:
            with pytest.raises(UnknownMessage):
                self.queue.ack(message_id)
            return
        assert self.queue.ack(message_id).id == message_id
        del self.model[message_id]
        self.gone.add(message_id)
        self.counts["acked"] += 1

    @rule(data=st.data(), delay=delays)
    def nack(self, data, delay: float) -> None:
        """With a receipt, (f) only the current lease's ends it, at once or
        after a delay; without one, any lease of the message, or nothing."""
        message_id = self.pick(data, LEASED)
        receipt = self.draw_receipt(data, message_id)
        entry = self.model.get(message_id)
        if receipt is None:
            delay = 0.0 if data.draw(st.booleans()) else delay
            if entry is None or entry.state == PENDING:
                with pytest.raises(UnknownMessage):
                    self.queue.nack(message_id, now=self.now, delay=delay)
                return
            self.queue.nack(message_id, now=self.now, delay=delay)
            if entry.state == LEASED:
                self.lease_ended(entry, self.now + delay if delay else None)
                self.counts["nacked"] += 1
        elif entry is None or entry.state == PENDING:
            with pytest.raises(UnknownMessage):
                self.queue.nack(message_id, receipt, now=self.now, delay=delay)
        elif not self.holds_lease(entry, receipt):
            with pytest.raises(LeaseLost):
                self.queue.nack(message_id, receipt, now=self.now, delay=delay)
        else:
            message = self.queue.nack(message_id, receipt, now=self.now, delay=delay)
            self.lease_ended(entry, self.now + delay if delay else None)
            assert message.state == entry.state
            self.counts["nacked"] += 1

    @rule(data=st.data(), visibility=visibilities)
    def touch(self, data, visibility: float) -> None:
        """Move a lease's deadline (its old one becomes stale); with a
        receipt, (f) only the current lease's."""
        message_id = self.pick(data, LEASED)
        receipt = self.draw_receipt(data, message_id)
        entry = self.model.get(message_id)
        if entry is None or entry.state == PENDING:
            with pytest.raises(UnknownMessage):
                self.queue.touch(message_id, self.now, visibility, receipt=receipt)
        elif receipt is None and entry.state != LEASED:
            with pytest.raises(NotLeased):
                self.queue.touch(message_id, self.now, visibility)
        elif receipt is not None and not self.holds_lease(entry, receipt):
            with pytest.raises(LeaseLost):
                self.queue.touch(message_id, self.now, visibility, receipt=receipt)
        else:
            entry.deadline = self.now + visibility
            self.deadlines_given.add(entry.deadline)
            touched = self.queue.touch(message_id, self.now, visibility, receipt=receipt)
            assert touched.deadline == entry.deadline
            assert touched.receipt == entry.receipt

    @rule(data=st.data())
    def kick(self, data) -> None:
        """(e) a kick makes a held message ready, at its place in line."""
        message_id = self.pick(data, HELD)
        entry = self.model.get(message_id)
        if entry is None or entry.state == PENDING:
            with pytest.raises(UnknownMessage):
                self.queue.kick(message_id)
        elif entry.state != HELD:
            with pytest.raises(NotHeld):
                self.queue.kick(message_id)
        else:
            assert self.queue.kick(message_id).state == READY
            entry.state = READY

    # -- time -------------------------------------------------------------------

    @rule()
    def next_deadline(self) -> None:
        """The one timer is set for the earliest live lease or due time.

        A rule, not an invariant: asking also drops stale entries, and the
        queue must be right whether or not anybody asked.
        """
        deadlines = [e.deadline for e in self.model.values() if e.state == LEASED]
        dues = [e.due for e in self.model.values() if e.state == DELAYED]
        assert self.queue.next_deadline() == (min(deadlines) if deadlines else None)
        assert self.queue.next_due() == (min(dues) if dues else None)
        both = deadlines + dues
        assert self.queue.next_wakeup() == (min(both) if both else None)

    def expire_model(self) -> int:
        due = [i for i in self.ids_in(LEASED) if self.model[i].deadline <= self.now]
        for message_id in due:
            self.lease_ended(self.model[message_id], None)
        self.counts["expired"] += len(due)
        return len(due)

    def promote_model(self) -> int:
        """(g) due messages join the end of the line, in (due, line) order."""
        due = [i for i in self.ids_in(DELAYED) if self.model[i].due <= self.now]
        due.sort(key=lambda i: (self.model[i].due, self.model[i].order))
        for message_id in due:
            entry = self.model[message_id]
            entry.state = READY
            entry.order = self.new_order()
        return len(due)

    @rule(data=st.data(),
          how=st.sampled_from(["expire", "promote_due", "advance", "release_all_leases"]))
    def advance_clock(self, data, how: str) -> None:
        """Move the clock forward, then expire leases, promote due messages
        or both; or else release every lease (a restart) without moving it.

        The clock lands on a random time, or exactly on (or just before) a
        deadline or due time given out: a live one, or one since moved by a
        touch (a stale one); most often on (or just before) the next one.
        """
        if how == "release_all_leases":
            leased = self.ids_in(LEASED)
            assert self.queue.release_all_leases() == len(leased)
            for message_id in leased:
                self.lease_ended(self.model[message_id], None)
            return
        targets = [st.builds(lambda step: self.now + step, steps)]
        given = sorted(d for d in self.deadlines_given | self.dues_given if d > self.now)
        if given:
            targets.append(st.sampled_from(given))
            before = [b for d in given if (b := math.nextafter(d, -math.inf)) > self.now]
            if before:
                targets.append(st.sampled_from(before))
        upcoming = [e.deadline for e in self.model.values() if e.state == LEASED] + [
            e.due for e in self.model.values() if e.state == DELAYED]
        upcoming = [t for t in upcoming if t > self.now]
        if upcoming:
            next_one = min(upcoming)
            targets += [st.just(next_one)] * 2
            if (before_next := math.nextafter(next_one, -math.inf)) > self.now:
                targets += [st.just(before_next)] * 2
        self.now = data.draw(st.one_of(targets))
        if how == "expire":
            assert self.queue.expire(self.now) == self.expire_model()
        elif how == "promote_due":
            assert self.queue.promote_due(self.now) == self.promote_model()
        else:
            expected = self.expire_model() + self.promote_model()
            assert self.queue.advance(self.now) == expected

    # -- invariants -------------------------------------------------------------

    @invariant()
    def holds(self) -> None:
        queue = self.queue
        model = self.model
        # (a) depth counts every state and never exceeds size
        assert queue.depth <= self.size
        assert queue.depth == len(model)
        assert queue.room() == self.size - len(model)
        # (b) a message leaves only by an ack (or withdraw)
        for message_id, entry in model.items():
            message = queue.get(message_id)
            assert message is not None, f"{message_id} vanished without an ack"
            assert message.state == entry.state
            assert message.deliveries == entry.deliveries
            # (f) the receipt and deadline are the current lease's
            assert message.receipt == (entry.receipt if entry.state == LEASED else None)
            if entry.state == LEASED:
                assert message.deadline == entry.deadline
            # (g) a delayed message keeps its due time; a pending one shows
            # the due time it was reserved with (0.0, the epoch, reads as none)
            if entry.state == DELAYED:
                assert message.due == entry.due
            elif entry.state == PENDING:
                assert message.due == (entry.due or None)
            else:
                assert message.due is None
            # peek names the state (and changes nothing: checked next step)
            assert queue.peek(message_id) == (message, STATE_NAMES[entry.state])
        for message_id in self.gone:
            assert message_id not in queue
            with pytest.raises(UnknownMessage):
                queue.peek(message_id)
        assert {m.id for m in queue.messages()} == set(model)
        # (c) everything accepted and not acked is in one state; counts
        states = [entry.state for entry in model.values()]
        assert queue.pending == states.count(PENDING)
        assert queue.ready == states.count(READY)
        assert queue.leased == states.count(LEASED)
        assert queue.delayed == states.count(DELAYED)
        assert queue.held == states.count(HELD)
        assert (queue.pending + queue.ready + queue.leased + queue.delayed + queue.held
                == queue.depth)
        # every take would deliver in the model's order; (g) due messages
        # join in due-time order (then by place in line)
        assert delivery_order(queue) == sorted(self.ids_in(READY), key=lambda i: model[i].order)
        assert promotion_order(queue) == sorted(
            self.ids_in(DELAYED), key=lambda i: (model[i].due, model[i].order))
        # (e) the held list, oldest first
        held = sorted(self.ids_in(HELD), key=lambda i: model[i].order)
        assert [m.id for m in queue.held_messages(self.size)] == held
        # (d) first deliveries of directly pushed, undelayed messages are in push order
        numbers = [int(i[1:]) for i in self.first_deliveries if i in self.direct]
        assert numbers == sorted(numbers)
        assert queue.counters.as_dict() == self.counts


QueueMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
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

"""The numbers and acknowledgements of the replication stream, alone
(:mod:`dqid.stream`: no reactor, no AMP).

The owner numbers each box with records on a link (:class:`Unanswered`);
the peer says cumulative acknowledgements (:class:`Acknowledger`) that never
pass a box it has not settled.  A push is answered from what the owner's
side settles, so a box settled twice, or held when the peer did not settle
it (or one below it), is a 201 for a copy that may not exist.
"""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine, invariant, precondition, rule,
)

from dqid.stream import Acknowledger, Received, Unanswered, Unconfirmed
from dqid.wire import WireError

REFUSALS = ("BAD_INPUT", "STALE_EPOCH", "NOT_HOLDER", "DISK")


# -- Unanswered: the owner's side --------------------------------------------


def test_boxes_are_numbered_from_one_on_each_link():
    sent = Unanswered()
    assert sent.numbered == 0 and len(sent) == 0 and sent.oldest_sent() is None
    assert [sent.send(item, 1.0) for item in "abc"] == [1, 2, 3]
    assert sent.numbered == 3 and len(sent) == 3
    # Another link numbers on its own, from 1.
    other = Unanswered()
    assert other.send("x", 2.0) == 1
    assert sent.send("d", 3.0) == 4


def test_acknowledged_settles_exactly_the_boxes_up_to_upto_once():
    sent = Unanswered()
    for number, item in enumerate("abcde", start=1):
        assert sent.send(item, float(number)) == number
    assert sent.acknowledged(0) == []
    assert sent.acknowledged(2) == ["a", "b"]
    assert len(sent) == 3 and sent.oldest_sent() == 3.0
    assert sent.acknowledged(2) == []  # the same Copied again
    assert sent.acknowledged(1) == []  # an older one, late
    assert sent.acknowledged(3) == ["c"]
    assert sent.acknowledged(5) == ["d", "e"]
    assert len(sent) == 0 and sent.oldest_sent() is None
    assert sent.acknowledged(5) == [] and sent.acknowledged(4) == []


def test_drop_all_gives_every_waiting_item_and_numbering_goes_on():
    sent = Unanswered()
    sent.send("a", 1.0)
    sent.send("b", 2.0)
    sent.send("c", 3.0)
    assert sent.acknowledged(1) == ["a"]
    assert sent.drop_all() == ["b", "c"]
    assert len(sent) == 0 and sent.oldest_sent() is None
    assert sent.drop_all() == []
    # Numbering goes on: a late Copied for the dropped boxes settles nothing,
    # neither the dropped items (counted already) nor the boxes sent since.
    assert sent.send("d", 4.0) == 4
    assert sent.acknowledged(3) == []
    assert sent.acknowledged(2) == []
    assert len(sent) == 1 and sent.oldest_sent() == 4.0
    assert sent.acknowledged(4) == ["d"]


# -- Unconfirmed: what unnumbered boxes carried -------------------------------


def test_unconfirmed_keeps_until_a_number_given_with_or_after_the_box():
    sent, kept = Unanswered(), Unconfirmed()
    kept.keep("t1", sent.numbered + 1)  # no number: the next one shows it
    seq = sent.send("push", 1.0)
    kept.keep("t2", seq)  # in the numbered box itself
    kept.keep("t3", sent.numbered + 1)  # after it, and nothing numbered since
    assert len(kept) == 3
    kept.acknowledged(0)
    assert len(kept) == 3
    kept.acknowledged(seq)
    assert kept.take_all() == ["t3"]  # a Copied for 1 says nothing of t3
    assert len(kept) == 0 and kept.take_all() == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.booleans(), max_size=30), st.data())
def test_unconfirmed_hands_back_every_box_a_lost_link_did_not_deliver(numbered, data):
    # Boxes go on a link in order, some numbered; the peer gets a prefix of
    # them (the rest is lost with the link) and acknowledges the last number
    # it got.  Every item of a box not delivered must be handed back, and
    # none of a box that the acknowledgement shows arrived.
    sent, kept = Unanswered(), Unconfirmed()
    numbers = []
    for index, has_number in enumerate(numbered):
        seq = sent.send(index, float(index)) if has_number else None
        kept.keep(index, seq if seq is not None else sent.numbered + 1)
        numbers.append(seq)
    delivered = data.draw(st.integers(0, len(numbered)), label="delivered")
    got = [n for n in numbers[:delivered] if n is not None]
    if got and data.draw(st.booleans(), label="acknowledged"):
        kept.acknowledged(got[-1])
        shown = numbers.index(got[-1]) + 1  # boxes up to the acknowledged one
    else:
        shown = 0
    assert kept.take_all() == list(range(shown, len(numbered)))


# -- Acknowledger: the peer's side -------------------------------------------


def test_receive_refuses_a_number_not_above_the_last():
    peer = Acknowledger()
    with pytest.raises(WireError):
        peer.receive(0)
    first = peer.receive(1)
    assert isinstance(first, Received) and first.number == 1 and not first.settled
    for number in (1, 0, -3):
        with pytest.raises(WireError):
            peer.receive(number)
    assert peer.receive(2).number == 2
    with pytest.raises(WireError):
        peer.receive(1)  # a replay of an older box
    assert peer.received == 2
    # A refused number changed nothing: only boxes 1 and 2 wait.
    Acknowledger.settle(first, True)
    assert peer.due() == [(1, True, None)]


def test_due_never_passes_a_box_not_settled():
    peer = Acknowledger()
    one, two, three, four = (peer.receive(n) for n in range(1, 5))
    assert peer.due() == []
    Acknowledger.settle(two, True)
    Acknowledger.settle(four, True)
    assert peer.due() == []  # 1 is not settled: nothing may be said
    Acknowledger.settle(one, True)
    assert peer.due() == [(2, True, None)]  # 3 is not settled
    assert peer.due() == []  # said once
    Acknowledger.settle(three, True)
    assert peer.due() == [(4, True, None)]
    assert peer.due() == []


def test_due_merges_runs_alike_and_splits_runs_that_differ():
    peer = Acknowledger()
    entries = [peer.receive(n) for n in range(1, 11)]
    outcomes = [
        (True, None), (True, None), (True, None),  # 1-3: held
        (False, None),  # 4: stored, but the peer recovers
        (True, "BAD_INPUT"), (False, "BAD_INPUT"),  # 5-6: refused (never a holder)
        (True, None),  # 7
        (False, "STALE_EPOCH"),  # 8
        (False, "DISK"),  # 9: same holder, another refusal
        (False, None),  # 10
    ]
    for entry, (holder, refused) in zip(entries, outcomes):
        Acknowledger.settle(entry, holder, refused)
    assert peer.due() == [
        (3, True, None),
        (4, False, None),
        (6, False, "BAD_INPUT"),
        (7, True, None),
        (8, False, "STALE_EPOCH"),
        (9, False, "DISK"),
        (10, False, None),
    ]
    assert entries[4].holder is False  # refused records are no copy


def test_due_continues_a_run_across_calls_without_repeating():
    peer = Acknowledger()
    one, two = peer.receive(1), peer.receive(2)
    Acknowledger.settle(one, True)
    assert peer.due() == [(1, True, None)]
    Acknowledger.settle(two, True)
    assert peer.due() == [(2, True, None)]  # not (1, ...) again
    three = peer.receive(5)  # numbers may skip (a box lost before it left)
    Acknowledger.settle(three, False, "NOT_HOLDER")
    assert peer.due() == [(5, False, "NOT_HOLDER")]


# -- properties: any interleaving --------------------------------------------


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_settled_in_any_order_only_boxes_settled_below_are_acknowledged(data):
    """The peer settles a link's boxes in any order (disk writes finish out
    of order) and says what is due at any point: the owner counts a box
    only once it and every box below it are settled, each box exactly once,
    and held only if the peer held that box."""
    count = data.draw(st.integers(min_value=1, max_value=10), label="boxes")
    order = data.draw(st.permutations(range(1, count + 1)), label="settle order")
    outcomes = data.draw(st.lists(
        st.tuples(st.booleans(), st.one_of(st.none(), st.sampled_from(REFUSALS))),
        min_size=count, max_size=count), label="outcomes")
    say_after = data.draw(st.lists(st.booleans(), min_size=count, max_size=count),
                          label="due() after each settle")
    owner: Unanswered[int] = Unanswered()
    peer = Acknowledger()
    entries = {}
    for item in range(1, count + 1):
        number = owner.send(item, 0.0)
        assert number == item
        entries[number] = peer.receive(number)
    counted: dict[int, bool] = {}

    def acknowledge() -> None:
        for upto, holder, refused in peer.due():
            for item in owner.acknowledged(upto):
                assert item not in counted  # (a)
                assert all(entries[n].settled for n in range(1, item + 1))  # (b)
                assert entries[item].holder == holder
                assert entries[item].refused == refused
                counted[item] = holder

    for number, (holder, refused), say in zip(order, outcomes, say_after):
        Acknowledger.settle(entries[number], holder, refused)
        if say:
            acknowledge()
    acknowledge()
    # (c) every item exactly once, held exactly when the peer held its box
    assert counted == {n: holder and refused is None
                       for n, (holder, refused) in zip(order, outcomes)}
    assert len(owner) == 0


class StreamMachine(RuleBasedStateMachine):
    """One link: the owner's Unanswered, the peer's Acknowledger, boxes in
    order on the wire one way and Copied in order the other way; the peer
    settles boxes in any order; the owner may give up on everything waiting
    (a stall) and keep the link; old Copied may come again."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.owner: Unanswered[int] = Unanswered()
        self.peer = Acknowledger()
        self.boxes: deque[int] = deque()  # numbers sent, not received yet
        self.copied: deque[tuple[int, bool, str | None]] = deque()  # said, not applied
        self.applied: list[tuple[int, bool, str | None]] = []
        self.entries: dict[int, Received] = {}  # the peer's, by number
        self.number_of: dict[int, int] = {}  # item -> its box's number
        self.sent_at: dict[int, float] = {}  # item -> when
        self.outcomes: dict[int, list[str]] = {}  # item -> how it settled
        self.items = 0

    # -- steps ---------------------------------------------------------------

    @rule()
    def send(self) -> None:
        self.items += 1
        item = self.items
        number = self.owner.send(item, self.now)
        assert number == self.owner.numbered == len(self.number_of) + 1
        self.number_of[item] = number
        self.sent_at[item] = self.now
        self.outcomes[item] = []
        self.boxes.append(number)

    @rule(seconds=st.floats(min_value=0.0, max_value=2.0))
    def tick(self, seconds: float) -> None:
        self.now += seconds

    @precondition(lambda self: self.boxes)
    @rule()
    def receive(self) -> None:
        number = self.boxes.popleft()
        self.entries[number] = self.peer.receive(number)

    @precondition(lambda self: any(not e.settled for e in self.entries.values()))
    @rule(data=st.data(), holder=st.booleans(),
          refused=st.one_of(st.none(), st.none(), st.sampled_from(REFUSALS)))
    def settle(self, data, holder: bool, refused: str | None) -> None:
        number = data.draw(st.sampled_from(
            sorted(n for n, e in self.entries.items() if not e.settled)))
        Acknowledger.settle(self.entries[number], holder, refused)

    @rule()
    def say_due(self) -> None:
        said = self.peer.due()
        for upto, holder, refused in said:
            entry = self.entries[upto]
            assert entry.settled and (entry.holder, entry.refused) == (holder, refused)
        uptos = [upto for upto, _, _ in said]
        assert uptos == sorted(set(uptos))
        if said and self.applied + list(self.copied):
            assert said[0][0] > [*self.applied, *self.copied][-1][0]
        self.copied.extend(said)

    @precondition(lambda self: self.copied)
    @rule()
    def apply_copied(self) -> None:
        upto, holder, refused = self.copied.popleft()
        self.applied.append((upto, holder, refused))
        for item in self.owner.acknowledged(upto):
            number = self.number_of[item]
            assert number <= upto
            entry = self.entries.get(number)
            # (b) reported only once the peer settled the box and every one below,
            # and held only if the peer said so for that very box.
            assert entry is not None and entry.settled
            assert all(self.entries[n].settled for n in range(1, number)
                       if n in self.entries)
            assert all(n in self.entries for n in range(1, number))
            assert (entry.holder, entry.refused) == (holder, refused)
            self.outcomes[item].append("held" if holder else "not held")

    @precondition(lambda self: self.applied)
    @rule(data=st.data())
    def copied_again(self, data) -> None:
        """A duplicate or late Copied: it settles nothing."""
        upto, _, _ = data.draw(st.sampled_from(self.applied))
        assert self.owner.acknowledged(upto) == []

    @rule()
    def give_up(self) -> None:
        """The owner stops waiting (a stall): every waiting item, once."""
        for item in self.owner.drop_all():
            self.outcomes[item].append("dropped")

    # -- what must always hold ------------------------------------------------

    @invariant()
    def settled_at_most_once(self) -> None:
        # (a)
        assert all(len(how) <= 1 for how in self.outcomes.values())
        waiting = [item for item, how in self.outcomes.items() if not how]
        assert len(self.owner) == len(waiting)
        oldest = min((self.sent_at[i] for i in waiting), default=None)
        assert self.owner.oldest_sent() == oldest

    def teardown(self) -> None:
        # (c) everything arrives, settles, and every Copied due is applied.
        while self.boxes:
            self.receive()
        for entry in self.entries.values():
            if not entry.settled:
                Acknowledger.settle(entry, True)
        self.say_due()
        while self.copied:
            self.apply_copied()
        assert self.peer.due() == []
        assert len(self.owner) == 0
        assert all(len(how) == 1 for how in self.outcomes.values()), self.outcomes


StreamMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStreamProperties = StreamMachine.TestCase

"""Unit tests of the pure queue core (dqid.queue): no reactor, time passed in.

The promises checked here are DESIGN.md's "Bounded" (capacity counts ready +
leased + pending, a full queue refuses and never evicts), "Nothing dropped"
(only an ack removes a message; an expired lease makes it ready again) and
"First deliveries are FIFO"; plus the semantics of ack/nack/touch in the HTTP
API table, and DESIGN.md's "Workers": receipts, held poison messages, delays
and peek.
"""

from __future__ import annotations

import pytest

from dqid.queue import (
    DELAYED,
    GONE,
    HELD,
    LEASED,
    PENDING,
    READY,
    Counters,
    LeaseLost,
    NotHeld,
    NotLeased,
    QueueFull,
    UnknownMessage,
    WorkQueue,
)


def filled(size: int, *ids: str, **options) -> WorkQueue:
    queue = WorkQueue(size, **options)
    for message_id in ids:
        queue.push(message_id, message_id.encode())
    return queue


def drain(queue: WorkQueue, now: float = 0.0, visibility: float = 30.0) -> list[str]:
    """Take every ready message, in delivery order."""
    taken = []
    while (message := queue.take(now, visibility)) is not None:
        taken.append(message.id)
    return taken


def sizes(queue: WorkQueue) -> tuple[int, int, int, int]:
    return queue.depth, queue.pending, queue.ready, queue.leased


# -- construction -------------------------------------------------------------


@pytest.mark.parametrize("size", [0, -1])
def test_size_must_be_positive(size):
    with pytest.raises(ValueError):
        WorkQueue(size)


def test_new_queue_is_empty():
    queue = WorkQueue(3)
    assert sizes(queue) == (0, 0, 0, 0)
    assert len(queue) == 0
    assert queue.room() == 3
    assert queue.take(0.0, 30.0) is None
    assert queue.next_deadline() is None
    assert queue.counters == Counters()


# -- push, reserve, commit, withdraw -------------------------------------------


def test_push_makes_a_ready_message_with_its_body_and_type():
    queue = WorkQueue(3)
    message = queue.push("a", b"body", "text/plain", key="k")
    assert message.state == READY
    assert (message.id, message.body, message.content_type, message.key) == (
        "a", b"body", "text/plain", "k",
    )
    assert message.deliveries == 0
    assert "a" in queue and queue.get("a") is message
    assert sizes(queue) == (1, 0, 1, 0)
    assert queue.counters.pushed == 1


def test_reserve_is_pending_counts_against_size_and_is_not_deliverable():
    queue = WorkQueue(2)
    message = queue.reserve("a", b"x")
    assert message.state == PENDING
    assert sizes(queue) == (1, 1, 0, 0)
    assert queue.room() == 1
    assert queue.counters.pushed == 0  # not accepted yet
    assert queue.take(0.0, 30.0) is None


def test_commit_makes_pending_ready_and_counts_pushed():
    queue = WorkQueue(2)
    queue.reserve("a", b"x")
    message = queue.commit("a")
    assert message.state == READY
    assert sizes(queue) == (1, 0, 1, 0)
    assert queue.counters.pushed == 1
    assert queue.take(0.0, 30.0) is message


def test_commit_of_unknown_or_not_pending_message_raises():
    queue = filled(3, "a")
    with pytest.raises(UnknownMessage):
        queue.commit("nope")
    with pytest.raises(UnknownMessage):
        queue.commit("a")  # already ready
    queue.take(0.0, 30.0)
    with pytest.raises(UnknownMessage):
        queue.commit("a")  # leased
    assert queue.counters.pushed == 1
    assert sizes(queue) == (1, 0, 0, 1)


def test_withdraw_frees_the_slot_of_a_pending_message():
    queue = WorkQueue(1)
    queue.reserve("a", b"x")
    with pytest.raises(QueueFull):
        queue.reserve("b", b"y")
    withdrawn = queue.withdraw("a")
    assert withdrawn.id == "a"
    assert "a" not in queue
    assert sizes(queue) == (0, 0, 0, 0)
    queue.push("b", b"y")  # the slot is free again
    assert drain(queue) == ["b"]
    assert queue.counters.pushed == 1


def test_withdraw_only_applies_to_pending_messages():
    queue = filled(3, "a", "b")
    queue.take(0.0, 30.0)  # a leased, b ready
    for message_id in ("a", "b", "nope"):
        with pytest.raises(UnknownMessage):
            queue.withdraw(message_id)
    assert sizes(queue) == (2, 0, 1, 1)


def test_commit_after_withdraw_raises():
    queue = WorkQueue(2)
    queue.reserve("a", b"x")
    queue.withdraw("a")
    with pytest.raises(UnknownMessage):
        queue.commit("a")
    with pytest.raises(UnknownMessage):
        queue.withdraw("a")


def test_commit_order_does_not_change_place_in_line():
    """A message's place in line is fixed when it is reserved."""
    queue = WorkQueue(3)
    queue.reserve_many([("a", b"", None, None), ("b", b"", None, None)])
    queue.commit("b")
    queue.commit("a")
    assert drain(queue) == ["a", "b"]


def test_pending_messages_cannot_be_taken_acked_nacked_or_touched():
    queue = WorkQueue(3)
    queue.reserve("p", b"x")
    assert queue.take(0.0, 30.0) is None
    for call in (
        lambda: queue.ack("p"),
        lambda: queue.nack("p"),
        lambda: queue.touch("p", 0.0, 30.0),
    ):
        with pytest.raises(UnknownMessage):
            call()
    assert queue.get("p").state == PENDING
    assert sizes(queue) == (1, 1, 0, 0)
    assert queue.counters.acked == 0


def test_iterating_gives_the_ids_of_every_held_message_in_any_state():
    queue = filled(5, "leased", "ready", "acked")
    queue.take(0.0, 30.0)
    queue.ack("acked")
    queue.reserve("pending", b"")
    assert sorted(queue) == ["leased", "pending", "ready"]
    assert sorted(m.id for m in queue.messages()) == ["leased", "pending", "ready"]


def test_duplicate_id_is_refused():
    queue = filled(3, "a")
    with pytest.raises(ValueError):
        queue.push("a", b"other")
    assert queue.get("a").body == b"a"
    assert sizes(queue) == (1, 0, 1, 0)


# -- capacity -----------------------------------------------------------------


def test_capacity_counts_pending_ready_and_leased():
    queue = WorkQueue(3)
    queue.push("leased", b"")
    queue.take(0.0, 30.0)
    queue.push("ready", b"")
    queue.reserve("pending", b"")
    assert sizes(queue) == (3, 1, 1, 1)
    assert queue.room() == 0
    with pytest.raises(QueueFull):
        queue.push("d", b"")
    with pytest.raises(QueueFull):
        queue.reserve("d", b"")


def test_queue_full_never_evicts_and_counts_rejected():
    queue = filled(2, "a", "b")
    with pytest.raises(QueueFull):
        queue.push("c", b"c")
    with pytest.raises(QueueFull):
        queue.reserve("d", b"d")
    assert queue.counters.rejected_full == 2
    assert queue.counters.pushed == 2
    assert "c" not in queue and "d" not in queue
    assert sizes(queue) == (2, 0, 2, 0)
    assert drain(queue) == ["a", "b"]
    assert [queue.get(i).body for i in ("a", "b")] == [b"a", b"b"]


def test_ack_frees_room_for_a_new_push():
    queue = filled(1, "a")
    with pytest.raises(QueueFull):
        queue.push("b", b"")
    queue.ack("a")
    queue.push("b", b"")
    assert drain(queue) == ["b"]


def test_taking_a_message_does_not_free_room():
    queue = filled(1, "a")
    queue.take(0.0, 30.0)
    assert queue.room() == 0
    with pytest.raises(QueueFull):
        queue.push("b", b"")


# -- reserve_many ---------------------------------------------------------------


def test_reserve_many_reserves_all_in_order():
    queue = WorkQueue(3)
    messages = queue.reserve_many(
        [("a", b"1", "text/plain", None), ("b", b"2", None, "k"), ("c", b"3", None, None)]
    )
    assert [m.id for m in messages] == ["a", "b", "c"]
    assert all(m.state == PENDING for m in messages)
    assert messages[1].key == "k" and messages[0].content_type == "text/plain"
    assert sizes(queue) == (3, 3, 0, 0)
    for message in messages:
        queue.commit(message.id)
    assert drain(queue) == ["a", "b", "c"]


def test_reserve_many_is_all_or_nothing_when_not_all_fit():
    queue = filled(4, "a", "b")
    entries = [("c", b"", None, None), ("d", b"", None, None), ("e", b"", None, None)]
    with pytest.raises(QueueFull):
        queue.reserve_many(entries)
    assert sizes(queue) == (2, 0, 2, 0)
    assert not any(i in queue for i in ("c", "d", "e"))
    assert queue.counters.rejected_full == 3
    # exactly filling the queue is allowed
    queue.reserve_many(entries[:2])
    assert queue.depth == 4 and queue.room() == 0


def test_reserve_many_with_a_duplicate_id_reserves_nothing():
    queue = filled(5, "a")
    with pytest.raises(ValueError):
        queue.reserve_many([("b", b"", None, None), ("a", b"", None, None)])
    assert "b" not in queue
    assert sizes(queue) == (1, 0, 1, 0)
    with pytest.raises(ValueError):
        queue.reserve_many([("c", b"", None, None), ("c", b"", None, None)])
    assert "c" not in queue
    assert sizes(queue) == (1, 0, 1, 0)


def test_commit_many_is_commit_of_each():
    queue = WorkQueue(6)
    messages = queue.reserve_many([("a", b"1", None, None), ("b", b"2", None, None)])
    queue.push("c", b"3")  # pushed after them, committed before them
    assert queue.commit_many(messages, now=5.0) is False  # none delayed
    assert sizes(queue) == (3, 0, 3, 0)
    assert queue.counters.pushed == 3
    assert queue.oldest_ready_since() == 5.0  # a's enqueue time
    assert drain(queue) == ["a", "b", "c"]  # in the order reserved


def test_commit_many_with_due_times_delays_those_reserved_with_one():
    queue = WorkQueue(4)
    messages = queue.reserve_many([("a", b"", None, None, 50.0), ("b", b"", None, None)])
    assert queue.commit_many(messages, now=1.0) is True
    assert queue.get("a").state == DELAYED and queue.get("b").state == READY
    assert drain(queue, now=1.0) == ["b"]


def test_commit_many_of_a_message_not_pending_commits_nothing():
    queue = WorkQueue(4)
    messages = queue.reserve_many([("a", b"", None, None), ("b", b"", None, None)])
    queue.withdraw("b")
    with pytest.raises(UnknownMessage):
        queue.commit_many(messages)
    assert sizes(queue) == (1, 1, 0, 0)
    assert queue.get("a").state == PENDING


def test_reserve_many_of_nothing_is_a_no_op():
    queue = filled(1, "a")
    assert queue.reserve_many([]) == []
    assert queue.counters.rejected_full == 0


# -- take ---------------------------------------------------------------------


def test_take_leases_in_push_order_and_sets_deadline():
    queue = filled(5, "a", "b", "c")
    first = queue.take(100.0, 30.0)
    assert first.id == "a"
    assert first.state == LEASED
    assert first.deliveries == 1
    assert first.deadline == 130.0
    assert sizes(queue) == (3, 0, 2, 1)
    assert drain(queue, 100.0) == ["b", "c"]
    assert queue.take(100.0, 30.0) is None
    assert queue.counters.delivered == 3
    assert queue.counters.redelivered == 0


def test_messages_pushed_later_are_delivered_after_earlier_ones():
    queue = filled(5, "a")
    assert queue.take(0.0, 30.0).id == "a"
    queue.push("b", b"")
    queue.push("c", b"")
    assert drain(queue) == ["b", "c"]


# -- ack ----------------------------------------------------------------------


def test_ack_of_a_leased_message_removes_it():
    queue = filled(3, "a", "b")
    queue.take(0.0, 30.0)
    acked = queue.ack("a")
    assert acked.id == "a" and acked.state == GONE
    assert "a" not in queue and queue.get("a") is None
    assert sizes(queue) == (1, 0, 1, 0)
    assert queue.counters.acked == 1
    assert queue.next_deadline() is None
    # its lease can no longer expire it back into the queue
    assert queue.expire(1000.0) == 0
    assert drain(queue, 1000.0) == ["b"]
    assert queue.counters.expired == 0


def test_ack_of_a_ready_message_removes_it_from_the_line():
    queue = filled(3, "a", "b", "c")
    queue.ack("b")
    assert "b" not in queue
    assert sizes(queue) == (2, 0, 2, 0)
    assert queue.counters.acked == 1
    assert drain(queue) == ["a", "c"]


def test_ack_twice_is_unknown_message():
    queue = filled(3, "a")
    queue.ack("a")
    with pytest.raises(UnknownMessage):
        queue.ack("a")
    assert queue.counters.acked == 1


def test_ack_of_never_pushed_id_is_unknown_message():
    queue = filled(3, "a")
    with pytest.raises(UnknownMessage):
        queue.ack("b")
    assert sizes(queue) == (1, 0, 1, 0)


def test_unknown_message_is_a_key_error():
    """Callers may treat a missing id like a missing dict key."""
    with pytest.raises(KeyError):
        WorkQueue(1).ack("x")


def test_only_ack_removes_a_message():
    """Nack, expiry, touch and lease release all keep the message queued."""
    queue = filled(2, "a")
    queue.take(0.0, 1.0)
    queue.touch("a", 0.5, 1.0)
    queue.expire(10.0)
    queue.take(10.0, 1.0)
    queue.nack("a")
    queue.take(10.0, 1.0)
    queue.release_all_leases()
    assert "a" in queue and queue.depth == 1
    assert queue.get("a").deliveries == 3
    queue.ack("a")
    assert queue.depth == 0


# -- nack ---------------------------------------------------------------------


def test_nack_makes_a_leased_message_ready_at_its_original_place():
    queue = filled(5, "a", "b", "c")
    queue.take(0.0, 30.0)  # a
    queue.take(0.0, 30.0)  # b
    nacked = queue.nack("b")
    assert nacked.state == READY
    assert nacked.deadline == 0.0
    assert sizes(queue) == (3, 0, 2, 1)
    assert queue.counters.nacked == 1
    taken = queue.take(0.0, 30.0)
    assert taken.id == "b"  # before c: b was pushed first
    assert taken.deliveries == 2
    assert queue.counters.redelivered == 1


def test_nack_on_a_ready_message_is_a_no_op():
    queue = filled(5, "a", "b")
    message = queue.nack("b")
    assert message.state == READY
    assert sizes(queue) == (2, 0, 2, 0)
    assert queue.counters.nacked == 0
    # it is not queued twice, and keeps its place after a
    assert drain(queue) == ["a", "b"]
    assert queue.take(0.0, 30.0) is None


def test_nack_of_unknown_message_raises():
    queue = filled(2, "a")
    with pytest.raises(UnknownMessage):
        queue.nack("b")
    queue.ack("a")
    with pytest.raises(UnknownMessage):
        queue.nack("a")


def test_nacked_lease_does_not_expire_later():
    queue = filled(2, "a")
    queue.take(0.0, 10.0)
    queue.nack("a")
    assert queue.next_deadline() is None
    assert queue.expire(100.0) == 0
    assert queue.counters.expired == 0
    assert queue.get("a").state == READY


# -- touch --------------------------------------------------------------------


def test_touch_extends_the_lease_so_the_old_deadline_does_not_expire_it():
    queue = filled(2, "a")
    queue.take(0.0, 10.0)
    touched = queue.touch("a", 8.0, 10.0)
    assert touched.deadline == 18.0
    assert queue.next_deadline() == 18.0
    assert queue.expire(10.0) == 0
    assert queue.expire(17.9) == 0
    assert queue.get("a").state == LEASED
    assert queue.take(17.9, 10.0) is None
    assert queue.expire(18.0) == 1
    assert queue.get("a").state == READY


def test_touch_can_shorten_the_lease():
    queue = filled(2, "a")
    queue.take(0.0, 100.0)
    queue.touch("a", 1.0, 1.0)
    assert queue.next_deadline() == 2.0
    assert queue.expire(2.0) == 1
    assert queue.get("a").state == READY
    # the stale original deadline does nothing once it passes
    queue.take(3.0, 200.0)
    assert queue.expire(100.0) == 0
    assert queue.get("a").state == LEASED


def test_touch_on_a_ready_message_raises_not_leased():
    queue = filled(2, "a")
    with pytest.raises(NotLeased):
        queue.touch("a", 0.0, 10.0)
    assert queue.get("a").state == READY
    assert queue.next_deadline() is None
    assert drain(queue) == ["a"]


def test_touch_of_unknown_message_raises_unknown():
    queue = filled(2, "a")
    with pytest.raises(UnknownMessage):
        queue.touch("b", 0.0, 10.0)
    queue.ack("a")
    with pytest.raises(UnknownMessage):
        queue.touch("a", 0.0, 10.0)


def test_touch_does_not_count_a_delivery():
    queue = filled(2, "a")
    queue.take(0.0, 10.0)
    queue.touch("a", 1.0, 10.0)
    assert queue.get("a").deliveries == 1
    assert queue.counters.delivered == 1


# -- expire and next_deadline -------------------------------------------------


def test_lease_expiry_returns_the_message_to_its_original_place():
    queue = filled(5, "a", "b", "c")
    queue.take(0.0, 10.0)  # a
    queue.push("d", b"")
    assert queue.expire(9.99) == 0
    assert queue.get("a").state == LEASED
    assert queue.expire(10.0) == 1  # the deadline itself is past the lease
    message = queue.get("a")
    assert message.state == READY and message.deadline == 0.0
    assert sizes(queue) == (4, 0, 4, 0)
    assert queue.counters.expired == 1
    assert drain(queue, 10.0) == ["a", "b", "c", "d"]
    assert queue.get("a").deliveries == 2
    assert queue.counters.delivered == 5
    assert queue.counters.redelivered == 1


def test_expired_messages_come_back_in_push_order_not_deadline_order():
    queue = filled(5, "a", "b", "c")
    queue.take(0.0, 50.0)  # a, deadline 50
    queue.take(0.0, 10.0)  # b, deadline 10
    queue.take(0.0, 30.0)  # c, deadline 30
    assert queue.next_deadline() == 10.0
    assert queue.expire(60.0) == 3
    assert queue.counters.expired == 3
    assert drain(queue, 60.0) == ["a", "b", "c"]


def test_expire_only_returns_leases_past_their_deadline():
    queue = filled(5, "a", "b", "c")
    queue.take(0.0, 10.0)
    queue.take(0.0, 20.0)
    queue.take(0.0, 30.0)
    assert queue.expire(20.0) == 2
    assert [queue.get(i).state for i in ("a", "b", "c")] == [READY, READY, LEASED]
    assert queue.next_deadline() == 30.0
    assert sizes(queue) == (3, 0, 2, 1)


def test_next_deadline_is_the_earliest_live_lease():
    queue = filled(5, "a", "b")
    queue.take(0.0, 20.0)  # a @ 20
    queue.take(0.0, 10.0)  # b @ 10
    assert queue.next_deadline() == 10.0
    queue.ack("b")
    assert queue.next_deadline() == 20.0
    queue.touch("a", 5.0, 100.0)
    assert queue.next_deadline() == 105.0
    queue.nack("a")
    assert queue.next_deadline() is None


def test_an_expired_message_can_be_leased_again_with_a_new_deadline():
    queue = filled(2, "a")
    queue.take(0.0, 10.0)
    queue.expire(10.0)
    again = queue.take(11.0, 10.0)
    assert again.id == "a" and again.deadline == 21.0
    assert queue.expire(20.0) == 0
    assert queue.expire(21.0) == 1
    assert queue.counters.expired == 2


# -- release_all_leases -------------------------------------------------------


def test_release_all_leases_makes_leased_messages_ready_in_order():
    queue = filled(5, "a", "b", "c")
    queue.reserve("p", b"")
    queue.take(0.0, 10.0)
    queue.take(0.0, 10.0)
    assert queue.release_all_leases() == 2
    assert sizes(queue) == (4, 1, 3, 0)
    assert queue.get("p").state == PENDING
    assert queue.next_deadline() is None
    assert queue.expire(1000.0) == 0
    assert drain(queue) == ["a", "b", "c"]
    assert queue.get("a").deliveries == 2


def test_release_all_leases_with_nothing_leased():
    queue = filled(2, "a")
    assert queue.release_all_leases() == 0
    assert sizes(queue) == (1, 0, 1, 0)


# -- restore ------------------------------------------------------------------


def test_restore_ignores_capacity():
    queue = filled(1, "a")
    restored = queue.restore("r", b"x", "text/plain", key="k", deliveries=2)
    assert restored.state == READY
    assert (restored.body, restored.content_type, restored.key, restored.deliveries) == (
        b"x", "text/plain", "k", 2,
    )
    assert queue.depth == 2 and queue.room() == 0
    assert queue.counters.rejected_full == 0
    with pytest.raises(QueueFull):
        queue.push("b", b"")


def test_restore_orders_by_order():
    queue = WorkQueue(10)
    queue.restore("c", b"", order=30)
    queue.restore("a", b"", order=10)
    queue.restore("b", b"", order=20)
    queue.push("d", b"")  # pushed later: after every restored message
    assert drain(queue) == ["a", "b", "c", "d"]


def test_restore_without_order_goes_last():
    queue = filled(5, "a")
    queue.restore("r", b"")
    queue.push("b", b"")
    assert drain(queue) == ["a", "r", "b"]


def test_restore_of_an_older_message_goes_before_newer_ready_ones():
    queue = WorkQueue(10)
    queue.restore("old", b"", order=5)
    queue.push("new", b"")
    queue.restore("older", b"", order=1)
    assert drain(queue) == ["older", "old", "new"]


def test_restore_of_a_queued_id_keeps_the_queued_message():
    queue = filled(5, "a")
    queue.take(0.0, 10.0)
    again = queue.restore("a", b"other", order=0)
    assert again is queue.get("a")
    assert again.body == b"a" and again.state == LEASED
    assert queue.depth == 1


def test_restore_with_an_order_already_in_use_loses_no_message():
    """Restored orders come from another node's numbering and may collide."""
    queue = filled(5, "a", "b")  # orders 0 and 1
    queue.restore("r", b"", order=0)
    assert queue.depth == 3
    assert sizes(queue) == (3, 0, 3, 0)
    assert sorted(drain(queue)) == ["a", "b", "r"]
    for message_id in ("a", "b", "r"):
        queue.ack(message_id)
    assert queue.depth == 0


def test_ack_of_ready_message_sharing_an_order_leaves_the_other():
    queue = filled(5, "a")  # order 0
    queue.restore("r", b"", order=0)
    queue.ack("r")
    assert drain(queue) == ["a"]


def test_restored_deliveries_count_toward_redelivery():
    queue = WorkQueue(5)
    queue.restore("fresh", b"", deliveries=0)
    queue.restore("seen", b"", deliveries=1)
    assert queue.take(0.0, 10.0).deliveries == 1
    assert queue.take(0.0, 10.0).deliveries == 2
    assert queue.counters.delivered == 2
    assert queue.counters.redelivered == 1
    assert queue.counters.pushed == 0


# -- counters -----------------------------------------------------------------


def test_counters_over_a_message_life():
    queue = WorkQueue(5)
    queue.push("a", b"")
    queue.push("b", b"")
    queue.take(0.0, 10.0)  # a: 1st delivery
    queue.nack("a")
    queue.take(0.0, 10.0)  # a: 2nd delivery
    queue.expire(10.0)
    queue.take(10.0, 10.0)  # a: 3rd delivery
    queue.take(10.0, 10.0)  # b: 1st delivery
    queue.ack("a")
    assert queue.counters.as_dict() == {
        "pushed": 2,
        "delivered": 4,
        "redelivered": 2,
        "acked": 1,
        "nacked": 1,
        "expired": 1,
        "rejected_full": 0,
    }


def test_counters_as_dict_has_the_stats_fields():
    keys = set(Counters().as_dict())
    assert {"pushed", "delivered", "redelivered", "acked", "rejected_full"} <= keys


# -- memory follows the queue ---------------------------------------------------


def line_entries(queue: WorkQueue) -> tuple[int, int]:
    """Entries held by the ready line and the lease line, stale ones included."""
    ready = len(queue._ready) + len(queue._ready_heap)
    leases = len(queue._leases) + len(queue._lease_heap)
    return ready, leases


def test_acks_of_ready_messages_do_not_pile_up_in_the_ready_line():
    queue = WorkQueue(10)
    for n in range(10000):
        queue.push(f"m{n}", b"")
        queue.ack(f"m{n}")  # acked in place, never taken
    assert queue.depth == 0 and queue.ready == 0
    assert line_entries(queue)[0] <= 200
    queue.push("last", b"")
    assert drain(queue) == ["last"]


def test_acked_leases_do_not_pile_up_in_the_lease_line():
    queue = WorkQueue(10)
    for n in range(10000):
        queue.push(f"m{n}", b"")
        assert queue.take(float(n), 300.0).id == f"m{n}"
        queue.ack(f"m{n}")  # the lease stays due in 300 s
    assert queue.leased == 0 and queue.next_deadline() is None
    assert line_entries(queue)[1] <= 200


def test_touched_leases_do_not_pile_up_in_the_lease_line():
    queue = filled(5, "a", "b")
    queue.take(0.0, 10.0)
    queue.take(0.0, 10.0)
    for n in range(10000):
        queue.touch("a", float(n), 10.0)
    assert line_entries(queue)[1] <= 200
    assert queue.next_deadline() == 10.0  # b's
    assert queue.expire(10.0) == 1
    assert queue.next_deadline() == 9999.0 + 10.0
    assert queue.expire(10009.0) == 1
    assert drain(queue, 10009.0) == ["a", "b"]


def test_redeliveries_and_first_deliveries_interleave_by_place_in_line():
    queue = filled(10, "a", "b", "c", "d")
    assert queue.take(0.0, 1.0).id == "a"
    assert queue.take(0.0, 2.0).id == "b"
    assert queue.take(0.0, 3.0).id == "c"
    queue.nack("c")
    queue.expire(2.0)  # a and b back
    assert drain(queue, 2.0) == ["a", "b", "c", "d"]


# -- receipts -------------------------------------------------------------------


def test_every_lease_has_a_new_url_safe_receipt():
    queue = filled(5, "a", "b")
    first = queue.take(0.0, 10.0)
    receipts = {first.receipt}
    assert queue.take(0.0, 10.0).receipt not in receipts  # another message
    receipts.add(queue.get("b").receipt)
    queue.nack("a")
    again = queue.take(0.0, 10.0)
    assert again.id == "a" and again.receipt not in receipts  # the same message again
    receipts.add(again.receipt)
    assert all(r and all(c.isalnum() or c in "-_" for c in r) for r in receipts)


def test_a_message_has_a_receipt_only_while_leased():
    queue = filled(5, "a")
    assert queue.get("a").receipt is None
    message = queue.take(0.0, 10.0)
    assert message.receipt is not None
    queue.nack("a", message.receipt)
    assert message.receipt is None
    queue.take(0.0, 10.0)
    assert queue.ack("a").receipt is None


def test_receipts_of_two_queues_differ_and_a_given_prefix_is_used():
    one, other = filled(5, "a"), filled(5, "a")
    assert one.take(0.0, 10.0).receipt != other.take(0.0, 10.0).receipt
    assert filled(5, "a", receipt_prefix="P-").take(0.0, 1.0).receipt.startswith("P-")


def test_a_late_worker_cannot_nack_the_lease_of_the_next_one():
    """The issue's story: A's lease ran out, B took the message, A nacks."""
    queue = filled(5, "a")
    receipt_a = queue.take(0.0, 10.0).receipt
    queue.expire(10.0)
    receipt_b = queue.take(10.0, 30.0).receipt
    with pytest.raises(LeaseLost):
        queue.nack("a", receipt_a, now=11.0)
    message = queue.get("a")
    assert message.state == LEASED and message.receipt == receipt_b
    assert message.deadline == 40.0
    assert queue.take(11.0, 30.0) is None  # not handed to a third worker
    assert queue.counters.nacked == 0


def test_nack_with_the_current_receipt_makes_the_message_ready():
    queue = filled(5, "a", "b")
    receipt = queue.take(0.0, 10.0).receipt
    assert queue.nack("a", receipt, now=5.0).state == READY
    assert queue.counters.nacked == 1
    assert drain(queue) == ["a", "b"]


def test_a_nacked_lease_receipt_is_lost():
    queue = filled(5, "a")
    receipt = queue.take(0.0, 10.0).receipt
    queue.nack("a", receipt)
    with pytest.raises(LeaseLost):
        queue.nack("a", receipt)
    with pytest.raises(LeaseLost):
        queue.touch("a", 1.0, 10.0, receipt=receipt)
    assert queue.get("a").state == READY


def test_a_lease_past_its_deadline_is_lost_before_the_timer_expires_it():
    queue = filled(5, "a")
    receipt = queue.take(0.0, 10.0).receipt
    with pytest.raises(LeaseLost):
        queue.touch("a", 10.0, 30.0, receipt=receipt)
    with pytest.raises(LeaseLost):
        queue.nack("a", receipt, now=10.0)
    assert queue.get("a").state == LEASED and queue.next_deadline() == 10.0
    assert queue.expire(10.0) == 1


def test_touch_with_the_current_receipt_extends_and_keeps_the_receipt():
    queue = filled(5, "a")
    receipt = queue.take(0.0, 10.0).receipt
    touched = queue.touch("a", 9.0, 30.0, receipt=receipt)
    assert touched.deadline == 39.0 and touched.receipt == receipt
    assert queue.expire(38.0) == 0
    queue.nack("a", receipt, now=38.0)
    assert queue.get("a").state == READY


def test_a_wrong_receipt_changes_nothing():
    queue = filled(5, "a")
    receipt = queue.take(0.0, 10.0).receipt
    for wrong in ("", "x", receipt + "0"):
        with pytest.raises(LeaseLost):
            queue.touch("a", 1.0, 99.0, receipt=wrong)
        with pytest.raises(LeaseLost):
            queue.nack("a", wrong)
    assert queue.get("a").deadline == 10.0 and queue.get("a").receipt == receipt


def test_lease_lost_is_a_kind_of_not_leased():
    queue = filled(5, "a")
    with pytest.raises(NotLeased):
        queue.touch("a", 0.0, 10.0, receipt="r")


def test_receipts_do_not_make_unknown_or_pending_messages_known():
    queue = WorkQueue(5)
    queue.reserve("p", b"")
    for message_id in ("p", "never"):
        with pytest.raises(UnknownMessage):
            queue.nack(message_id, "r")
        with pytest.raises(UnknownMessage):
            queue.touch(message_id, 0.0, 10.0, receipt="r")


def test_nack_delay_needs_now_and_must_not_be_negative():
    queue = filled(5, "a")
    receipt = queue.take(0.0, 10.0).receipt
    with pytest.raises(ValueError):
        queue.nack("a", receipt, delay=5.0)
    with pytest.raises(ValueError):
        queue.nack("a", receipt, now=1.0, delay=-1.0)
    assert queue.get("a").receipt == receipt


# -- held (poison messages) -------------------------------------------------------


def poisoned(max_deliveries: int, *ids: str) -> WorkQueue:
    """A queue whose messages ``ids`` were each delivered and nacked until held."""
    queue = WorkQueue(10, max_deliveries=max_deliveries)
    for message_id in ids:
        queue.push(message_id, message_id.encode())
    for _ in range(max_deliveries):
        for message_id in ids:
            message = queue.take(0.0, 10.0)
            assert message.id == message_id
            queue.nack(message_id, message.receipt)
    return queue


def test_max_deliveries_must_not_be_negative():
    with pytest.raises(ValueError):
        WorkQueue(5, max_deliveries=-1)


def test_a_message_nacked_after_its_last_delivery_is_held_not_dropped():
    queue = WorkQueue(5, max_deliveries=2)
    queue.push("a", b"body")
    queue.nack("a", queue.take(0.0, 10.0).receipt)
    assert queue.get("a").state == READY  # one delivery: ready again
    queue.nack("a", queue.take(0.0, 10.0).receipt)
    message = queue.get("a")
    assert message.state == HELD and message.deliveries == 2 and message.body == b"body"
    assert (queue.depth, queue.held, queue.ready, queue.leased) == (1, 1, 0, 0)
    assert queue.take(0.0, 10.0) is None
    assert queue.next_wakeup() is None


def test_a_lease_that_runs_out_after_the_last_delivery_holds_the_message():
    queue = filled(5, "a", "b", max_deliveries=1)
    queue.take(0.0, 10.0)
    assert queue.expire(10.0) == 1
    assert queue.get("a").state == HELD and queue.counters.expired == 1
    assert drain(queue, 10.0) == ["b"]


def test_released_leases_after_the_last_delivery_are_held():
    queue = filled(5, "a", max_deliveries=1)
    queue.take(0.0, 10.0)
    assert queue.release_all_leases() == 1
    assert queue.get("a").state == HELD


def test_held_wins_over_a_nack_delay():
    queue = filled(5, "a", max_deliveries=1)
    receipt = queue.take(0.0, 10.0).receipt
    queue.nack("a", receipt, now=1.0, delay=30.0)
    assert queue.get("a").state == HELD and queue.delayed == 0


def test_without_a_limit_nothing_is_ever_held():
    queue = filled(5, "a")
    for n in range(50):
        message = queue.take(float(n), 1.0)
        if n % 2:
            queue.nack("a", message.receipt)
        else:
            queue.expire(n + 1.0)
    assert queue.held == 0 and queue.get("a").deliveries == 50


def test_held_messages_count_against_size():
    queue = poisoned(1, "a", "b")
    for n in range(8):
        queue.push(f"m{n}", b"")
    with pytest.raises(QueueFull):
        queue.push("over", b"")
    assert queue.depth == 10 and queue.held == 2


def test_held_messages_lists_oldest_first_up_to_count():
    queue = poisoned(1, "a", "b", "c")
    assert [m.id for m in queue.held_messages(100)] == ["a", "b", "c"]
    assert [m.id for m in queue.held_messages(2)] == ["a", "b"]
    assert queue.held_messages(0) == []
    assert filled(5, "x").held_messages(10) == []


def test_kick_makes_a_held_message_ready_at_its_place_in_line():
    queue = poisoned(1, "a")
    queue.push("b", b"")
    kicked = queue.kick("a")
    assert kicked.state == READY and queue.held == 0 and queue.ready == 2
    again = queue.take(0.0, 10.0)
    assert again.id == "a" and again.deliveries == 2
    queue.nack("a", again.receipt)  # one more try, failed: held again
    assert queue.get("a").state == HELD
    assert drain(queue) == ["b"]


def test_kick_of_a_message_that_is_not_held():
    queue = poisoned(1, "h")
    queue.push("a", b"")
    with pytest.raises(NotHeld):
        queue.kick("a")
    queue.take(0.0, 10.0)
    with pytest.raises(NotHeld):
        queue.kick("a")
    queue.reserve("p", b"")
    for message_id in ("p", "never"):
        with pytest.raises(UnknownMessage):
            queue.kick(message_id)


def test_ack_removes_a_held_message():
    queue = poisoned(1, "a", "b")
    assert queue.ack("a").id == "a"
    assert (queue.depth, queue.held) == (1, 1)
    assert [m.id for m in queue.held_messages(10)] == ["b"]
    with pytest.raises(UnknownMessage):
        queue.kick("a")


# -- delays ------------------------------------------------------------------------


def test_a_delayed_push_is_not_delivered_before_it_is_due():
    queue = WorkQueue(5)
    message = queue.push("a", b"", due=30.0)
    assert message.state == DELAYED and message.due == 30.0
    assert (queue.depth, queue.delayed, queue.ready) == (1, 1, 0)
    assert queue.next_due() == 30.0 and queue.next_wakeup() == 30.0
    assert queue.promote_due(29.999) == 0
    assert queue.take(29.999, 10.0) is None
    assert queue.promote_due(30.0) == 1
    assert (queue.delayed, queue.ready) == (0, 1) and message.due is None
    assert queue.take(30.0, 10.0).id == "a"
    assert queue.next_due() is None


def test_a_delayed_message_joins_the_end_of_the_line_when_due():
    queue = WorkQueue(10)
    queue.push("late", b"", due=5.0)
    queue.push("b", b"")
    queue.push("c", b"")
    queue.promote_due(5.0)
    queue.push("d", b"")
    assert drain(queue, 5.0) == ["b", "c", "late", "d"]


def test_delayed_messages_due_together_join_in_due_then_line_order():
    queue = WorkQueue(10)
    queue.push("x", b"", due=9.0)
    queue.push("y", b"", due=7.0)
    queue.push("z", b"", due=7.0)
    queue.push("w", b"", due=8.0)
    assert queue.next_due() == 7.0
    assert queue.promote_due(10.0) == 4
    assert drain(queue, 10.0) == ["y", "z", "w", "x"]


def test_no_delayed_message_joins_a_moment_before_it_is_due():
    queue = WorkQueue(10)
    queue.push("in-order", b"", due=10.0)
    queue.push("earlier", b"", due=5.0)  # due before one already waiting
    queue.push("later", b"", due=20.0)
    assert queue.promote_due(4.999) == 0
    assert queue.promote_due(5.0) == 1 and queue.get("earlier").state == READY
    assert queue.promote_due(9.999) == 0
    assert queue.promote_due(19.999) == 1 and queue.get("later").state == DELAYED
    assert drain(queue, 19.999) == ["earlier", "in-order"]


def test_nack_with_a_delay_retries_after_it_at_the_end_of_the_line():
    queue = filled(5, "a", "b")
    receipt = queue.take(0.0, 10.0).receipt
    message = queue.nack("a", receipt, now=2.0, delay=3.0)
    assert message.state == DELAYED and message.due == 5.0
    assert queue.counters.nacked == 1 and queue.leased == 0
    assert queue.advance(4.0) == 0
    assert drain(queue, 4.0) == ["b"]
    assert queue.advance(5.0) == 1
    again = queue.take(5.0, 10.0)
    assert again.id == "a" and again.deliveries == 2


def test_reserved_with_a_due_time_the_commit_delays_it():
    queue = WorkQueue(5)
    queue.reserve("a", b"", due=20.0)
    assert queue.get("a").state == PENDING and queue.delayed == 0
    assert queue.commit("a").state == DELAYED and queue.get("a").due == 20.0
    queue.reserve("b", b"")
    assert queue.commit("b", due=30.0).due == 30.0
    queue.reserve("c", b"", due=40.0)
    assert queue.commit("c", due=10.0).due == 10.0  # the commit's due time wins
    queue.reserve("w", b"", due=50.0)
    queue.withdraw("w")
    queue.reserve("w2", b"")
    assert queue.commit("w2").state == READY
    assert queue.counters.pushed == 4
    assert (queue.delayed, queue.ready, queue.pending) == (3, 1, 0)


def test_reserve_many_takes_a_due_time_per_entry():
    queue = WorkQueue(5)
    queue.reserve_many([("a", b"", None, None, 10.0), ("b", b"", None, None),
                        ("c", b"", None, None, None)])
    states = [queue.commit(i).state for i in ("a", "b", "c")]
    assert states == [DELAYED, READY, READY]


def test_delayed_messages_count_against_size():
    queue = WorkQueue(2)
    queue.push("a", b"", due=100.0)
    queue.push("b", b"")
    with pytest.raises(QueueFull):
        queue.push("c", b"", due=1.0)
    assert queue.depth == 2


def test_ack_removes_a_delayed_message():
    queue = WorkQueue(5)
    queue.push("a", b"", due=10.0)
    queue.push("b", b"", due=20.0)
    assert queue.ack("a").state == GONE
    assert (queue.depth, queue.delayed) == (1, 1)
    assert queue.next_due() == 20.0
    assert queue.promote_due(100.0) == 1
    assert drain(queue, 100.0) == ["b"]


def test_acked_delayed_messages_do_not_pile_up_in_the_due_line():
    queue = WorkQueue(10)
    queue.push("keep", b"", due=1e9)
    for n in range(10000):
        queue.push(f"m{n}", b"", due=float(10000 - n))  # out of order: the heap
        queue.ack(f"m{n}")
    assert len(queue._due_line) + len(queue._due_heap) <= 200
    assert queue.next_due() == 1e9 and queue.delayed == 1


def test_next_wakeup_is_the_earlier_of_lease_deadline_and_due_time():
    queue = filled(5, "a")
    queue.push("later", b"", due=50.0)
    assert queue.next_wakeup() == 50.0
    queue.take(0.0, 20.0)
    assert (queue.next_deadline(), queue.next_due(), queue.next_wakeup()) == (20.0, 50.0, 20.0)
    assert queue.advance(20.0) == 1  # the lease
    assert queue.next_wakeup() == 50.0
    assert queue.advance(60.0) == 1  # the due time
    assert queue.next_wakeup() is None and queue.ready == 2


# -- peek -------------------------------------------------------------------------


def test_peek_names_every_state_and_changes_nothing():
    queue = poisoned(1, "held")
    queue.push("leased", b"")
    lease = queue.take(0.0, 10.0)
    queue.push("ready", b"")
    queue.push("delayed", b"", due=10.0)
    queue.reserve("pending", b"")
    counters = queue.counters.as_dict()
    for message_id in ("pending", "ready", "leased", "delayed", "held"):
        message, state = queue.peek(message_id)
        assert message.id == message_id and state == message_id
        assert message.state_name == message_id
    assert queue.get("ready").deliveries == 0
    assert queue.get("leased").receipt == lease.receipt and queue.get("leased").deadline == 10.0
    assert queue.counters.as_dict() == counters
    assert (queue.pending, queue.ready, queue.leased, queue.delayed, queue.held) == (1, 1, 1, 1, 1)


def test_peek_of_a_message_not_queued_is_unknown():
    queue = filled(5, "a")
    queue.ack("a")
    for message_id in ("a", "never"):
        with pytest.raises(UnknownMessage):
            queue.peek(message_id)


# -- restore with state ----------------------------------------------------------


def test_restore_keeps_a_held_message_held():
    queue = WorkQueue(5, max_deliveries=3)
    restored = queue.restore("h", b"x", deliveries=3, held=True)
    assert restored.state == HELD and restored.deliveries == 3
    assert queue.held == 1 and queue.take(0.0, 10.0) is None
    assert queue.kick("h").state == READY


def test_restore_keeps_a_delayed_message_s_due_time():
    queue = WorkQueue(5)
    restored = queue.restore("d", b"x", deliveries=1, due=50.0)
    assert restored.state == DELAYED and restored.due == 50.0
    assert queue.delayed == 1 and queue.take(49.0, 10.0) is None
    assert queue.advance(50.0) == 1
    assert queue.take(50.0, 10.0).deliveries == 2


def test_restored_held_messages_list_in_their_restored_order():
    queue = WorkQueue(5)
    queue.restore("b", b"", order=20, held=True)
    queue.restore("a", b"", order=10, held=True)
    assert [m.id for m in queue.held_messages(10)] == ["a", "b"]


def test_a_restored_message_past_the_limit_is_delivered_once_more_then_held():
    queue = WorkQueue(5, max_deliveries=2)
    queue.restore("a", b"", deliveries=2)  # not held when it was saved
    message = queue.take(0.0, 10.0)
    assert message.deliveries == 3
    queue.expire(10.0)
    assert queue.get("a").state == HELD

"""Unit tests of the pure queue core (dqid.queue): no reactor, time passed in.

The promises checked here are DESIGN.md's "Bounded" (capacity counts ready +
leased + pending, a full queue refuses and never evicts), "Nothing dropped"
(only an ack removes a message; an expired lease makes it ready again) and
"First deliveries are FIFO"; plus the semantics of ack/nack/touch in the HTTP
API table.
"""

from __future__ import annotations

import pytest

from dqid.queue import (
    GONE,
    LEASED,
    PENDING,
    READY,
    Counters,
    NotLeased,
    QueueFull,
    UnknownMessage,
    WorkQueue,
)


def filled(size: int, *ids: str) -> WorkQueue:
    queue = WorkQueue(size)
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

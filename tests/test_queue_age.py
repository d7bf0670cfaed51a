"""The age of the oldest ready message (dqid/queue.py ``oldest_ready_since``):
what ``dqid_oldest_ready_age_seconds`` and ``/stats`` ``oldest_ready_age``
report, the one number SQS users alarm on.

The queue keeps each message's enqueue time without a slot of its own: in
the ``deadline`` slot while it is ready or held, in its Lease while leased.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dqid.queue import STAMP_RESOLUTION, WorkQueue


def test_an_empty_queue_has_no_oldest_ready_message():
    queue = WorkQueue(5)
    assert queue.oldest_ready_since() is None
    queue.push("a", b"x", now=10.0)
    queue.take(11.0, 30.0)
    assert queue.oldest_ready_since() is None  # leased is not ready


def test_it_is_the_enqueue_time_of_the_message_next_in_line():
    queue = WorkQueue(5)
    queue.push("a", b"x", now=10.0)
    queue.push("b", b"x", now=20.0)
    assert queue.oldest_ready_since() == 10.0
    assert queue.take(25.0, 30.0).id == "a"
    assert queue.oldest_ready_since() == 20.0
    queue.expire(55.0)  # a's lease ran out: back first in line, still from 10
    assert queue.oldest_ready_since() == 10.0
    queue.ack("a")
    assert queue.oldest_ready_since() == 20.0


def test_a_replicated_push_is_enqueued_when_it_is_committed():
    queue = WorkQueue(5)
    queue.reserve("a", b"x")
    assert queue.oldest_ready_since() is None  # pending is not ready
    queue.commit("a", now=7.5)
    assert queue.oldest_ready_since() == 7.5


def test_nacked_touched_and_kicked_messages_keep_their_enqueue_time():
    queue = WorkQueue(5, max_deliveries=1)
    queue.push("a", b"x", now=3.0)
    receipt = queue.take(4.0, 30.0).receipt
    queue.touch("a", 5.0, 60.0, receipt)
    queue.nack("a", receipt, now=6.0)  # delivered once: held
    assert queue.get("a").held and queue.oldest_ready_since() is None
    queue.kick("a")
    assert queue.oldest_ready_since() == 3.0


def test_a_delayed_message_is_enqueued_when_it_is_due():
    queue = WorkQueue(5)
    queue.push("later", b"x", due=50.0, now=1.0)
    queue.push("now", b"x", now=2.0)
    queue.take(3.0, 30.0)
    assert queue.oldest_ready_since() is None
    queue.promote_due(60.0)
    assert queue.oldest_ready_since() == 50.0


def test_restored_messages_are_enqueued_when_restored():
    queue = WorkQueue(5)
    queue.restore("a", b"x", now=100.0)
    queue.restore("h", b"x", held=True, now=100.0)
    assert queue.oldest_ready_since() == 100.0
    queue.ack("a")
    queue.kick("h")
    assert queue.oldest_ready_since() == 100.0


def test_a_time_never_told_is_zero():
    queue = WorkQueue(5)
    queue.push("a", b"x")
    assert queue.oldest_ready_since() == 0.0


def test_messages_enqueued_close_together_share_one_time_object():
    queue = WorkQueue(10_000)
    for i in range(1000):  # 1,000 pushes within 0.1 s
        queue.push(f"m{i}", b"x", now=1000.0 + i * 0.0001)
    stamps = {id(m.deadline) for m in queue.messages()}
    assert len(stamps) <= 2
    assert queue.oldest_ready_since() == 1000.0


# Operations on a queue, with the time moving forward by each one's step.
operation = st.tuples(
    st.sampled_from(["push", "push_delayed", "take", "nack", "nack_delayed", "ack",
                     "advance", "check"]),
    st.floats(min_value=0.0, max_value=5.0),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(operation, max_size=60))
def test_the_next_message_taken_was_enqueued_when_oldest_ready_since_says(ops):
    """Whatever happened before, the message take() hands out next entered
    the line (push, or due time) no later than the time reported, and less
    than STAMP_RESOLUTION before it."""
    queue = WorkQueue(20)
    entered: dict[str, float] = {}  # the model: id -> when it joined the line
    leased: dict[str, str] = {}  # id -> receipt
    now, count = 0.0, 0
    for name, step in ops:
        now += step
        if name in ("push", "push_delayed") and queue.room():
            count += 1
            message_id = f"m{count}"
            due = now + step + 1.0 if name == "push_delayed" else None
            queue.push(message_id, b"x", due=due, now=now)
            entered[message_id] = due if due is not None else now
        elif name in ("nack", "nack_delayed", "ack") and leased:
            message_id = sorted(leased)[0]
            receipt = leased.pop(message_id)
            message = queue.get(message_id)
            if name == "ack":
                queue.ack(message_id)
                del entered[message_id]
            elif message.receipt == receipt and now < message.deadline:
                delay = 2.0 if name == "nack_delayed" else 0.0
                queue.nack(message_id, receipt, now=now, delay=delay)
                if delay:
                    entered[message_id] = now + delay
        elif name == "advance":
            queue.advance(now)
        elif name in ("take", "check"):
            queue.advance(now)
            since = queue.oldest_ready_since()
            message = queue.take(now, 3.0)
            if message is None:
                assert since is None
                continue
            leased[message.id] = message.receipt
            assert since is not None
            assert entered[message.id] - STAMP_RESOLUTION < since <= entered[message.id]

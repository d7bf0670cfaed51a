"""A turn's pushes as a packed run (protocol 4) or as records: the owner
packs only what is truly a run, and the packed bytes decode to exactly its
messages (DESIGN.md, "Replication")."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dqid.batch_encoding import EncodedBatches, packed_run
from dqid.ids import format_id
from dqid.queue import WorkQueue
from dqid.wire import RUN_MIN_RECORDS, decode_records, decode_run


def pushes(count: int = RUN_MIN_RECORDS, first: int = 1, content_type: str | None = None,
           queue: WorkQueue | None = None, epoch: int = 7) -> list:
    """``count`` pending pushes of node a with consecutive seqs."""
    queue = WorkQueue(10_000) if queue is None else queue
    return [queue.reserve(format_id("a", epoch, seq), b"body %d" % seq, content_type)
            for seq in range(first, first + count)]


def as_decoded(data: bytes) -> list[tuple]:
    return [(r.id, r.body, r.content_type) for r in decode_run(data).records()]


def as_pushed(messages) -> list[tuple]:
    return [(m.id, m.body, m.content_type) for m in messages]


@settings(max_examples=60, deadline=None)
@given(count=st.integers(RUN_MIN_RECORDS, 3000), first=st.sampled_from([1, 20, 1290, 46650]),
       content_type=st.sampled_from([None, "text/plain"]))
def test_consecutive_fresh_pushes_pack_into_a_run_of_exactly_them(count, first, content_type):
    messages = pushes(count, first, content_type)
    data = packed_run(messages)
    assert data is not None
    assert as_decoded(data) == as_pushed(messages)


def test_fewer_than_a_run_are_records():
    assert packed_run(pushes(RUN_MIN_RECORDS - 1)) is None
    encoded = EncodedBatches(pushes(RUN_MIN_RECORDS - 1))
    assert encoded.run() is None
    assert [r.id for r in decode_records(encoded.records())] == [
        format_id("a", 7, seq) for seq in range(1, RUN_MIN_RECORDS)]


@pytest.mark.parametrize("spoil", [
    "a key", "a delay", "two content types", "a seq missing", "out of order",
    "another epoch", "accepted already", "delivered before",
])
def test_what_is_not_a_run_is_not_packed(spoil):
    queue = WorkQueue(10_000)
    messages = pushes(20, queue=queue)
    if spoil == "a key":
        queue.withdraw(messages[5].id)
        messages[5] = queue.reserve(format_id("a", 7, 6), b"keyed", None, "key")
    elif spoil == "a delay":
        queue.withdraw(messages[3].id)
        messages[3] = queue.reserve(format_id("a", 7, 4), b"later", None, due=2e9)
    elif spoil == "two content types":
        queue.withdraw(messages[-1].id)
        messages[-1] = queue.reserve(format_id("a", 7, 20), b"json", "application/json")
    elif spoil == "a seq missing":
        del messages[7]
    elif spoil == "out of order":
        messages[3], messages[4] = messages[4], messages[3]
    elif spoil == "another epoch":
        messages += pushes(1, 21, queue=queue, epoch=8)
    elif spoil == "accepted already":
        queue.commit(messages[2].id)
    elif spoil == "delivered before":
        messages[9].deliveries = 1
    assert packed_run(messages) is None
    encoded = EncodedBatches(messages)
    assert encoded.run() is None
    assert [r.id for r in decode_records(encoded.records())] == [m.id for m in messages]


def test_one_content_type_is_packed_with_it():
    data = packed_run(pushes(20, content_type="text/plain"))
    assert data is not None and decode_run(data).content_type == "text/plain"

"""Properties of :mod:`dqid.tombstones` (DESIGN.md, "Replication").

RangeSet must be exactly a set of non-negative ints, stored maximally
compacted, so memory follows the gaps and not the history.  Tombstones.merge
is a union: commutative, associative and idempotent, and it loses nothing.
"""

from __future__ import annotations

import json
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from dqid.tombstones import RangeSet, Tombstones

# A small domain, so that adds often touch or overlap existing ranges.
DOMAIN = 120
values = st.integers(min_value=0, max_value=DOMAIN)
spans = st.tuples(values, st.integers(min_value=-3, max_value=25)).map(
    lambda t: (t[0], t[0] + t[1])  # length may be <= 0: an empty range
)

rangeset_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), values),
        st.tuples(st.just("add_range"), spans),
        st.tuples(st.just("update"), st.lists(spans, max_size=5)),
    ),
    max_size=40,
)


def runs(model: set[int]) -> list[tuple[int, int]]:
    """The maximal runs of consecutive ints in ``model``, as [start, end)."""
    result: list[tuple[int, int]] = []
    for value in sorted(model):
        if result and result[-1][1] == value:
            result[-1] = (result[-1][0], value + 1)
        else:
            result.append((value, value + 1))
    return result


def assert_compacted(rs: RangeSet) -> None:
    ranges = rs.ranges()
    assert rs.range_count() == len(ranges)
    for start, end in ranges:
        assert 0 <= start < end
    for (_, prev_end), (next_start, _) in zip(ranges, ranges[1:]):
        # Sorted, disjoint and not touching: a gap of at least one value.
        assert prev_end < next_start, ranges


def assert_matches(rs: RangeSet, model: set[int]) -> None:
    assert len(rs) == len(model)
    for value in range(-2, DOMAIN + 30):
        assert (value in rs) == (value in model), value
    assert_compacted(rs)
    assert rs.ranges() == runs(model)


@settings(max_examples=300, deadline=None)
@given(rangeset_ops)
def test_rangeset_is_a_set_of_ints(ops):
    rs = RangeSet()
    model: set[int] = set()
    for op, arg in ops:
        if op == "add":
            assert rs.add(arg) == (arg not in model)
            model.add(arg)
        elif op == "add_range":
            rs.add_range(*arg)
            model.update(range(*arg))
        else:
            other = RangeSet(arg)
            other_model = {v for span in arg for v in range(*span)}
            assert_matches(other, other_model)
            before = other.ranges()
            rs.update(other)
            model |= other_model
            assert other.ranges() == before  # update does not touch its argument
        assert_matches(rs, model)


@settings(max_examples=200, deadline=None)
@given(st.lists(spans, max_size=10), spans)
def test_gaps_within_are_the_values_of_a_span_the_set_lacks(span_list, window):
    rs = RangeSet(span_list)
    model = {v for span in span_list for v in range(*span)}
    gaps = rs.gaps_within(*window)
    # Sorted, disjoint, not touching, and exactly the span's missing values.
    assert gaps == runs(set(range(*window)) - model)


@settings(max_examples=100, deadline=None)
@given(st.lists(spans, max_size=10), st.lists(values, max_size=10))
def test_rangeset_copy_eq_and_constructor(span_list, extra):
    rs = RangeSet(span_list)
    model = {v for span in span_list for v in range(*span)}
    assert_matches(rs, model)
    twin = rs.copy()
    assert twin == rs
    assert RangeSet(rs.ranges()) == rs
    for value in extra:
        twin.add(value)
    # The copy is independent of the original.
    assert_matches(rs, model)
    assert_matches(twin, model | set(extra))
    assert (twin == rs) == (model | set(extra) == model)
    assert rs != rs.ranges()  # only equal to RangeSets


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=300).flatmap(
    lambda n: st.permutations(range(1, n + 1))))
def test_acking_in_any_order_ends_as_one_range(order):
    rs = RangeSet()
    seen: set[int] = set()
    for seq in order:
        rs.add(seq)
        seen.add(seq)
        # Memory follows the gaps: one range per run of acked seqs.
        assert rs.range_count() == len(runs(seen))
    assert rs.ranges() == [(1, len(order) + 1)]
    assert rs.range_count() == 1


@settings(max_examples=5, deadline=None)
@given(st.integers(0, 2**32))
def test_ten_thousand_acks_in_random_order_are_one_range(seed):
    rng = random.Random(seed)
    n = 10_000
    order = list(range(1, n + 1))
    rng.shuffle(order)
    tombstones = Tombstones()
    for seq in order:
        assert tombstones.add("node-a", 3, seq) is True
    assert tombstones.range_count() == 1
    assert tombstones.as_dict() == {"node-a": {3: [(1, n + 1)]}}
    # Acking again changes nothing.
    assert tombstones.add("node-a", 3, rng.randint(1, n)) is False
    assert tombstones.range_count() == 1


def test_range_count_follows_gaps_not_history():
    rs = RangeSet()
    # Ack everything but every 1000th message of 100,000: 100 gaps.
    order = [s for s in range(1, 100_001) if s % 1000]
    random.Random(7).shuffle(order)
    for seq in order:
        rs.add(seq)
    assert rs.range_count() == 100
    assert len(rs) == 100_000 - 100
    assert 1000 not in rs and 999 in rs and 1001 in rs


# -- Tombstones ---------------------------------------------------------------

OWNERS = ["a", "b", "node-c"]
tombstone_entries = st.lists(
    st.tuples(
        st.sampled_from(OWNERS),
        st.integers(min_value=0, max_value=3),
        st.integers(min_value=0, max_value=60),
        st.integers(min_value=0, max_value=8),
    ),
    max_size=25,
)


def build(entries) -> tuple[Tombstones, set[tuple[str, int, int]]]:
    tombstones = Tombstones()
    model: set[tuple[str, int, int]] = set()
    for owner, epoch, start, length in entries:
        if length == 1:
            assert tombstones.add(owner, epoch, start) == ((owner, epoch, start) not in model)
        else:
            tombstones.add_range(owner, epoch, start, start + length)
        model.update((owner, epoch, seq) for seq in range(start, start + length))
    return tombstones, model


def model_of(tombstones: Tombstones) -> set[tuple[str, int, int]]:
    return {
        (owner, epoch, seq)
        for owner, epochs in tombstones.as_dict().items()
        for epoch, ranges in epochs.items()
        for start, end in ranges
        for seq in range(start, end)
    }


def merged(*parts: Tombstones) -> Tombstones:
    result = Tombstones()
    for part in parts:
        result.merge(part)
    return result


@settings(max_examples=150, deadline=None)
@given(tombstone_entries)
def test_tombstones_membership_and_as_dict(entries):
    tombstones, model = build(entries)
    assert model_of(tombstones) == model
    for owner in OWNERS + ["zz"]:
        for epoch in range(5):
            for seq in range(75):
                assert ((owner, epoch, seq) in tombstones) == ((owner, epoch, seq) in model)
    as_dict = tombstones.as_dict()
    for owner, epochs in as_dict.items():
        assert epochs, "no empty owner entries"
        for epoch, ranges in epochs.items():
            assert ranges, "no empty epoch entries"
            rs = RangeSet(ranges)
            assert rs.ranges() == list(ranges)
            assert_compacted(rs)
    assert tombstones.range_count() == sum(
        len(r) for epochs in as_dict.values() for r in epochs.values())


@settings(max_examples=150, deadline=None)
@given(tombstone_entries, tombstone_entries, tombstone_entries)
def test_tombstones_merge_is_a_union(e1, e2, e3):
    (a, ma), (b, mb), (c, mc) = build(e1), build(e2), build(e3)
    snapshot = (a.as_dict(), b.as_dict(), c.as_dict())

    ab, ba = merged(a, b), merged(b, a)
    # Commutative, and exactly the union.
    assert ab.as_dict() == ba.as_dict()
    assert model_of(ab) == ma | mb
    assert ab == ba
    # Associative.
    assert merged(merged(a, b), c).as_dict() == merged(a, merged(b, c)).as_dict()
    assert model_of(merged(a, b, c)) == ma | mb | mc
    # Idempotent.
    assert merged(a, a).as_dict() == a.as_dict()
    assert merged(ab, b).as_dict() == ab.as_dict()
    again = merged(a)
    again.merge(again)
    assert again.as_dict() == a.as_dict()
    # Merging never changes its argument ...
    assert (a.as_dict(), b.as_dict(), c.as_dict()) == snapshot
    # ... nor shares state with it.
    ab.add("a", 0, 1000)
    ab.add_range("zz", 9, 0, 5)
    assert (a.as_dict(), b.as_dict(), c.as_dict()) == snapshot


@settings(max_examples=150, deadline=None)
@given(tombstone_entries)
def test_tombstones_dict_round_trip(entries):
    tombstones, model = build(entries)
    back = Tombstones.from_dict(tombstones.as_dict())
    assert back.as_dict() == tombstones.as_dict()
    assert back == tombstones
    assert model_of(back) == model
    # Through JSON (string keys, lists for tuples), as on the wire.
    via_json = Tombstones.from_dict(json.loads(json.dumps(tombstones.as_dict())))
    assert via_json.as_dict() == tombstones.as_dict()


@settings(max_examples=100, deadline=None)
@given(tombstone_entries, st.sampled_from(OWNERS))
def test_tombstones_for_owner(entries, owner):
    tombstones, model = build(entries)
    part = tombstones.for_owner(owner)
    assert model_of(part) == {key for key in model if key[0] == owner}
    part.add(owner, 0, 999)
    assert model_of(tombstones) == model  # a copy, not a view


def test_empty_ranges_leave_no_trace():
    tombstones = Tombstones()
    tombstones.add_range("a", 1, 5, 5)
    tombstones.add_range("a", 1, 7, 3)
    assert tombstones.as_dict() == {}
    assert tombstones == Tombstones()
    assert ("a", 1, 5) not in tombstones

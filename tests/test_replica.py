"""Properties of :class:`dqid.replica.ReplicaStore` (DESIGN.md, "Replication").

Replica state only ever merges: records by union, tombstones by union, and a
tombstone always wins.  Nothing is deleted because a copy lacks it, and a
tombstoned id never comes back, whatever order things arrive in.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dqid.ids import format_id, parse_id
from dqid.replica import Record, ReplicaStore
from dqid.tombstones import Tombstones

OWNERS = ["a", "b", "node-c"]
keys = st.tuples(
    st.sampled_from(OWNERS),
    st.integers(min_value=0, max_value=2),
    st.integers(min_value=0, max_value=40),
)


def mid(key) -> str:
    return format_id(*key)


def record(key) -> Record:
    """The one record an id names (ids are never minted twice)."""
    owner, epoch, seq = key
    return Record(
        mid(key),
        f"{owner}/{epoch}/{seq}".encode() * (seq % 3),
        None if seq % 2 else "text/plain",
        None if seq % 5 else f"k{seq}",
        seq % 4,
    )


def tombstones_of(key_list) -> Tombstones:
    tombstones = Tombstones()
    for owner, epoch, seq in key_list:
        tombstones.add(owner, epoch, seq)
    return tombstones


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), keys),
        st.tuples(st.just("tombstone"), keys),
        st.tuples(st.just("merge_tombstones"), st.lists(keys, max_size=6)),
        st.tuples(st.just("note_epoch"), st.tuples(st.sampled_from(OWNERS),
                                                   st.integers(0, 5))),
    ),
    max_size=30,
)


class Model:
    """What a store must hold: every added id unless tombstoned."""

    def __init__(self) -> None:
        self.added: set[str] = set()
        self.gone: set[str] = set()
        self.epochs: dict[str, int] = {}

    @property
    def live(self) -> set[str]:
        return self.added - self.gone

    def note(self, owner: str, epoch: int) -> None:
        if epoch > self.epochs.get(owner, 0):
            self.epochs[owner] = epoch


def apply(store: ReplicaStore, model: Model, op) -> None:
    kind, arg = op
    if kind == "add":
        live_before = model.live
        new = store.add(record(arg))
        assert new == (mid(arg) not in live_before and mid(arg) not in model.gone)
        # The epoch is seen even if the record is already tombstoned, so what
        # the store knows does not depend on which of the two came first.
        model.note(arg[0], arg[1])
        model.added.add(mid(arg))
    elif kind == "tombstone":
        live_before = model.live
        dropped = store.tombstone(mid(arg))
        if mid(arg) in live_before:
            assert dropped is not None and dropped.id == mid(arg)
        else:
            assert dropped is None
        model.gone.add(mid(arg))
    elif kind == "merge_tombstones":
        live_before = model.live
        dropped = store.merge_tombstones(tombstones_of(arg))
        new_gone = {mid(k) for k in arg}
        assert sorted(r.id for r in dropped) == sorted(live_before & new_gone)
        model.gone |= new_gone
    else:
        owner, epoch = arg
        assert store.note_epoch(owner, epoch) == max(epoch, model.epochs.get(owner, 0))
        model.note(owner, epoch)


def check(store: ReplicaStore, model: Model) -> None:
    live = store.live_ids()
    # A tombstone always wins ...
    for message_id in live:
        assert not store.is_tombstoned(message_id), message_id
    # ... and nothing else is lost.
    assert live == model.live
    for message_id in model.gone:
        assert store.is_tombstoned(message_id)
        assert store.get(message_id) is None
    for message_id in live:
        got = store.get(message_id)
        assert got is not None and got.id == message_id
    assert store.epochs == model.epochs
    for owner in OWNERS:
        assert store.held(owner) == sum(1 for i in live if parse_id(i).node == owner)
        assert sorted(r.id for r in store.records(owner)) == sorted(
            i for i in live if parse_id(i).node == owner)
    assert store.owners() == sorted({parse_id(i).node for i in live})
    assert sorted(r.id for r in store.records()) == sorted(live)


def build(op_list) -> tuple[ReplicaStore, Model]:
    store, model = ReplicaStore(), Model()
    for op in op_list:
        apply(store, model, op)
    return store, model


def merge(*stores: ReplicaStore) -> ReplicaStore:
    result = ReplicaStore()
    for store in stores:
        result.merge(store)
    return result


def state(store: ReplicaStore):
    return (
        store.live_ids(),
        store.tombstones.as_dict(),
        store.epochs,
        # Same id, same record (ids are never minted twice); compare content.
        sorted((r.id, r.body, r.content_type, r.key, r.deliveries) for r in store.records()),
    )


@settings(max_examples=200, deadline=None)
@given(ops)
def test_random_interleaving_tombstone_always_wins(op_list):
    store, model = ReplicaStore(), Model()
    for op in op_list:
        apply(store, model, op)
        check(store, model)


@settings(max_examples=100, deadline=None)
@given(st.data(), st.lists(st.one_of(
    st.tuples(st.just("add"), keys),
    st.tuples(st.just("tombstone"), keys),
    st.tuples(st.just("merge_tombstones"), st.lists(keys, max_size=4)),
), max_size=25))
def test_final_state_does_not_depend_on_arrival_order(data, op_list):
    """Adds and tombstones commute: any permutation ends in the same state."""
    shuffled = data.draw(st.permutations(op_list))
    first, m1 = build(op_list)
    second, m2 = build(shuffled)
    check(first, m1)
    check(second, m2)
    assert state(first) == state(second)


@settings(max_examples=150, deadline=None)
@given(ops, ops, ops)
def test_merge_is_commutative_associative_idempotent(o1, o2, o3):
    (a, ma), (b, mb), (c, mc) = build(o1), build(o2), build(o3)
    before = (state(a), state(b), state(c))

    assert state(merge(a, b)) == state(merge(b, a))
    assert state(merge(merge(a, b), c)) == state(merge(a, merge(b, c)))
    assert state(merge(a, b, c)) == state(merge(c, a, b))
    assert state(merge(a, a)) == state(merge(a)) == state(a)
    assert state(merge(merge(a, b), b)) == state(merge(a, b))
    itself = merge(a)
    itself.merge(itself)
    assert state(itself) == state(a)
    # Merging never changes its arguments.
    assert (state(a), state(b), state(c)) == before


@settings(max_examples=150, deadline=None)
@given(ops, ops)
def test_merge_is_the_union_and_tombstones_win(o1, o2):
    (a, ma), (b, mb) = build(o1), build(o2)
    ab = merge(a, b)
    union = Model()
    union.added = ma.live | mb.live
    union.gone = ma.gone | mb.gone
    for epochs in (ma.epochs, mb.epochs):
        for owner, epoch in epochs.items():
            union.note(owner, epoch)
    check(ab, union)
    # Nothing is deleted because a copy lacks it: merging an empty store
    # (or one that lacks some records) into a full one drops nothing.
    full = merge(a)
    full.merge(ReplicaStore())
    assert state(full) == state(a)
    full.merge(b)
    assert full.live_ids() == (
        {i for i in a.live_ids() if not b.is_tombstoned(i)}
        | {i for i in b.live_ids() if not a.is_tombstoned(i)}
    )


@settings(max_examples=100, deadline=None)
@given(ops, st.sampled_from(OWNERS))
def test_take_owner(op_list, owner):
    store, model = build(op_list)
    tombs_before = store.tombstones.as_dict()
    epochs_before = dict(store.epochs)
    theirs = {i for i in model.live if parse_id(i).node == owner}
    others = {i for i in model.live if parse_id(i).node != owner}

    taken = store.take_owner(owner)
    assert sorted(r.id for r in taken) == sorted(theirs)
    assert all(r.owner == owner for r in taken)
    assert store.held(owner) == 0
    assert owner not in store.owners()
    assert store.live_ids() == others
    assert store.tombstones.as_dict() == tombs_before
    assert store.epochs == epochs_before
    assert store.take_owner(owner) == []
    # Taken, not tombstoned: they may be held again.
    for r in taken:
        assert not store.is_tombstoned(r.id)
        assert store.add(r) is True
    assert store.live_ids() == model.live


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(OWNERS), st.integers(0, 10**12)), max_size=30))
def test_note_epoch_keeps_the_max(notes):
    store = ReplicaStore()
    highest: dict[str, int] = {}
    for owner, epoch in notes:
        expected = max(epoch, highest.get(owner, 0))
        assert store.note_epoch(owner, epoch) == expected
        if expected:
            highest[owner] = expected
        assert store.epochs == highest
    # A record's epoch is noted too, but never lowers it.
    store.add(record(("a", 1, 1)))
    if highest.get("a", 0) < 1:
        highest["a"] = 1
    assert store.epochs == highest


def test_tombstone_before_record_blocks_it():
    store = ReplicaStore()
    assert store.tombstone(format_id("a", 1, 7)) is None
    assert store.add(record(("a", 1, 7))) is False
    assert store.live_ids() == set()
    assert store.held("a") == 0
    # A whole range of tombstones received later blocks every record in it.
    store.add_many([record(("b", 2, s)) for s in range(10)])
    assert store.held("b") == 10
    other = Tombstones()
    other.add_range("b", 2, 3, 8)
    dropped = store.merge_tombstones(other)
    assert sorted(r.id for r in dropped) == sorted(format_id("b", 2, s) for s in range(3, 8))
    assert store.held("b") == 5
    assert store.add_many([record(("b", 2, s)) for s in range(10)]) == []
    assert store.held("b") == 5


@settings(max_examples=200)
@given(ops, st.text(max_size=30))
def test_get_finds_a_held_record_by_its_id_and_nothing_by_any_other_text(op_list, text):
    """``get`` looks up by the owner part of the id: any text that is not
    the id of a record held (malformed ids, ids of tombstoned records, ids
    with the owner of a held one) finds nothing."""
    store, model = build(op_list)
    held = store.live_ids()
    for candidate in [text, *(i + text for i in held), *(i.split(".")[0] + "." + text
                                                        for i in held)]:
        got = store.get(candidate)
        assert (got.id if got is not None else None) == (candidate if candidate in held else None)

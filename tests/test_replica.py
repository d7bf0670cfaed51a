"""Properties of :class:`dqid.replica.ReplicaStore` (DESIGN.md, "Replication").

Replica state only ever merges: records by union, tombstones by union, and a
tombstone always wins.  Nothing is deleted because a copy lacks it, and a
tombstoned id never comes back, whatever order things arrive in.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dqid.ids import MessageId, format_id, parse_id
from dqid.replica import Record, ReplicaStore, Run, tombstones_of
from dqid.tombstones import Tombstones
from dqid.wire import encode_records, scan_run

OWNERS = ["a", "b", "node-c"]
RUN_EPOCH = 3  # the ids of this epoch are fresh pushes: they may come as runs
keys = st.tuples(
    st.sampled_from(OWNERS),
    st.integers(min_value=0, max_value=RUN_EPOCH),
    st.integers(min_value=0, max_value=40),
)
runs = st.tuples(
    st.sampled_from(OWNERS),
    st.integers(min_value=0, max_value=40),  # the first seq
    st.integers(min_value=1, max_value=30),  # how many
)


def mid(key) -> str:
    return format_id(*key)


def record(key) -> Record:
    """The one record an id names (ids are never minted twice)."""
    owner, epoch, seq = key
    if epoch == RUN_EPOCH:  # fresh: no key, no deliveries, one content type
        return Record(mid(key), f"{owner}/{seq}".encode() * (seq % 3), "text/plain")
    return Record(
        mid(key),
        f"{owner}/{epoch}/{seq}".encode() * (seq % 3),
        None if seq % 2 else "text/plain",
        None if seq % 5 else f"k{seq}",
        seq % 4,
    )


def run_keys(arg) -> list[tuple[str, int, int]]:
    owner, first, count = arg
    return [(owner, RUN_EPOCH, seq) for seq in range(first, first + count)]


def run_of(arg):
    """The records of ``arg`` as the Run a replica keeps of a Stream box."""
    run = scan_run(encode_records([record(k) for k in run_keys(arg)]), min_records=1)
    assert run is not None
    return run


def tombstones_of_keys(key_list) -> Tombstones:
    tombstones = Tombstones()
    for owner, epoch, seq in key_list:
        tombstones.add(owner, epoch, seq)
    return tombstones


op = st.one_of(
    st.tuples(st.just("add"), keys),
    st.tuples(st.just("add_run"), runs),
    st.tuples(st.just("get"), keys),
    st.tuples(st.just("tombstone"), keys),
    st.tuples(st.just("merge_tombstones"), st.lists(keys, max_size=6)),
    st.tuples(st.just("note_epoch"), st.tuples(st.sampled_from(OWNERS), st.integers(0, 5))),
    st.tuples(st.just("unpack_sparse_runs"), st.none()),
)
ops = st.lists(op, max_size=30)
# What owners say of copies: not part of the merge properties below (a merge
# keeps the copy it held first), only of the single store's.
set_state = st.tuples(st.just("set_state"), st.tuples(keys, st.integers(0, 9), st.booleans()))
ops_with_states = st.lists(st.one_of(op, set_state), max_size=30)


class Model:
    """What a store must hold: every added id unless tombstoned."""

    def __init__(self) -> None:
        self.added: set[str] = set()
        self.gone: set[str] = set()
        self.epochs: dict[str, int] = {}
        self.states: dict[str, tuple[int, bool]] = {}  # what set_state said last

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
    elif kind == "add_run":
        ids = {mid(k) for k in run_keys(arg)}
        new = ids - model.live - model.gone
        assert store.add_run(run_of(arg)) == len(new)
        model.note(arg[0], RUN_EPOCH)
        model.added |= ids
    elif kind == "get":
        got = store.get(mid(arg))
        if mid(arg) in model.live:
            assert got is not None and (got.id, got.body, got.content_type, got.key) == (
                mid(arg), record(arg).body, record(arg).content_type, record(arg).key)
        else:
            assert got is None
    elif kind == "set_state":
        key, deliveries, held = arg
        known = model.states.get(mid(key), (record(key).deliveries, False))
        # True only if it changed a copy held here.
        assert store.set_state(mid(key), deliveries, held, None) == (
            mid(key) in model.live and (deliveries, held) != known)
        if mid(key) in model.live:
            model.states[mid(key)] = (deliveries, held)
    elif kind == "tombstone":
        live_before = model.live
        released = store.tombstone(mid(arg))
        # The key of the record it drops is released.
        assert released == (record(arg).key if mid(arg) in live_before else None)
        assert not store.holds(mid(arg))
        model.gone.add(mid(arg))
    elif kind == "merge_tombstones":
        live_before = model.live
        released = store.merge_tombstones(tombstones_of_keys(arg))
        # The keys of the records it drops are released, and no others.
        assert sorted(released) == sorted(
            record(k).key for k in set(arg)
            if mid(k) in live_before and record(k).key is not None)
        model.gone |= {mid(k) for k in arg}
    elif kind == "unpack_sparse_runs":
        # Only how copies are kept changes, never which (check() says so).
        live_before = store.live_ids()
        store.unpack_sparse_runs()
        assert store.live_ids() == live_before
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
        assert not store.holds(message_id)
        assert not store.holds(message_id, parse_id(message_id))  # (parsed by the caller)
        assert store.get(message_id) is None
    for message_id in live:
        assert store.holds(message_id)
        assert store.holds(message_id, parse_id(message_id))
    for got in store.records():
        key = parse_id(got.id)
        assert (got.body, got.content_type, got.key) == (
            record(key).body, record(key).content_type, record(key).key)
        assert (got.deliveries, got.held) == model.states.get(
            got.id, (record(key).deliveries, False))
    assert store.footprint()[0] == len(live)
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


@settings(max_examples=300, deadline=None)
@given(ops_with_states)
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


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(OWNERS), st.integers(0, 5),
                          st.integers(0, 36**3)), max_size=40))
def test_tombstones_of_ids_are_exactly_those_ids(key_list):
    assert tombstones_of(mid(k) for k in key_list) == tombstones_of_keys(key_list)


ALL_KEYS = [(owner, epoch, seq) for owner in OWNERS for epoch in range(RUN_EPOCH + 1)
            for seq in range(80)]


@settings(max_examples=200, deadline=None)
@given(ops)
def test_seen_names_exactly_what_is_held_or_tombstoned(op_list):
    """An anti-entropy pull's summary: no id the store lacks (the peer
    would leave out a copy it needs), none it holds left out."""
    store, model = build(op_list)
    seen = store.seen()
    for key in ALL_KEYS:
        assert (key in seen) == (mid(key) in model.live or mid(key) in model.gone), key


@settings(max_examples=200, deadline=None)
@given(ops, ops)
def test_a_pull_of_what_is_unseen_merges_like_a_pull_of_everything(o1, o2):
    """Merging only the records of ``b`` that ``a`` has not seen (and b's
    tombstones) leaves ``a`` as the merge of all of ``b`` would."""
    (a, _), (b, _) = build(o1), build(o2)
    everything = merge(a, b)
    pulled = merge(a)
    count, unseen = b.unseen_records(a.seen())
    unseen = list(unseen)
    assert count == len(unseen)
    assert {r.id for r in unseen} == {i for i in b.live_ids() if parse_id(i) not in a.seen()}
    pulled.merge_tombstones(b.tombstones)
    pulled.add_many(unseen)
    for owner, epoch in b.epochs.items():
        pulled.note_epoch(owner, epoch)
    assert state(pulled) == state(everything)
    # Nothing unseen: a pull of an up-to-date peer carries no record.
    assert b.unseen_records(merge(a, b).seen())[0] == 0


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
    assert store.merge_tombstones(other) == ["k5"]  # the only key among 3..7
    assert store.live_ids() == {format_id("b", 2, s) for s in (0, 1, 2, 8, 9)}
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


# -- runs ------------------------------------------------------------------------


def test_a_run_holds_its_records_as_the_bytes_they_came_in():
    store = ReplicaStore()
    run = run_of(("a", 1, 100))
    assert store.add_run(run) == 100
    assert store.held("a") == 100 and store.owners() == ["a"]
    assert store.footprint() == (100, sum(len(record(("a", RUN_EPOCH, s)).body)
                                          for s in range(1, 101)))
    assert store.epochs == {"a": RUN_EPOCH}
    assert store.holds(format_id("a", RUN_EPOCH, 50))
    assert store.holds(format_id("a", RUN_EPOCH, 50), MessageId("a", RUN_EPOCH, 50))
    assert not store.holds(format_id("a", RUN_EPOCH, 101))
    assert not store.holds(format_id("a", RUN_EPOCH, 101), MessageId("a", RUN_EPOCH, 101))
    assert not store.holds(format_id("a", RUN_EPOCH - 1, 50))
    assert not store.holds("a.not-an-id")
    assert store.get("a.not-an-id") is None
    # No Record is made until one is read; reading takes it out of the run.
    assert store._records == {}
    got = store.get(format_id("a", RUN_EPOCH, 50))
    assert (got.body, got.content_type, got.key, got.deliveries) == (
        record(("a", RUN_EPOCH, 50)).body, "text/plain", None, 0)
    got.deliveries = 2
    assert store.get(format_id("a", RUN_EPOCH, 50)).deliveries == 2
    assert store.held("a") == 100
    # What the owner says of a copy in the run stays with it, unparsed.
    assert store.set_state(format_id("a", RUN_EPOCH, 60), 3, True, None)
    assert not store.set_state(format_id("a", RUN_EPOCH, 101), 3, True, None)
    [copy] = [r for r in store.records("a") if r.id == format_id("a", RUN_EPOCH, 60)]
    assert (copy.deliveries, copy.held) == (3, True)
    assert list(store._records["a"]) == [format_id("a", RUN_EPOCH, 50)]


def test_a_run_keeps_states_only_where_the_owner_says_something_new():
    # An anti-entropy sync from the owner says the state of every copy: a
    # fresh one is the run's own and costs no memory, a repeat changes
    # nothing (and so is not written to disk again).
    store = ReplicaStore()
    store.add_run(run_of(("a", 1, 100)))
    [run] = store._runs["a"]
    ids = [format_id("a", RUN_EPOCH, seq) for seq in range(1, 101)]
    assert not any(store.set_state(i, 0, False, None) for i in ids)
    assert not run.states
    assert store.set_state(ids[59], 2, False, None)
    assert not store.set_state(ids[59], 2, False, None)
    assert run.states == {60: (2, False, None)}
    assert store.set_state(ids[59], 0, False, None)
    assert not run.states
    # A copy held as a Record: the same rule.
    assert store.get(ids[9]).deliveries == 0
    assert not store.set_state(ids[9], 0, False, None)
    assert store.set_state(ids[9], 1, True, None)
    assert not store.set_state(ids[9], 1, True, None)


def test_the_records_of_a_run_are_parsed_as_they_are_reached(monkeypatch):
    # A sync pages through every copy held when it started: they are made
    # page by page, not all at once, and none is missed because it changed
    # on the way (taken out of its run by a peek, or acked).
    store = ReplicaStore()
    store.add_run(run_of(("a", 1, 40)))
    made: list[int] = []
    record = Run.record

    def counting(self, seq):
        made.append(seq)
        return record(self, seq)

    monkeypatch.setattr(Run, "record", counting)
    records = store.records()
    first = next(records)
    assert made == [1]
    assert store.get(format_id("a", RUN_EPOCH, 5)) is not None  # out of the run
    store.tombstone(format_id("a", RUN_EPOCH, 2))
    assert [r.id for r in [first, *records]] == [
        format_id("a", RUN_EPOCH, seq) for seq in range(1, 41)]


def test_a_replayed_run_adds_nothing_and_a_later_one_only_what_is_new():
    store = ReplicaStore()
    assert store.add_run(run_of(("a", 1, 40))) == 40
    assert store.add_run(run_of(("a", 1, 40))) == 0
    assert store.add_run(run_of(("a", 31, 20))) == 10  # 31..40 held already
    assert store.held("a") == 50
    assert store.live_ids() == {format_id("a", RUN_EPOCH, s) for s in range(1, 51)}


def test_a_run_never_brings_back_a_tombstoned_record():
    store = ReplicaStore()
    gone = Tombstones()
    gone.add_range("a", RUN_EPOCH, 5, 15)
    store.merge_tombstones(gone)
    assert store.add_run(run_of(("a", 1, 20))) == 10
    assert not store.holds(format_id("a", RUN_EPOCH, 5))
    assert store.held("a") == 10


def test_acks_empty_a_run_and_a_sparse_run_is_unpacked():
    store = ReplicaStore()
    store.add_run(run_of(("a", 0, 200)))
    store.add_run(run_of(("b", 0, 30)))
    acked = Tombstones()
    acked.add_range("a", RUN_EPOCH, 0, 160)  # 40 of 200 left: 1 in 5
    assert store.merge_tombstones(acked) == []
    assert store.held("a") == 40
    assert "a" in store._runs  # not at once: the rest may be acked soon
    assert store.unpack_sparse_runs() == 40
    assert "a" not in store._runs  # unpacked: its bytes are freed
    assert sorted(store._records["a"]) == sorted(
        format_id("a", RUN_EPOCH, s) for s in range(160, 200))
    assert store.held("a") == 40
    assert store.unpack_sparse_runs() == 0
    # Acked one by one: kept as a run while a quarter of it or more is live.
    for seq in range(30):
        assert store.holds(format_id("b", RUN_EPOCH, seq))
        assert store.tombstone(format_id("b", RUN_EPOCH, seq)) is None  # no key
        assert not store.holds(format_id("b", RUN_EPOCH, seq))
        assert store.held("b") == 29 - seq
        if seq == 22:  # 7 of 30 live: unpacked when it is time
            assert store.unpack_sparse_runs() == 7
        assert ("b" in store._runs) == (seq < 22)
    assert store.owners() == ["a"] and "b" not in store._runs


def test_a_sparse_run_emptied_or_taken_before_its_unpacking_is_not_unpacked():
    store = ReplicaStore()
    store.add_run(run_of(("a", 0, 100)))
    store.add_run(run_of(("b", 0, 100)))
    acked = Tombstones()
    acked.add_range("a", RUN_EPOCH, 0, 90)
    acked.add_range("b", RUN_EPOCH, 0, 90)
    store.merge_tombstones(acked)
    rest = Tombstones()
    rest.add_range("a", RUN_EPOCH, 90, 100)  # a queue draining: the rest goes
    store.merge_tombstones(rest)
    taken = store.take_owner("b")  # a take-over takes b's copies
    assert len(taken) == 10
    assert store.unpack_sparse_runs() == 0
    assert store.owners() == [] and store.held("a") == store.held("b") == 0


def test_take_owner_and_records_parse_a_run():
    store = ReplicaStore()
    store.add_run(run_of(("a", 1, 20)))
    store.tombstone(format_id("a", RUN_EPOCH, 3))
    assert sorted(r.id for r in store.records("a")) == sorted(
        format_id("a", RUN_EPOCH, s) for s in range(1, 21) if s != 3)
    assert store.held("a") == 19  # reading them left them in the run
    taken = store.take_owner("a")
    assert sorted(r.id for r in taken) == sorted(
        format_id("a", RUN_EPOCH, s) for s in range(1, 21) if s != 3)
    assert store.held("a") == 0 and store.owners() == []
    assert store.add_run(run_of(("a", 1, 20))) == 19  # not tombstoned: held again

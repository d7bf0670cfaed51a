"""Fuzzing every decoder of :mod:`dqid.wire` with arbitrary and mutated bytes.

DESIGN.md, Security: everything dqid decodes from a peer (records,
tombstones, chunk counts, ids, epochs) is validated; bad input is an error,
never a crash, a hang, or a changed queue.  Here that means: each decoder
either returns a valid value or raises :class:`WireError` (never IndexError,
struct.error, UnicodeDecodeError, KeyError, RecursionError, MemoryError ...),
what it accepts is exactly a valid encoding, and a forged length never costs
more than the input's size.
"""

from __future__ import annotations

import json
import math
import re
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dqid.ids import NODE_ID_RE, format_id, is_valid_node_id, parse_id
from dqid.replica import Record
from dqid.tombstones import Tombstones
from dqid.wire import (
    MAX_EPOCH,
    MAX_RANGE_END,
    MAX_SEQ,
    WireError,
    checked_count,
    checked_epoch,
    checked_message_id,
    checked_node_id,
    checked_seconds,
    decode_epochs,
    decode_records,
    decode_run,
    decode_tombstones,
    encode_epochs,
    encode_records,
    encode_run,
    encode_tombstones,
    join_chunks,
    scan_run,
)

from .mutations import mutated

FUZZ = settings(max_examples=400, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

node_ids = st.one_of(st.sampled_from(["a", "b", "node-1"]),
                     st.from_regex(NODE_ID_RE, fullmatch=True))
numbers = st.one_of(st.integers(0, 50), st.integers(0, MAX_SEQ))
message_ids = st.builds(format_id, node_ids, numbers, numbers)
texts = st.one_of(st.none(), st.just(""), st.sampled_from(["text/plain", "application/json"]),
                  st.text(max_size=20))
records = st.builds(Record, id=message_ids, body=st.binary(max_size=60),
                    content_type=texts, key=texts,
                    deliveries=st.one_of(st.integers(0, 5), st.integers(0, 2**32 - 1)))


def fields(record: Record):
    return (record.id, record.body, record.content_type, record.key, record.deliveries)


@st.composite
def tombstone_sets(draw) -> Tombstones:
    tombstones = Tombstones()
    for owner, epoch, start, length in draw(st.lists(st.tuples(
            node_ids, st.one_of(st.integers(0, 3), st.integers(0, MAX_EPOCH)),
            numbers, st.integers(1, 500)), max_size=6)):
        tombstones.add_range(owner, epoch, start, start + length)
    return tombstones


epoch_maps = st.dictionaries(node_ids, st.one_of(st.integers(0, 9), st.integers(0, MAX_EPOCH)),
                             max_size=5)


# -- mutations ----------------------------------------------------------------




def mutations_of(strategy, encode):
    return strategy.map(encode).flatmap(mutated)


# -- records ------------------------------------------------------------------


def decode_records_or_error(data: bytes) -> list[Record] | None:
    try:
        decoded = decode_records(data)
    except WireError as error:
        assert "\n" not in str(error)
        return None
    # Accepted means: exactly the encoding of valid records.
    assert encode_records(decoded) == data
    for record in decoded:
        assert type(record.body) is bytes
        assert record.mid == parse_id(record.id)
    return decoded


@FUZZ
@given(st.binary(max_size=300))
@example(b"\x00" * 23)
@example(b"\xff" * 23)
@example(b"\x00\x05\xff\xff\xff\xff\x00\x00\x00\x00\x00\x00\x00\x00a.1.1")
def test_arbitrary_bytes_decode_to_records_or_wire_error(data):
    decode_records_or_error(data)


@FUZZ
@given(mutations_of(st.lists(records, min_size=1, max_size=4), encode_records))
def test_mutated_records_decode_exactly_or_wire_error(data):
    decode_records_or_error(data)


@settings(max_examples=200, deadline=None)
@given(st.lists(records, max_size=5))
def test_records_still_round_trip(batch):
    data = encode_records(batch)
    assert [fields(r) for r in decode_records(data)] == [fields(r) for r in batch]
    assert [fields(r) for r in decode_records(bytearray(data))] == [fields(r) for r in batch]
    assert all(type(r.body) is bytes for r in decode_records(memoryview(data)))


# -- runs: what a replica keeps as bytes --------------------------------------

# Seqs where the base-36 spelling gets a digit longer, and the very last ones.
run_starts = st.one_of(st.integers(0, 50), st.sampled_from([30, 1290, 36**3 - 3]),
                       st.integers(MAX_SEQ - 40, MAX_SEQ))
run_texts = st.sampled_from([None, "", "text/plain", "t\u00e9xt"])


@st.composite
def fresh_runs(draw) -> list[Record]:
    """Fresh pushes of one owner and epoch with consecutive seqs."""
    owner, epoch, first = draw(node_ids), draw(numbers), draw(run_starts)
    content_type = draw(run_texts)
    bodies = draw(st.lists(st.binary(max_size=40), min_size=1, max_size=40))
    return [Record(format_id(owner, epoch, first + i), body, content_type)
            for i, body in enumerate(bodies)]


def scan_agrees_with_decode(data: bytes) -> None:
    """A run is only ever found in a valid encoding, and holds exactly the
    records :func:`decode_records` reads from it, all of them fresh."""
    run = scan_run(data, min_records=1)
    if run is None:
        return
    decoded = decode_records(data)  # raises if the run was not valid
    assert [fields(r) for r in run.records()] == [fields(r) for r in decoded]
    assert all(r.key is None and not r.deliveries and not r.held and r.due is None
               for r in decoded)
    assert run.owner == decoded[0].mid.node and run.epoch == decoded[0].mid.epoch
    assert (run.first, run.end) == (decoded[0].mid.seq, decoded[-1].mid.seq + 1)


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_scan_to_no_run_or_an_exact_one(data):
    scan_agrees_with_decode(data)


@FUZZ
@given(mutations_of(fresh_runs(), encode_records))
def test_mutated_runs_scan_to_no_run_or_an_exact_one(data):
    scan_agrees_with_decode(data)


@settings(max_examples=200, deadline=None)
@given(fresh_runs())
def test_fresh_consecutive_pushes_are_a_run(batch):
    data = encode_records(batch)
    run = scan_run(data, min_records=1)
    if parse_id_or_none(batch[-1].id) is None:  # past the largest seq
        assert run is None
        return
    assert run is not None
    assert [fields(r) for r in run.records()] == [fields(r) for r in batch]
    assert scan_run(bytearray(data), min_records=1) is not None
    assert (scan_run(data, min_records=len(batch)) is not None
            and scan_run(data, min_records=len(batch) + 1) is None)


# -- packed runs (protocol 4) ---------------------------------------------------


def packed(batch: list[Record]) -> bytes:
    return encode_run(batch[0].id, batch[0].content_type, [r.body for r in batch])


def decode_run_or_error(data: bytes) -> None:
    """A packed run is accepted only as the exact encoding of records dqid
    could mint; anything else is a WireError of one line."""
    try:
        run = decode_run(data)
    except WireError as error:
        assert "\n" not in str(error)
        return
    records = run.records()
    assert len(records) == len(run) >= 1
    assert all(parse_id(r.id) == (run.owner, run.epoch, run.first + i)
               for i, r in enumerate(records))
    assert all(type(r.body) is bytes for r in records)
    assert encode_run(records[0].id, run.content_type, [r.body for r in records]) == data


@FUZZ
@given(st.binary(max_size=300))
@example(b"\x01\x05\x00\xff\xff\xff\xff\xff\xffa.1.1")
def test_arbitrary_bytes_decode_to_a_packed_run_or_wire_error(data):
    decode_run_or_error(data)


@FUZZ
@given(mutations_of(fresh_runs().filter(lambda b: parse_id_or_none(b[-1].id)), packed))
def test_mutated_packed_runs_decode_exactly_or_wire_error(data):
    decode_run_or_error(data)


@settings(max_examples=200, deadline=None)
@given(fresh_runs().filter(lambda b: parse_id_or_none(b[-1].id)))
def test_fresh_consecutive_pushes_round_trip_as_a_packed_run(batch):
    data = packed(batch)
    run = decode_run(data)
    assert [fields(r) for r in run.records()] == [fields(r) for r in batch]
    again = decode_run(bytearray(data))
    assert run.packed and [fields(r) for r in again.records()] == [fields(r) for r in batch]


def test_a_packed_run_past_the_largest_seq_is_refused():
    with pytest.raises(WireError, match="not seqs"):
        decode_run(encode_run(format_id("a", 1, MAX_SEQ), None, [b"x", b"y"]))
    assert len(decode_run(encode_run(format_id("a", 1, MAX_SEQ), None, [b"x"]))) == 1


@pytest.mark.parametrize("first_id", ["a.1", "a.01.1", "a.1.x.1", ".1.1", "a.A.1", "a b.1.1"])
def test_a_packed_run_from_an_id_dqid_could_not_mint_is_refused(first_id):
    with pytest.raises(WireError, match="not a dqid message id"):
        decode_run(encode_run(first_id, None, [b"x"]))


def test_a_packed_run_whose_id_is_not_ascii_is_refused():
    data = encode_run("a.1.1", None, [b"x"]).replace(b"a.1.1", b"\xe9.1.1")
    with pytest.raises(WireError, match="UTF-8"):
        decode_run(data)


def test_a_forged_count_costs_nothing():
    data = encode_run("a.1.1", None, [b"x"])
    forged = data[:5] + (2**32 - 1).to_bytes(4, "little") + data[9:]
    tracemalloc.start()
    try:
        with pytest.raises(WireError):
            decode_run(forged)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10_000


def parse_id_or_none(text: str):
    try:
        return parse_id(text)
    except ValueError:
        return None


def test_a_run_is_only_fresh_consecutive_keyless_records_of_one_content_type():
    def batch(**change):
        records = [Record(format_id("a", 7, seq), b"body", "text/plain")
                   for seq in range(34, 54)]  # across "y", "z", "10", "11" ...
        at = change.pop("at", 5)
        for name, value in change.items():
            setattr(records[at], name, value)
        return records

    assert scan_run(encode_records(batch())) is not None
    for change in [dict(key="k"), dict(deliveries=1), dict(held=True), dict(due=1.0),
                   dict(content_type="text/csv"), dict(content_type=None),
                   dict(id=format_id("a", 7, 99)), dict(id=format_id("a", 8, 39)),
                   dict(id=format_id("b", 7, 39)), dict(id="a.7.13", at=3)]:
        data = encode_records(batch(**change))
        assert scan_run(data) is None, change
    # The right seq in upper case is not dqid's spelling: no run, and no record.
    upper = encode_records(batch()).replace(b"a.7.z", b"a.7.Z")
    assert scan_run(upper) is None
    with pytest.raises(WireError):
        decode_records(upper)
    # Fewer than RUN_MIN_RECORDS records are not worth a run.
    assert scan_run(encode_records(batch()[:15])) is None
    assert scan_run(encode_records(batch()[:16])) is not None


@pytest.mark.parametrize("bad, expected", [
    (b"\x00\x01", "truncated record header"),
    (b"\xff\xff" + b"\xff" * 12 + b"\x00" * 9, "record without an id"),
    (b"\x00\x05\xff\xff\xff\xff\x00\x00\x00\x00\x00\x00\x00\x00" + b"\x00" * 9 + b"a.1.\xff",
     "not UTF-8"),
    (b"\x00\x05\xff\xff\xff\xff\x00\x00\x00\x00\x00\x00\x00\x00" + b"\x00" * 9 + b"a.1.Z",
     "not a dqid message id"),
    (b"\x00\x05\xff\xff\xff\xff\x00\x00\x00\x00\xff\xff\xff\xff" + b"\x00" * 9 + b"a.1.1",
     "truncated record"),
    (b"\x00\x05\xff\xff\xff\xff\x00\x00\x00\x00\x00\x00\x00\x00\x02" + b"\x00" * 8 + b"a.1.1",
     "bad state flags"),
    (b"\x00\x05\xff\xff\xff\xff\x00\x00\x00\x00\x00\x00\x00\x00\x00\x7f\xf8" + b"\x00" * 6
     + b"a.1.1", "due time"),
])
def test_record_errors_say_what_and_where(bad, expected):
    good = encode_records([Record("a.1.1", b"x")])
    for data, where in ((bad, "byte 0"), (good + bad, f"byte {len(good)}")):
        with pytest.raises(WireError) as caught:
            decode_records(data)
        assert expected in str(caught.value) and where in str(caught.value)


def test_long_bad_id_is_quoted_short():
    raw = b"x" * 60000
    data = len(raw).to_bytes(2, "big") + b"\xff\xff\xff\xff" + bytes(8) + raw
    with pytest.raises(WireError) as caught:
        decode_records(data)
    assert len(str(caught.value)) < 200


def _cost(function, data):
    """Seconds and peak bytes allocated while ``function(data)`` fails."""
    tracemalloc.start()
    began = time.perf_counter()
    try:
        with pytest.raises(WireError):
            function(data)
        return time.perf_counter() - began, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("ct_len, key_len, body_len", [
    (0, 0, 2**32 - 1), (0xFFFE, 0xFFFE, 2**32 - 1), (0xFFFE, 0xFFFF, 0), (0, 0, 2**31),
])
def test_forged_lengths_cost_nothing(ct_len, key_len, body_len):
    """A header claiming 4 GiB of body after a 10-byte record allocates nothing big."""
    header = (5).to_bytes(2, "big") + ct_len.to_bytes(2, "big") + key_len.to_bytes(2, "big")
    data = header + bytes(4) + body_len.to_bytes(4, "big") + b"a.1.1" + b"tail"
    seconds, peak = _cost(decode_records, data)
    assert peak < 64 * 1024 and seconds < 1.0


def test_many_tiny_records_decode_in_linear_time():
    data = encode_records([Record(format_id("a", 1, i), b"") for i in range(20000)])
    began = time.perf_counter()
    assert len(decode_records(data)) == 20000
    assert time.perf_counter() - began < 5.0


# -- tombstones ---------------------------------------------------------------


def valid_tombstone_document(document) -> bool:
    """The rule, written out independently of dqid.wire."""
    if type(document) is not dict:
        return False
    for owner, epochs in document.items():
        if not is_valid_node_id(owner) or type(epochs) is not dict:
            return False
        for epoch, ranges in epochs.items():
            if re.fullmatch("0|[1-9][0-9]*", epoch) is None or int(epoch) > MAX_EPOCH:
                return False
            if type(ranges) is not list:
                return False
            for pair in ranges:
                if type(pair) is not list or len(pair) != 2:
                    return False
                if not all(type(v) is int for v in pair):
                    return False
                if not (0 <= pair[0] <= MAX_SEQ and pair[0] < pair[1] <= MAX_RANGE_END):
                    return False
    return True


def decode_tombstones_or_error(data: bytes) -> Tombstones | None:
    try:
        decoded = decode_tombstones(data)
    except WireError as error:
        assert "\n" not in str(error)
        return None
    assert isinstance(decoded, Tombstones)
    # What was accepted is valid, and encodes and decodes to itself.
    assert decode_tombstones(encode_tombstones(decoded)) == decoded
    for (owner, epoch), ranges in decoded.items():
        assert is_valid_node_id(owner) and 0 <= epoch <= MAX_EPOCH
        assert all(0 <= start < end <= MAX_RANGE_END for start, end in ranges.ranges())
    return decoded


@FUZZ
@given(st.binary(max_size=200))
@example(b"\xff")
@example(b"NaN")
@example(b'{"a":{"1":[[NaN,1]]}}')
@example(b'{"a":{"1":[[0,Infinity]]}}')
@example(b'{"a":{"1":[[0,1e400]]}}')
def test_arbitrary_bytes_decode_to_tombstones_or_wire_error(data):
    decode_tombstones_or_error(data)


@FUZZ
@given(mutations_of(tombstone_sets(), encode_tombstones))
def test_mutated_tombstones_decode_validly_or_wire_error(data):
    decode_tombstones_or_error(data)


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**130), st.floats(),
                         st.text(max_size=5))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=12,
)
epoch_keys = st.one_of(
    st.integers(0, 40).map(str), st.just(str(MAX_EPOCH)), st.just(str(MAX_EPOCH + 1)),
    st.sampled_from(["", "01", " 1", "1 ", "+1", "-1", "1_0", "1.0", "\u0663", "0x1", "1e3"]),
)
range_values = st.one_of(st.integers(-1, 5), st.just(MAX_SEQ), st.just(MAX_SEQ + 1),
                         st.just(MAX_RANGE_END), st.just(MAX_RANGE_END + 1),
                         st.booleans(), st.floats(), st.text(max_size=2), st.none())
valid_pairs = st.builds(lambda start, length: [start, start + length],
                        st.one_of(st.integers(0, 100), st.just(MAX_SEQ)), st.integers(1, 100))
pairs = st.one_of(valid_pairs, st.lists(range_values, min_size=2, max_size=2),
                  st.lists(range_values, max_size=3), json_values)
valid_documents = st.dictionaries(
    node_ids,
    st.dictionaries(st.one_of(st.integers(0, 40), st.just(MAX_EPOCH)).map(str),
                    st.lists(valid_pairs, max_size=3), max_size=3),
    max_size=3)
near_valid_documents = st.one_of(
    valid_documents,
    st.dictionaries(
        st.one_of(node_ids, st.sampled_from(["", "a b", "x" * 65, "é", "a.b"])),
        st.one_of(st.dictionaries(epoch_keys, st.one_of(st.lists(pairs, max_size=3),
                                                        json_values), max_size=3),
                  st.dictionaries(epoch_keys, st.lists(valid_pairs, max_size=3), max_size=3),
                  json_values),
        max_size=3),
    json_values,
)


@FUZZ
@given(near_valid_documents)
def test_exactly_the_valid_tombstone_documents_are_accepted(document):
    data = json.dumps(document).encode("utf-8")
    decoded = decode_tombstones_or_error(data)
    assert (decoded is not None) == valid_tombstone_document(json.loads(data))


@settings(max_examples=150, deadline=None)
@given(tombstone_sets())
def test_tombstones_still_round_trip(tombstones):
    data = encode_tombstones(tombstones)
    assert decode_tombstones(data) == tombstones
    assert encode_tombstones(decode_tombstones(data)) == data


@pytest.mark.parametrize("data", [
    b"[" * 100_000,
    b'{"a":' * 100_000,
    b'{"a":{"1":[' + b"[" * 100_000,
    b'{"a":{"1":[[0,' + b"9" * 5000 + b"]]}}",
    b'{"a":{"1":[[0,1]' + b",[0,1]" * 1000 + b",[0]]}}",
])
def test_hostile_json_is_refused_cheaply(data):
    seconds, peak = _cost(decode_tombstones, data)
    assert seconds < 2.0 and peak < 20 * len(data) + 1_000_000
    with pytest.raises(WireError):
        decode_epochs(data)


# -- epochs -------------------------------------------------------------------


def decode_epochs_or_error(data: bytes) -> dict | None:
    try:
        decoded = decode_epochs(data)
    except WireError as error:
        assert "\n" not in str(error)
        return None
    assert all(is_valid_node_id(n) and type(e) is int and 0 <= e <= MAX_EPOCH
               for n, e in decoded.items())
    assert decode_epochs(encode_epochs(decoded)) == decoded
    return decoded


@FUZZ
@given(st.one_of(st.binary(max_size=100), mutations_of(epoch_maps, encode_epochs),
                 st.dictionaries(st.one_of(node_ids, st.text(max_size=3)),
                                 st.one_of(range_values, json_values), max_size=4)
                 .map(lambda d: json.dumps(d).encode())))
@example(b'{"a": 1e400}')
@example(b'{"a": true}')
@example(b'{"a": NaN}')
def test_epochs_decode_validly_or_wire_error(data):
    decode_epochs_or_error(data)


@settings(max_examples=100, deadline=None)
@given(epoch_maps)
def test_epochs_round_trip(epochs):
    assert decode_epochs(encode_epochs(epochs)) == epochs
    # What transfer.py sends today (json.dumps with its default spacing) decodes too.
    assert decode_epochs(json.dumps(epochs).encode()) == epochs


def test_epoch_bounds():
    assert decode_epochs(b'{"a":%d}' % MAX_EPOCH) == {"a": MAX_EPOCH}
    for bad in (b'{"a":%d}' % (MAX_EPOCH + 1), b'{"a":-1}', b'{"a":"1"}', b'{"a":1.0}',
                b'{"a b":1}', b"[]", b""):
        with pytest.raises(WireError):
            decode_epochs(bad)


# -- chunks -------------------------------------------------------------------


def chunk_box(name: bytes, payload: bytes) -> dict[bytes, bytes]:
    """What :class:`dqid.amp_commands.Chunked` puts in a box."""
    from dqid.amp_commands import Chunked

    strings: dict[bytes, bytes] = {}
    Chunked().toBox(name, strings, {name.decode(): payload}, None)
    return strings


@settings(max_examples=40, deadline=None)
@given(st.one_of(st.binary(max_size=100),
                 st.integers(0, 3 * 65535 + 2).map(lambda n: bytes([n % 251]) * n)))
def test_chunks_round_trip(payload):
    box = chunk_box(b"records", payload)
    box[b"other"] = b"x"
    assert join_chunks(box, b"records") == payload


chunk_keys = st.sampled_from([b"records", b"records.0", b"records.1", b"records.2",
                              b"records.3", b"records.01", b"other"])


@FUZZ
@given(st.dictionaries(chunk_keys, st.one_of(
    st.binary(max_size=6),
    st.sampled_from([b"0", b"1", b"2", b"3", b"01", b" 1", b"+1", b"-1", b"1e3", b"\xd9\xa3",
                     b"999999999", b"99999999999999999999"])), max_size=6))
def test_forged_chunk_boxes_join_or_wire_error(box):
    try:
        joined = join_chunks(box, b"records")
    except WireError as error:
        assert "\n" not in str(error)
        return
    count = int(box[b"records"])
    assert str(count).encode() == box[b"records"] and count >= 1
    assert joined == b"".join(box[b"records.%d" % i] for i in range(1, count + 1))


def test_forged_chunk_count_costs_nothing():
    seconds, peak = _cost(lambda box: join_chunks(box, b"records"),
                          {b"records": b"4000000000", b"records.1": b"x"})
    assert seconds < 0.5 and peak < 64 * 1024
    with pytest.raises(WireError):
        join_chunks({}, b"records")
    with pytest.raises(WireError):
        join_chunks({b"records": b"1", b"records.1": b"x" * 65536}, b"records")


# -- single values ------------------------------------------------------------


@given(st.one_of(st.integers(), st.floats(), st.booleans(), st.text(max_size=3), st.none()))
def test_checked_epoch(value):
    valid = type(value) is int and 0 <= value <= MAX_EPOCH
    try:
        assert checked_epoch(value) == value and valid
    except WireError:
        assert not valid


@given(st.one_of(node_ids, st.text(max_size=70), st.binary(max_size=3), st.integers()))
def test_checked_node_id(value):
    valid = isinstance(value, str) and NODE_ID_RE.match(value) is not None
    try:
        assert checked_node_id(value) == value and valid
    except WireError:
        assert not valid


@given(st.one_of(message_ids, st.text(max_size=20), st.none(), st.integers()))
def test_checked_message_id(value):
    try:
        mid = checked_message_id(value)
    except WireError as error:
        assert "\n" not in str(error)
        return
    assert str(mid) == value


@given(st.one_of(st.floats(), st.integers(-5, 50_000), st.booleans(), st.text(max_size=2)))
def test_checked_seconds(value):
    valid = (type(value) in (int, float) and not math.isnan(value)
             and 0 <= value <= 43200)
    try:
        assert checked_seconds(value, 0, 43200) == value and valid
    except WireError:
        assert not valid


@given(st.one_of(st.integers(), st.booleans(), st.floats(), st.none()))
def test_checked_count(value):
    valid = type(value) is int and 0 <= value <= 1000
    try:
        assert checked_count(value, 1000) == value and valid
    except WireError:
        assert not valid

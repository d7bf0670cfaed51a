"""Properties of :mod:`dqid.wire`: record and tombstone encodings.

Bodies are any bytes, of any size (AMP's 65,535-byte cap is the chunking
layer's business, not this encoding's); decoding is exact, and anything that
is not a whole, valid encoding is a ValueError.
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dqid.ids import NODE_ID_RE, format_id, parse_id
from dqid.replica import Record
from dqid.tombstones import Tombstones
from dqid.wire import (
    WireError, decode_records, decode_states, decode_tombstones, encode_records, encode_states,
    encode_tombstones,
)

AMP_MAX_VALUE = 65_535
MAX_B36 = 36**13 - 1  # the largest epoch or seq an id can carry

node_ids = st.from_regex(NODE_ID_RE, fullmatch=True)
numbers = st.one_of(st.integers(0, 100), st.integers(0, MAX_B36))
message_ids = st.builds(format_id, node_ids, numbers, numbers)

big_bodies = st.builds(
    lambda seed, size: random.Random(seed).randbytes(size),
    st.integers(0, 2**32),
    st.integers(AMP_MAX_VALUE + 1, 3 * AMP_MAX_VALUE),
)
bodies = st.one_of(st.just(b""), st.binary(max_size=200), big_bodies)
small_bodies = st.one_of(st.just(b""), st.binary(max_size=50))
texts = st.one_of(st.none(), st.just(""), st.text(max_size=30))


def records_with(body_strategy):
    return st.builds(
        Record,
        id=message_ids,
        body=body_strategy,
        content_type=texts,
        key=texts,
        deliveries=st.one_of(st.integers(0, 10), st.integers(0, 2**32 - 1)),
    )


def fields(record: Record):
    return (record.id, record.body, record.content_type, record.key, record.deliveries)


@settings(max_examples=100, deadline=None)
@given(st.lists(records_with(bodies), max_size=4))
def test_records_round_trip(records):
    data = encode_records(records)
    back = decode_records(data)
    assert [fields(r) for r in back] == [fields(r) for r in records]
    assert all(isinstance(r.body, bytes) for r in back)
    # Concatenated encodings are the encoding of the concatenation.
    assert b"".join(encode_records([r]) for r in records) == data


@settings(max_examples=100, deadline=None)
@given(st.lists(records_with(small_bodies), min_size=1, max_size=3), st.data())
def test_records_decode_only_at_record_boundaries(records, data):
    """Every cut is either between records or a ValueError."""
    encoded = [encode_records([r]) for r in records]
    boundaries = {0}
    for part in encoded:
        boundaries.add(max(boundaries) + len(part))
    whole = b"".join(encoded)
    cuts = list(range(len(whole) + 1)) if len(whole) < 400 else data.draw(
        st.lists(st.integers(0, len(whole)), min_size=1, max_size=50))
    for cut in cuts:
        if cut in boundaries:
            count = sorted(boundaries).index(cut)
            assert [fields(r) for r in decode_records(whole[:cut])] == [
                fields(r) for r in records[:count]]
        else:
            with pytest.raises(ValueError):
                decode_records(whole[:cut])


@settings(max_examples=15, deadline=None)
@given(records_with(big_bodies), st.data())
def test_big_body_truncated_is_rejected(record, data):
    whole = encode_records([record])
    assert len(whole) > AMP_MAX_VALUE
    cut = data.draw(st.integers(1, len(whole) - 1))
    with pytest.raises(ValueError):
        decode_records(whole[:cut])
    with pytest.raises(ValueError):
        decode_records(whole[:-1])


def test_truncated_text_field_with_empty_body_is_rejected():
    whole = encode_records([Record("n.1.ab", b"", "text/plain", "key")])
    for cut in range(1, len(whole)):
        with pytest.raises(ValueError):
            decode_records(whole[:cut])


def _raw(raw_id: bytes, body: bytes = b"", ct: bytes | None = None,
         key: bytes | None = None, deliveries: int = 0) -> bytes:
    """One record's bytes, built by hand (so the id need not be valid)."""
    header = struct.pack(
        ">HHHIIBd", len(raw_id),
        0xFFFF if ct is None else len(ct),
        0xFFFF if key is None else len(key),
        deliveries, len(body), 0, 0.0)
    return header + raw_id + (ct or b"") + (key or b"") + body


def _is_bad_id(text: str) -> bool:
    try:
        parse_id(text)
    except ValueError:
        return True
    return False


@pytest.mark.parametrize("bad", [
    "", "nodots", "a.1", "a.1.", "a..1", ".1.1", "a.B.1", "a.1.Z", "a.-1.1",
    "bad node.1.1", "x" * 65 + ".1.1", "a.1.12345678901234", "a.1.1 ", "a/b.1.1",
])
def test_bad_ids_are_rejected(bad):
    assert _is_bad_id(bad)
    with pytest.raises(ValueError):
        decode_records(_raw(bad.encode()))
    # Also when it follows a good record.
    good = encode_records([Record(format_id("n", 1, 1), b"x")])
    with pytest.raises(ValueError):
        decode_records(good + _raw(bad.encode(), b"body"))


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(codec="ascii"), max_size=40), small_bodies)
def test_random_bad_ids_are_rejected(text, body):
    assume(_is_bad_id(text))
    with pytest.raises(ValueError):
        decode_records(_raw(text.encode(), body))


def test_non_utf8_and_missing_ids_are_rejected():
    with pytest.raises(ValueError):
        decode_records(_raw(b"n\xff.1.1"))
    with pytest.raises(ValueError):
        decode_records(_raw("nœ.1.1".encode()))
    # An id field marked "none" is not an id.
    header = struct.pack(">HHHIIBd", 0xFFFF, 0xFFFF, 0xFFFF, 0, 0, 0, 0.0)
    with pytest.raises(ValueError):
        decode_records(header)
    with pytest.raises(ValueError):
        decode_records(_raw(format_id("n", 1, 1).encode(), ct=b"\xc3"))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_garbage_decodes_exactly_or_raises_value_error(data):
    try:
        records = decode_records(data)
    except ValueError:
        return
    # Whatever is accepted is a whole encoding: it re-encodes to the same bytes.
    assert encode_records(records) == data


@settings(max_examples=100, deadline=None)
@given(records_with(small_bodies), st.binary(min_size=1, max_size=30))
def test_trailing_garbage_after_a_record(record, junk):
    data = encode_records([record]) + junk
    try:
        records = decode_records(data)
    except ValueError:
        return
    assert encode_records(records) == data


def test_string_field_length_limit():
    ok = "é" * 32767  # 65,534 bytes: the longest a field may be
    rec = Record(format_id("n", 1, 1), b"", ok, ok)
    (back,) = decode_records(encode_records([rec]))
    assert back.content_type == ok and back.key == ok
    with pytest.raises(ValueError):
        encode_records([Record(format_id("n", 1, 1), b"", "x" * 65535)])
    with pytest.raises(ValueError):
        encode_records([Record(format_id("n", 1, 1), b"", None, "x" * 70000)])


def test_empty_and_boundary_records():
    assert decode_records(b"") == []
    assert encode_records([]) == b""
    rec = Record(format_id("n", 0, 0), b"")
    (back,) = decode_records(encode_records([rec]))
    assert fields(back) == (format_id("n", 0, 0), b"", None, None, 0)
    assert back.owner == "n"


# -- tombstones ---------------------------------------------------------------

tombstone_entries = st.lists(
    st.tuples(
        st.one_of(st.sampled_from(["a", "b"]), node_ids),
        st.one_of(st.integers(0, 3), st.integers(0, MAX_B36)),
        st.one_of(st.integers(0, 100), st.integers(0, MAX_B36)),
        st.integers(1, 1000),
    ),
    max_size=20,
)


def _tombstones(entries) -> Tombstones:
    tombstones = Tombstones()
    for owner, epoch, start, length in entries:
        tombstones.add_range(owner, epoch, start, start + length)
    return tombstones


@settings(max_examples=150, deadline=None)
@given(tombstone_entries)
def test_tombstones_round_trip(entries):
    tombstones = _tombstones(entries)
    data = encode_tombstones(tombstones)
    assert isinstance(data, bytes)
    back = decode_tombstones(data)
    assert back.as_dict() == tombstones.as_dict()
    assert back == tombstones
    for owner, epoch, start, length in entries:
        assert (owner, epoch, start) in back
        assert (owner, epoch, start + length - 1) in back
    assert encode_tombstones(back) == data


def test_empty_tombstones():
    assert decode_tombstones(b"").as_dict() == {}
    assert decode_tombstones(encode_tombstones(Tombstones())).as_dict() == {}


def test_many_tombstone_ranges_exceed_one_amp_value_and_round_trip():
    tombstones = Tombstones()
    for seq in range(0, 40_000, 2):  # 20,000 gaps: 20,000 ranges
        tombstones.add("node-a", 5, seq)
    data = encode_tombstones(tombstones)
    assert len(data) > AMP_MAX_VALUE
    back = decode_tombstones(data)
    assert back == tombstones
    assert back.range_count() == 20_000


def test_a_negative_zero_due_time_is_refused():
    # -0.0 would decode as "not delayed" and encode again as 0.0: the
    # encoding would not be the one dqid sends (found by test_wire_fuzz).
    negative_zero, one = struct.pack(">d", -0.0), struct.pack(">d", 1.0)
    records = encode_records([Record("a.1.1", b"x", due=1.0)])
    assert one in records
    with pytest.raises(WireError):
        decode_records(records.replace(one, negative_zero))
    states = encode_states([Record("a.1.1", b"x", due=1.0)])
    with pytest.raises(WireError):
        decode_states(states.replace(one, negative_zero))

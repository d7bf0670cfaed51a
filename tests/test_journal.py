"""The journal file format (dqid.journal): entries read back as written, a
torn tail is cut, damage before the tail is an error naming file and offset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dqid import journal
from dqid.journal import (
    CorruptLog, Entry, EntryType, Epochs, MessageState, decode_payload, encode_group,
    encode_header, scan, scan_segment,
)
from dqid.replica import Record
from dqid.tombstones import Tombstones

SALT = 0x5EED


def records(start: int, count: int, owner: str = "a") -> list[Record]:
    return [Record(f"{owner}.1.{seq}", b"body %d" % seq, "text/plain" if seq % 2 else None)
            for seq in range(start, start + count)]


def sample_groups() -> list[list[Entry]]:
    gone = Tombstones()
    gone.add_range("a", 1, 1, 3)
    return [
        [journal.own_records(records(1, 3))],
        [journal.replica_records(records(1, 2, owner="b")), journal.tombstones_entry(gone)],
        [journal.states_entry([MessageState("a.1.3", 2, journal.HELD, 0.0)]),
         journal.epochs_entry(Epochs("a", 1, {"b": 4})),
         journal.own_records(records(4, 1))],
    ]


def segment_bytes(groups: list[list[Entry]], first_group: int = 7) -> tuple[bytes, list[int]]:
    """A segment holding ``groups``, and where each group ends."""
    data = encode_header(SALT, first_group)
    ends = []
    for number, group in enumerate(groups, start=first_group):
        data += encode_group(group, group=number, salt=SALT)
        ends.append(len(data))
    return data, ends


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def flat(groups: list[list[Entry]]) -> list[Entry]:
    return [entry for group in groups for entry in group]


def test_entries_read_back_as_written(tmp_path: Path) -> None:
    groups = sample_groups()
    data, _ends = segment_bytes(groups)
    entries, good_length = scan(write(tmp_path / "log", data))
    assert entries == flat(groups)
    assert good_length == len(data)


def test_payloads_decode_to_what_was_encoded() -> None:
    gone = Tombstones()
    gone.add_range("b", 3, 5, 9)
    state = MessageState("a.1.2", 3, journal.DELAYED, 1_700_000_000.25)
    written = records(1, 2)
    assert [(r.id, r.body, r.content_type) for r in decode_payload(journal.own_records(written))] \
        == [(r.id, r.body, r.content_type) for r in written]
    assert decode_payload(journal.tombstones_entry(gone)) == gone
    assert decode_payload(journal.states_entry([state])) == [state]
    assert decode_payload(journal.epochs_entry(Epochs("a", 9, {"b": 2}))) \
        == Epochs("a", 9, {"b": 2})


def test_partial_last_entry_is_a_torn_tail(tmp_path: Path) -> None:
    groups = sample_groups()
    data, ends = segment_bytes(groups)
    path = write(tmp_path / "log", data[:-5])
    entries, good_length = scan(path)
    # The damaged group is dropped whole: none of it was fsynced.
    assert entries == flat(groups[:2])
    assert good_length == ends[1]


@pytest.mark.parametrize("garbage", [os.urandom(3000), b"\0" * 5000, b"\xd9\x7e" * 40])
def test_garbage_after_the_last_entry_is_a_torn_tail(tmp_path: Path, garbage: bytes) -> None:
    groups = sample_groups()
    data, _ends = segment_bytes(groups)
    entries, good_length = scan(write(tmp_path / "log", data + garbage))
    assert entries == flat(groups)
    assert good_length == len(data)


def test_a_hole_inside_the_last_group_is_a_torn_tail(tmp_path: Path) -> None:
    """Pages of the last write may reach the disk out of order: zeros in
    its first entry with its later entries intact are still a crash."""
    groups = sample_groups()
    data, ends = segment_bytes(groups)
    hole = bytearray(data)
    hole[ends[1] + 4:ends[1] + 40] = bytes(36)
    entries, good_length = scan(write(tmp_path / "log", bytes(hole)))
    assert entries == flat(groups[:2])
    assert good_length == ends[1]


def test_flipped_byte_in_the_middle_names_file_and_offset(tmp_path: Path) -> None:
    groups = sample_groups()
    data, ends = segment_bytes(groups)
    damaged = bytearray(data)
    damaged[ends[0] + 30] ^= 0x01  # inside the first entry of the second group
    path = write(tmp_path / "log", bytes(damaged))
    with pytest.raises(CorruptLog) as caught:
        scan(path)
    message = str(caught.value)
    assert caught.value.offset == ends[0]
    assert path in message and f"offset {ends[0]}" in message
    assert "\n" not in message


def test_damaged_end_of_a_group_before_a_later_group_is_corruption(tmp_path: Path) -> None:
    groups = sample_groups()
    data, ends = segment_bytes(groups)
    damaged = bytearray(data)
    damaged[ends[1] - 2] ^= 0x40  # checksum of the second group's last entry
    with pytest.raises(CorruptLog):
        scan(write(tmp_path / "log", bytes(damaged)))


def test_a_frame_inside_a_message_body_does_not_pass_for_an_entry(tmp_path: Path) -> None:
    """A producer cannot know the segment's salt, so a body built to look
    like a journal entry is just bytes: tearing its entry is a torn tail."""
    fake = journal.encode_entry(EntryType.OWN_RECORDS, b"x" * 10, group=8, salt=0)
    groups = [[journal.own_records(records(1, 1))],
              [journal.own_records([Record("a.1.9", b"y" * 50 + fake + b"z" * 50)])]]
    data, ends = segment_bytes(groups)
    entries, good_length = scan(write(tmp_path / "log", data[:-20]))
    assert entries == flat(groups[:1])
    assert good_length == ends[0]


def test_a_file_that_is_not_a_journal_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "log", b"hello, this is not a journal at all")
    with pytest.raises(CorruptLog) as caught:
        scan(path)
    assert caught.value.offset == 0


def test_a_damaged_header_is_refused(tmp_path: Path) -> None:
    data, _ends = segment_bytes(sample_groups())
    damaged = bytearray(data)
    damaged[9] ^= 0x10  # the salt
    with pytest.raises(CorruptLog) as caught:
        scan(write(tmp_path / "log", bytes(damaged)))
    assert caught.value.offset == 0


def test_next_group_continues_after_the_last_complete_group(tmp_path: Path) -> None:
    groups = sample_groups()
    data, _ends = segment_bytes(groups, first_group=2**32 - 2)  # wraps around
    assert scan_segment(write(tmp_path / "log", data)).next_group == 1
    assert scan_segment(write(tmp_path / "log", data[:-3])).next_group == 0


# -- properties ---------------------------------------------------------------

bodies = st.binary(max_size=300)
group_lists = st.lists(
    st.lists(st.builds(lambda body, own: journal.own_records([Record("a.1.1", body)])
                       if own else journal.replica_records([Record("b.2.3", body)]),
                       bodies, st.booleans()),
             min_size=1, max_size=4),
    min_size=1, max_size=6)


@settings(max_examples=150, deadline=None)
@given(groups=group_lists, cut=st.floats(0, 1))
def test_any_truncation_scans_to_a_prefix(tmp_path_factory, groups, cut) -> None:
    data, ends = segment_bytes(groups)
    length = int(len(data) * cut)
    path = write(tmp_path_factory.mktemp("cut") / "log", data[:length])
    entries, good_length = scan(path)
    written = flat(groups)
    assert entries == written[:len(entries)]
    assert good_length <= length
    # Cutting there leaves a clean file with the same entries.
    os.truncate(path, good_length)
    assert scan(path) == (entries, good_length)
    # Whole groups only, and every group complete before the cut survives.
    complete = [end for end in ends if end <= length]
    assert len(entries) == sum(len(g) for g in groups[:len(complete)])


@settings(max_examples=100, deadline=None)
@given(groups=group_lists, garbage=st.binary(min_size=1, max_size=2000))
def test_any_garbage_after_the_end_is_cut(tmp_path_factory, groups, garbage) -> None:
    data, _ends = segment_bytes(groups)
    path = write(tmp_path_factory.mktemp("junk") / "log", data + garbage)
    assert scan(path) == (flat(groups), len(data))


@settings(max_examples=100, deadline=None)
@given(states=st.lists(st.builds(
    MessageState, st.from_regex(r"\A[a-z]{1,8}\.[0-9a-z]{1,4}\.[0-9a-z]{1,4}\Z"),
    st.integers(0, 2**32 - 1), st.integers(0, 255),
    st.floats(0, 4e9, allow_nan=False))))
def test_states_round_trip(states) -> None:
    assert journal.decode_states(journal.encode_states(states)) == states

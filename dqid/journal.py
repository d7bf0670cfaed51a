"""The on-disk journal format: framed, checksummed entries in segment files.

Pure file format: no reactor, no threads.  A segment file is a header and
then entries, appended in *groups* (one group = one ``write`` + one fsync of
the writer)::

    header:  MAGIC(8) | salt u32 | first_group u32 | crc32(MAGIC..first_group) u32
    entry:   MARK(2) | length u32 | kind u8 | group u32 | payload | crc u32

``kind`` is the entry type with bit 7 set on the last entry of its group;
``crc`` is ``zlib.crc32`` of ``length | kind | group | payload`` started from
the segment's random ``salt``, so bytes a producer put in a message body can
never pass for an entry of the file they are stored in.  Group numbers rise
by one per group (mod 2**32), starting at the header's ``first_group``.

Torn tail or corruption
-----------------------
The writer only writes group ``g + 1`` after the fsync of group ``g``
returned, so a crash can only damage the *last* group, and the damage may be
anywhere in it (pages of one write can reach the disk in any order).  Scanning
stops at the first *bad frame* (bad mark, bad checksum, a length past the end
of the file).  The bad frame belongs to the group that was open there (the
group of the entry before it if that entry was not its group's last, else
the next group).  Then:

* every valid entry found after the bad frame belongs to that same group
  (or there is none): the damage lies within the last group, as a crash
  leaves it -- a **torn tail**; and
* any valid entry of another group after it: a group that was fsynced before
  a later one was written is damaged -- **corruption**, :class:`CorruptLog`.
  So is a valid entry whose group is out of sequence, and one of an unknown
  type.

A torn tail drops the whole damaged group (none of it was fsynced, so no
caller was told it is on disk); the same goes for a last group that simply
ends early.  ``good_length`` is where the last complete group ends: the
caller truncates the file to it.  What cannot be told apart: damage to the
final group after its fsync (a bit flip of the newest group on the platter)
looks like a torn write and is cut too -- logged, never silent.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Iterable

from .replica import MessageLike, Record
from .tombstones import Tombstones
from .wire import (
    decode_records, decode_run, decode_tombstones, encode_records, encode_tombstones,
)

MAGIC = b"dqidlog\x01"
_HEADER = struct.Struct(">8sII")  # magic, salt, first group
_CRC = struct.Struct(">I")
HEADER_SIZE = _HEADER.size + _CRC.size

MARK = b"\xd9\x7e"
_FRAME = struct.Struct(">2sIBI")  # mark, payload length, kind, group
FRAME_OVERHEAD = _FRAME.size + _CRC.size
_LAST = 0x80
_GROUPS = 1 << 32


class EntryType(IntEnum):
    OWN_RECORDS = 1  # messages of this node's queue (wire.encode_records)
    REPLICA_RECORDS = 2  # copies held for peers (wire.encode_records)
    TOMBSTONES = 3  # ids gone for good (wire.encode_tombstones)
    STATES = 4  # deliveries / held / due of own messages (encode_states)
    EPOCHS = 5  # the node's id and epoch, and every epoch known (encode_epochs)
    REPLICA_RUN = 6  # copies held for a peer: a packed run (wire.encode_run)


class CorruptLog(Exception):
    """A journal file is damaged before its tail: never cut, never skipped."""

    def __init__(self, path: str, offset: int, reason: str = "bad entry") -> None:
        super().__init__(path, offset, reason)
        self.path = path
        self.offset = offset
        self.reason = reason

    def __str__(self) -> str:
        return f"corrupt journal {self.path} at offset {self.offset}: {self.reason}"


@dataclass(frozen=True, slots=True)
class Entry:
    """One journal entry: what it is and its encoded payload."""

    type: EntryType
    payload: bytes


# -- payloads -----------------------------------------------------------------

# What a message's state entry says it is besides its deliveries.
READY = 0  # in line (or leased: leases do not survive a restart)
HELD = 1  # set aside, not delivered until released
DELAYED = 2  # not deliverable before ``due``


@dataclass(frozen=True, slots=True)
class MessageState:
    """The mutable part of an own message; the newest one written wins.

    ``due`` is wall-clock seconds since the Unix epoch (0.0: none), since a
    monotonic clock does not survive a restart.
    """

    id: str
    deliveries: int
    state: int = READY
    due: float = 0.0


_STATE = struct.Struct(">HIBd")


def encode_states(states: Iterable[MessageState]) -> bytes:
    parts: list[bytes] = []
    for item in states:
        raw_id = item.id.encode("ascii")
        parts.append(_STATE.pack(len(raw_id), item.deliveries, item.state, item.due))
        parts.append(raw_id)
    return b"".join(parts)


def decode_states(data: bytes) -> list[MessageState]:
    states: list[MessageState] = []
    offset, end, size = 0, len(data), _STATE.size
    while offset < end:
        if offset + size > end:
            raise ValueError("truncated state")
        id_len, deliveries, state, due = _STATE.unpack_from(data, offset)
        offset += size
        if offset + id_len > end:
            raise ValueError("truncated state id")
        message_id = data[offset:offset + id_len].decode("ascii")
        offset += id_len
        states.append(MessageState(message_id, deliveries, state, due))
    return states


@dataclass(frozen=True, slots=True)
class Epochs:
    """The node's own id and epoch, and the highest epoch known per owner."""

    node: str
    epoch: int
    known: dict[str, int] = field(default_factory=dict)


def encode_epochs(epochs: Epochs) -> bytes:
    document = {"node": epochs.node, "epoch": epochs.epoch, "known": epochs.known}
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode("utf-8")


def decode_epochs(data: bytes) -> Epochs:
    document = json.loads(data)
    known = {str(owner): int(epoch) for owner, epoch in document["known"].items()}
    return Epochs(str(document["node"]), int(document["epoch"]), known)


def own_records(messages: Iterable[MessageLike]) -> Entry:
    return Entry(EntryType.OWN_RECORDS, encode_records(messages))


def replica_records(records: Iterable[MessageLike], encoded: Iterable[bytes] = ()) -> Entry:
    """Copies of peers' records: ``records``, then records already encoded
    (the bytes of runs, as they arrived)."""
    return Entry(EntryType.REPLICA_RECORDS, b"".join([encode_records(records), *encoded]))


def packed_run_entry(data: bytes) -> Entry:
    """Copies of a peer's records: a packed run, as it arrived."""
    return Entry(EntryType.REPLICA_RUN, data)


def tombstones_entry(tombstones: Tombstones) -> Entry:
    return Entry(EntryType.TOMBSTONES, encode_tombstones(tombstones))


def states_entry(states: Iterable[MessageState]) -> Entry:
    return Entry(EntryType.STATES, encode_states(states))


def epochs_entry(epochs: Epochs) -> Entry:
    return Entry(EntryType.EPOCHS, encode_epochs(epochs))


def decode_payload(entry: Entry) -> list[Record] | Tombstones | list[MessageState] | Epochs:
    """The payload of ``entry`` decoded; ValueError (or another error of the
    decoder) if it does not decode."""
    kind = entry.type
    if kind in (EntryType.OWN_RECORDS, EntryType.REPLICA_RECORDS):
        return decode_records(entry.payload)
    if kind == EntryType.REPLICA_RUN:
        return decode_run(entry.payload).records()
    if kind == EntryType.TOMBSTONES:
        return decode_tombstones(entry.payload)
    if kind == EntryType.STATES:
        return decode_states(entry.payload)
    return decode_epochs(entry.payload)


# -- frames -------------------------------------------------------------------

def new_salt() -> int:
    return int.from_bytes(os.urandom(4), "big")


def encode_header(salt: int, first_group: int) -> bytes:
    head = _HEADER.pack(MAGIC, salt, first_group % _GROUPS)
    return head + _CRC.pack(zlib.crc32(head))


def encode_entry(type: int, payload: bytes, *, group: int = 0, last: bool = True,
                 salt: int = 0) -> bytes:
    """One framed entry (``last``: it closes its group)."""
    kind = int(EntryType(type)) | (_LAST if last else 0)
    head = _FRAME.pack(MARK, len(payload), kind, group % _GROUPS)
    crc = zlib.crc32(payload, zlib.crc32(head[2:], salt))
    return b"".join((head, payload, _CRC.pack(crc)))


def encode_group(entries: Iterable[Entry], *, group: int, salt: int) -> bytes:
    """``entries`` as one group: what one write puts in a segment."""
    items = list(entries)
    if not items:
        return b""
    last = len(items) - 1
    return b"".join(
        encode_entry(entry.type, entry.payload, group=group, last=index == last, salt=salt)
        for index, entry in enumerate(items)
    )


@dataclass(slots=True)
class _Frame:
    offset: int
    end: int
    type: int
    last: bool
    group: int
    payload: bytes


def _frame_at(data: bytes, offset: int, salt: int) -> _Frame | None:
    """The valid frame at ``offset``, or None."""
    body = offset + _FRAME.size
    if body > len(data) or data[offset:offset + 2] != MARK:
        return None
    _mark, length, kind, group = _FRAME.unpack_from(data, offset)
    end = body + length + _CRC.size
    if end > len(data):
        return None
    (crc,) = _CRC.unpack_from(data, end - _CRC.size)
    head_crc = zlib.crc32(memoryview(data)[offset + 2:body], salt)
    if zlib.crc32(memoryview(data)[body:body + length], head_crc) != crc:
        return None
    return _Frame(offset, end, kind & ~_LAST, bool(kind & _LAST), group, data[body:body + length])


def _next_valid(data: bytes, start: int, salt: int) -> _Frame | None:
    """The first valid frame starting at or after ``start``."""
    offset = data.find(MARK, start)
    while offset != -1:
        frame = _frame_at(data, offset, salt)
        if frame is not None:
            return frame
        offset = data.find(MARK, offset + 1)
    return None


@dataclass(slots=True)
class SegmentScan:
    """What :func:`scan_segment` read from one file."""

    path: str
    entries: list[Entry]
    offsets: list[int]  # where each entry starts
    good_length: int  # end of the last complete group (or 0: no valid header)
    size: int  # the file's length
    next_group: int  # the group number the next write takes
    salt: int
    torn_reason: str | None  # why the tail after good_length is cut

    @property
    def torn(self) -> bool:
        return self.good_length < self.size


def scan_segment(path: str) -> SegmentScan:
    """Read a segment: its entries of complete groups and where they end.

    A torn tail is reported (``good_length < size``, ``torn_reason``);
    damage before the tail raises :class:`CorruptLog`.
    """
    with open(path, "rb") as file:
        data = file.read()
    size = len(data)
    if size < HEADER_SIZE:
        if MAGIC.startswith(data[:len(MAGIC)]):  # a header cut short
            return SegmentScan(path, [], [], 0, size, 0, 0, "incomplete header")
        raise CorruptLog(path, 0, "not a dqid journal")
    magic, salt, first_group = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CorruptLog(path, 0, "not a dqid journal")
    if _CRC.unpack_from(data, _HEADER.size)[0] != zlib.crc32(data[:_HEADER.size]):
        raise CorruptLog(path, 0, "header checksum mismatch")

    entries: list[Entry] = []
    offsets: list[int] = []
    complete = 0  # entries in complete groups
    good = offset = HEADER_SIZE
    group, closed = (first_group - 1) % _GROUPS, True  # the previous group, and if it ended
    while offset < size:
        frame = _frame_at(data, offset, salt)
        if frame is None or frame.group != (group + 1 if closed else group) % _GROUPS:
            open_group = (group + 1 if closed else group) % _GROUPS
            _check_tail(path, data, offset, salt, open_group, frame)
            # The damaged group is cut, so the next write takes its number.
            return SegmentScan(path, entries[:complete], offsets[:complete], good, size,
                               open_group, salt, "damaged entry")
        entries.append(Entry(_entry_type(path, frame), frame.payload))
        offsets.append(offset)
        group, closed, offset = frame.group, frame.last, frame.end
        if closed:
            complete, good = len(entries), offset
    if not closed:  # the file ends inside a group
        return SegmentScan(path, entries[:complete], offsets[:complete], good, size,
                           group, salt, "incomplete group")
    return SegmentScan(path, entries, offsets, good, size, (group + 1) % _GROUPS, salt, None)


def _entry_type(path: str, frame: _Frame) -> EntryType:
    try:
        return EntryType(frame.type)
    except ValueError:
        raise CorruptLog(path, frame.offset, f"unknown entry type {frame.type}") from None


def _check_tail(path: str, data: bytes, offset: int, salt: int, open_group: int,
                frame: _Frame | None) -> None:
    """Raise CorruptLog unless the bad frame at ``offset`` and everything
    valid after it lie in ``open_group`` (the group a crash may have torn)."""
    if frame is not None:  # valid but out of sequence
        raise CorruptLog(path, offset, f"entry of group {frame.group} where group "
                                       f"{open_group} was due")
    found = _next_valid(data, offset + 1, salt)
    while found is not None:
        if found.group != open_group:
            raise CorruptLog(path, offset, f"damaged entry before valid entries "
                                           f"(at offset {found.offset})")
        _entry_type(path, found)
        found = _next_valid(data, found.end, salt)


def scan(path: str) -> tuple[list[Entry], int]:
    """The entries of the journal file at ``path`` and the length they fill.

    ``good_length`` below the file's size means a torn tail follows (cut it
    by truncating to ``good_length``); damage before the tail raises
    :class:`CorruptLog` naming the file and offset.
    """
    result = scan_segment(path)
    return result.entries, result.good_length

"""Byte encodings of records and tombstones for the AMP commands.

Records are length-prefixed binary (bodies are any bytes); a packed run
(protocol 4) is a batch of fresh records with consecutive ids, their body
lengths in one array; tombstones are JSON of ``Tombstones.as_dict()``.
All may be far larger than one AMP value; :class:`dqid.amp_commands.Chunked`
splits them on the wire (see :func:`join_chunks`).

Everything here decodes bytes a peer sent, so every decoder checks every
value and raises only :class:`WireError` for input that is not a valid
encoding: never another exception, never a hang, and never an allocation
larger than the input (a forged length can only point past the end).
"""

from __future__ import annotations

import json
import re
import struct
import sys
from array import array
from itertools import accumulate
from math import copysign
from sys import intern
from typing import Any, Iterable, Mapping

from .ids import MessageId, id_prefix, is_valid_node_id, parse_id, to_base36
from .replica import MessageLike, Record, Run
from .tombstones import Tombstones

# id, content-type and key lengths (0xFFFF: none), deliveries, body length,
# flags (bit 0: held), due time (wall clock seconds; 0: not delayed).
_HEADER = struct.Struct(">HHHIIBd")
_HELD = 1
# The same header with the due time's bits as an int: 0 is +0.0 exactly.
_FRESH_HEADER = struct.Struct(">HHHIIBQ")
# A state update: id length, deliveries, flags, due.
_STATE = struct.Struct(">HIBd")
_NONE = 0xFFFF

MAX_EPOCH = 36**13 - 1  # the largest epoch (or seq) a message id can carry
MAX_SEQ = MAX_EPOCH
# Seqs past MAX_SEQ never exist, so a range may end anywhere beyond it; the
# bound only keeps absurd integers out.
MAX_RANGE_END = 2**128
MAX_CHUNK_BYTES = 0xFFFF  # one AMP value
MAX_DUE = 1e11  # a due time in wall-clock seconds (year 5138): no more
_SHOWN = 60  # characters of a bad value quoted in an error message
_DECIMAL_RE = re.compile(r"\A(?:0|[1-9][0-9]{0,20})\Z")
_COUNT_RE = re.compile(rb"\A[1-9][0-9]{0,9}\Z")


class WireError(ValueError):
    """Bytes or values from a peer that are not a valid encoding.

    The only exception the decoders raise for bad input; its message is one
    line, with any quoted value cut short.
    """


def _quoted(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


# -- records ------------------------------------------------------------------


def _due_ok(due: float) -> bool:
    """A due time as dqid encodes it: 0.0 (none) or a time up to MAX_DUE;
    not NaN, and not -0.0 (it would decode as "none" and encode as 0.0)."""
    return 0.0 <= due <= MAX_DUE and copysign(1.0, due) > 0


def _text(value: str | None) -> tuple[int, bytes]:
    if value is None:
        return _NONE, b""
    raw = value.encode("utf-8")
    if len(raw) >= _NONE:
        raise ValueError("string field too long")
    return len(raw), raw


def encode_records(messages: Iterable[MessageLike]) -> bytes:
    parts: list[bytes] = []
    append, pack = parts.append, _HEADER.pack
    content_types: dict[str | None, tuple[int, bytes]] = {None: (_NONE, b"")}
    for message in messages:
        raw_id = message.id.encode("ascii")
        content_type = message.content_type
        ct_len, ct = content_types.get(content_type) or content_types.setdefault(
            content_type, _text(content_type))  # a batch has one or a few
        key_len, key = _text(message.key) if message.key is not None else (_NONE, b"")
        append(pack(len(raw_id), ct_len, key_len, message.deliveries, len(message.body),
                    _HELD if message.held else 0, message.due or 0.0))
        append(raw_id)
        append(ct)
        append(key)
        append(message.body)
    return b"".join(parts)


def decode_records(data: bytes) -> list[Record]:
    """The records in ``data``: whole, valid encodings only, else WireError.

    Each record is a header (id, content-type and key lengths, 0xFFFF for
    none; deliveries; body length) and then those fields.  The id must be one
    dqid could mint; text fields must be UTF-8; nothing may run past the end.
    """
    if type(data) is not bytes:
        data = bytes(memoryview(data))  # bodies must be bytes, not views
    records: list[Record] = []
    append = records.append
    unpack = _HEADER.unpack_from
    size = _HEADER.size
    end = len(data)
    offset = start = 0
    try:
        while offset < end:
            start = offset
            stop = offset + size
            if stop > end:
                raise WireError("truncated record header")
            id_len, ct_len, key_len, deliveries, body_len, flags, due = unpack(data, offset)
            if flags & ~_HELD or not _due_ok(due):
                raise WireError("bad state flags or due time")
            if id_len == _NONE:
                raise WireError("record without an id")
            offset, stop = stop, stop + id_len
            message_id = data[offset:stop].decode("utf-8")
            content_type = key = None
            if ct_len != _NONE:
                offset, stop = stop, stop + ct_len
                content_type = intern(data[offset:stop].decode("utf-8"))
            if key_len != _NONE:
                offset, stop = stop, stop + key_len
                key = data[offset:stop].decode("utf-8")
            offset, stop = stop, stop + body_len
            if stop > end:
                raise WireError("truncated record")
            mid = parse_id(message_id)  # ValueError for an id dqid could not mint
            append(Record(message_id, data[offset:stop], content_type, key, deliveries, mid,
                          bool(flags), due or None))
            offset = stop
    except WireError as error:
        raise WireError(f"record at byte {start}: {error}") from None
    except UnicodeDecodeError:
        raise WireError(f"record at byte {start}: a text field is not UTF-8") from None
    except ValueError:
        raise WireError(
            f"record at byte {start}: not a dqid message id: {_quoted(message_id)}"
        ) from None
    return records


# Fewer records than this are not worth a Run (see dqid.replica).
RUN_MIN_RECORDS = 16
_MAX_RUN_BYTES = 2**32 - 1  # the offsets of a run are 32-bit


def scan_run(data: bytes, min_records: int = RUN_MIN_RECORDS) -> Run | None:
    """The records of ``data`` as a :class:`Run`, if they are one, else None.

    A run is at least ``min_records`` records of one owner and epoch with
    consecutive seqs, all fresh (no deliveries, not held, not delayed), none
    with an idempotency key, all of one content type.  Every record is
    checked as :func:`decode_records` would check it (each id must be the
    next one, spelt as dqid spells it), but only the bodies' places are
    kept.  None says nothing about validity: :func:`decode_records` decides
    that.  Never raises.
    """
    if type(data) is not bytes:
        data = bytes(memoryview(data))
    end = len(data)
    size = _HEADER.size
    if end < size or end > _MAX_RUN_BYTES:
        return None
    id_len, ct_len = _FRESH_HEADER.unpack_from(data, 0)[:2]
    if id_len == _NONE or end < min_records * (size + id_len):
        return None
    try:
        first = parse_id(data[size:size + id_len].decode("ascii"))
        content_type = ct = None
        if ct_len != _NONE:
            ct = data[size + id_len:size + id_len + ct_len]
            content_type = intern(ct.decode("utf-8"))
        prefix = id_prefix(first.node, first.epoch).encode("ascii")
        seq = first.seq
        digits = len(to_base36(seq))
        wanted_id_len = len(prefix) + digits
        next_digit = 36**digits  # the first seq spelt with one digit more
        id_start = size + len(prefix)
        bodies = array("I")
        add = bodies.append
        unpack, startswith = _FRESH_HEADER.unpack_from, data.startswith
        offset = 0
        while offset < end:
            if offset + size > end:
                return None
            id_len, this_ct_len, key_len, deliveries, body_len, flags, due = unpack(
                data, offset)
            if (id_len != wanted_id_len or seq > MAX_SEQ or this_ct_len != ct_len
                    or key_len != _NONE or deliveries or flags or due
                    or not startswith(prefix, offset + size)):
                return None
            # The seq: its value, and (its length being the canonical one)
            # its spelling but for case, which the second test settles.
            seq_text = data[offset + id_start:offset + size + id_len]
            if int(seq_text, 36) != seq or seq_text.lower() != seq_text:
                return None
            body_start = offset + size + id_len
            if ct is not None:
                if not startswith(ct, body_start):
                    return None
                body_start += ct_len
            offset = body_start + body_len
            if offset > end:
                return None
            add(body_start)
            add(offset)
            seq += 1
            if seq == next_digit:
                next_digit, wanted_id_len = next_digit * 36, wanted_id_len + 1
    except ValueError:  # not an id, not base 36, not UTF-8
        return None
    if len(bodies) < 2 * min_records:
        return None
    return Run(prefix.decode("ascii"), first.epoch, first.seq, data, bodies, content_type)


# -- packed runs (protocol 4) ----------------------------------------------------

# A run packed by its owner: this header, the first record's id, the
# content type, each body's length (uint32, little-endian), then the bodies
# back to back.  Encoding and checking it is a few C calls, where a run of
# records (scan_run) is a Python loop per record.
_PACKED = struct.Struct("<BHHI")  # format, first id length, content-type length, count
PACKED_FORMAT = 1
_LENGTHS = array("I")
if _LENGTHS.itemsize != 4:  # pragma: no cover - every platform dqid runs on
    _LENGTHS = array("L")
    assert _LENGTHS.itemsize == 4, "no 32-bit array type"
_LENGTH_CODE = _LENGTHS.typecode
_SWAP = sys.byteorder != "little"


def encode_run(first_id: str, content_type: str | None, bodies: list[bytes]) -> bytes:
    """Records with the ids from ``first_id`` on (consecutive seqs) and
    ``bodies``, fresh and with no key, all of ``content_type``: a packed
    run (``decode_run``)."""
    raw_id = first_id.encode("ascii")
    ct_len, ct = _text(content_type)
    lengths = array(_LENGTH_CODE, map(len, bodies))
    if _SWAP:  # pragma: no cover - big-endian hosts
        lengths.byteswap()
    return b"".join([_PACKED.pack(PACKED_FORMAT, len(raw_id), ct_len, len(bodies)),
                     raw_id, ct, lengths.tobytes(), *bodies])


def decode_run(data: bytes) -> Run:
    """The :class:`Run` packed in ``data``; WireError if it is not one.

    Every id must be one dqid could mint, the content type UTF-8, and the
    lengths must add up to the bodies' bytes."""
    if type(data) is not bytes:
        data = bytes(memoryview(data))
    end = len(data)
    size = _PACKED.size
    if end < size:
        raise WireError("packed run: truncated header")
    form, id_len, ct_len, count = _PACKED.unpack_from(data, 0)
    if form != PACKED_FORMAT:
        raise WireError(f"packed run: unknown format {form}")
    if end > _MAX_RUN_BYTES:
        raise WireError("packed run: longer than 4 GiB")
    offset = size + id_len
    raw_id = data[size:offset]
    try:
        first = parse_id(raw_id.decode("ascii"))
        content_type = None
        if ct_len != _NONE:
            content_type = intern(data[offset:offset + ct_len].decode("utf-8"))
            offset += ct_len
    except UnicodeDecodeError:
        raise WireError("packed run: a text field is not UTF-8") from None
    except ValueError:
        raise WireError(f"packed run: not a dqid message id: {_quoted(raw_id)}") from None
    if count == 0 or count - 1 > MAX_SEQ - first.seq:
        raise WireError(f"packed run: {count} seqs from {first.seq} are not seqs")
    bodies_at = offset + 4 * count
    if bodies_at > end:
        raise WireError("packed run: truncated lengths")
    lengths = array(_LENGTH_CODE, data[offset:bodies_at])
    if _SWAP:  # pragma: no cover - big-endian hosts
        lengths.byteswap()
    if sum(lengths) != end - bodies_at:
        raise WireError("packed run: the lengths do not add up to the bodies")
    starts = array(_LENGTH_CODE, accumulate(lengths, initial=bodies_at))
    places = array(_LENGTH_CODE, bytes(8 * count))
    places[0::2] = starts[:-1]
    places[1::2] = starts[1:]
    prefix = id_prefix(first.node, first.epoch)
    return Run(prefix, first.epoch, first.seq, data, places, content_type, packed=True)


# -- state updates --------------------------------------------------------------


def encode_states(messages: Iterable[MessageLike]) -> bytes:
    """What changed of messages a replica holds: deliveries, held, due."""
    parts: list[bytes] = []
    for message in messages:
        raw_id = message.id.encode("ascii")
        parts.append(_STATE.pack(len(raw_id), message.deliveries,
                                 _HELD if message.held else 0, message.due or 0.0))
        parts.append(raw_id)
    return b"".join(parts)


def decode_states(data: bytes) -> list[tuple[MessageId, str, int, bool, float | None]]:
    """``(mid, id, deliveries, held, due)`` per update; else WireError."""
    if type(data) is not bytes:
        data = bytes(memoryview(data))
    states = []
    offset, end, size = 0, len(data), _STATE.size
    while offset < end:
        if offset + size > end:
            raise WireError(f"state at byte {offset}: truncated")
        id_len, deliveries, flags, due = _STATE.unpack_from(data, offset)
        stop = offset + size + id_len
        if stop > end or flags & ~_HELD or not _due_ok(due):
            raise WireError(f"state at byte {offset}: truncated or bad flags or due")
        try:
            message_id = data[offset + size:stop].decode("ascii")
        except UnicodeDecodeError:
            raise WireError(f"state at byte {offset}: the id is not ASCII") from None
        states.append((checked_message_id(message_id), message_id, deliveries, bool(flags),
                       due or None))
        offset = stop
    return states


# -- tombstones ---------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise WireError(f"{name} is not a tombstone value")


# Made once: json.dumps and json.loads with options build a new coder per call.
_COMPACT = json.JSONEncoder(separators=(",", ":"))
_STRICT = json.JSONDecoder(parse_constant=_reject_constant)


def _strict_json(data: bytes) -> Any:
    """``data`` (UTF-8 JSON, no NaN or Infinity) parsed; ValueError or
    RecursionError if it is not that."""
    return _STRICT.decode(str(data, "utf-8"))


def encode_tombstones(tombstones: Tombstones) -> bytes:
    return _COMPACT.encode(tombstones.as_dict()).encode("utf-8")


def decode_tombstones(data: bytes) -> Tombstones:
    """Tombstones from the JSON ``{owner: {epoch: [[start, end], ...]}}``; else WireError.

    Owners are node ids; epochs are decimal keys in 0 ... MAX_EPOCH; each
    range is two ints with 0 <= start <= MAX_SEQ and start < end <= MAX_RANGE_END.
    """
    if not data:
        return Tombstones()
    try:
        document = _strict_json(data)
    except WireError:
        raise
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, depth
        raise WireError("tombstones are not JSON") from None
    if type(document) is not dict:
        raise WireError("tombstones are not a JSON object")
    tombstones = Tombstones()
    add_range = tombstones.add_range
    for owner, epochs in document.items():
        if not is_valid_node_id(owner):
            raise WireError(f"tombstone owner is not a node id: {_quoted(owner)}")
        if type(epochs) is not dict:
            raise WireError(f"tombstones of {owner!r} are not a JSON object")
        for epoch_text, ranges in epochs.items():
            epoch = _epoch_key(owner, epoch_text)
            if type(ranges) is not list:
                raise WireError(f"tombstones of {owner!r} epoch {epoch} are not a list")
            for pair in ranges:
                if (type(pair) is not list or len(pair) != 2
                        or type(pair[0]) is not int or type(pair[1]) is not int):
                    raise WireError(
                        f"tombstone range of {owner!r} epoch {epoch} is not"
                        f" [start, end]: {_quoted(pair)}")
                start, end = pair
                if not (0 <= start <= MAX_SEQ and start < end <= MAX_RANGE_END):
                    raise WireError(
                        f"tombstone range of {owner!r} epoch {epoch} out of bounds:"
                        f" {_quoted(pair)}")
                add_range(owner, epoch, start, end)
    return tombstones


def _epoch_key(owner: str, text: str) -> int:
    if _DECIMAL_RE.match(text) is None or int(text) > MAX_EPOCH:
        raise WireError(f"tombstone epoch of {owner!r} is not an epoch: {_quoted(text)}")
    return int(text)


# -- known epochs -------------------------------------------------------------


def encode_epochs(epochs: Mapping[str, int]) -> bytes:
    """``{node: epoch}`` as JSON (``SyncStart``'s ``epochs``)."""
    return _COMPACT.encode(dict(epochs)).encode("utf-8")


def decode_epochs(data: bytes) -> dict[str, int]:
    """``{node: epoch}`` from JSON: node ids to ints in 0 ... MAX_EPOCH; else WireError."""
    try:
        document = _strict_json(data)
    except WireError:
        raise
    except (ValueError, RecursionError):
        raise WireError("epochs are not JSON") from None
    if type(document) is not dict:
        raise WireError("epochs are not a JSON object")
    for node, epoch in document.items():
        if not is_valid_node_id(node):
            raise WireError(f"epochs: not a node id: {_quoted(node)}")
        if type(epoch) is not int or not 0 <= epoch <= MAX_EPOCH:
            raise WireError(f"epochs: not an epoch for {node!r}: {_quoted(epoch)}")
    return document


# -- chunks and single values -------------------------------------------------


def join_chunks(strings: Mapping[bytes, bytes], name: bytes) -> bytes:
    """Undo :class:`dqid.amp_commands.Chunked`: ``name`` holds the chunk count,
    ``name.1`` ... ``name.N`` the chunks, each at most one AMP value.

    The count must be a plain decimal of at least 1, and no more than the
    box holds keys, so a forged count costs nothing.
    """
    raw_count = strings.get(name)
    if raw_count is None:
        raise WireError(f"{_quoted(name)}: chunk count missing")
    if type(raw_count) is not bytes or _COUNT_RE.match(raw_count) is None:
        raise WireError(f"{_quoted(name)}: chunk count is not a count: {_quoted(raw_count)}")
    count = int(raw_count)
    if count > len(strings):
        raise WireError(f"{_quoted(name)}: {count} chunks announced, fewer sent")
    chunks = []
    for index in range(1, count + 1):
        chunk = strings.get(b"%s.%d" % (name, index))
        if chunk is None:
            raise WireError(f"{_quoted(name)}: chunk {index} of {count} missing")
        if len(chunk) > MAX_CHUNK_BYTES:
            raise WireError(f"{_quoted(name)}: chunk {index} longer than one AMP value")
        chunks.append(chunk)
    return b"".join(chunks)


def checked_epoch(value: object) -> int:
    """An epoch a peer sent (``Hello``, a record's id): an int in 0 ... MAX_EPOCH."""
    if type(value) is not int or not 0 <= value <= MAX_EPOCH:
        raise WireError(f"not an epoch: {_quoted(value)}")
    return value


def checked_node_id(value: object) -> str:
    """A node id a peer sent: 1-64 of ``A-Z a-z 0-9 _ -``."""
    if type(value) is not str or not is_valid_node_id(value):
        raise WireError(f"not a node id: {_quoted(value)}")
    return value


def checked_message_id(value: object) -> MessageId:
    """A message id a peer sent, parsed: one dqid could mint."""
    if type(value) is not str:
        raise WireError(f"not a dqid message id: {_quoted(value)}")
    try:
        return parse_id(value)
    except ValueError:
        raise WireError(f"not a dqid message id: {_quoted(value)}") from None


def checked_seconds(value: object, low: float, high: float) -> float:
    """A duration a peer sent (``amp.Float`` parses "nan" and "inf"): finite, in [low, high]."""
    if type(value) is not float and type(value) is not int:
        raise WireError(f"not a number of seconds: {_quoted(value)}")
    if not low <= value <= high:  # False for NaN
        raise WireError(f"seconds not in {low}...{high}: {_quoted(value)}")
    return float(value)


def checked_count(value: object, limit: int) -> int:
    """A count or length a peer sent: an int in 0 ... ``limit``."""
    if type(value) is not int or not 0 <= value <= limit:
        raise WireError(f"not a count in 0...{limit}: {_quoted(value)}")
    return value

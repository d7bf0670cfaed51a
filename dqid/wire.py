"""Byte encodings of records and tombstones for the AMP commands.

Records are length-prefixed binary (bodies are any bytes); tombstones are
JSON of ``Tombstones.as_dict()``.  Both may be far larger than one AMP value;
:class:`dqid.amp_commands.Chunked` splits them on the wire.
"""

from __future__ import annotations

import json
import struct
from sys import intern
from typing import Iterable

from .ids import parse_id
from .replica import MessageLike, Record
from .tombstones import Tombstones

_HEADER = struct.Struct(">HHHII")
_NONE = 0xFFFF


def _text(value: str | None) -> tuple[int, bytes]:
    if value is None:
        return _NONE, b""
    raw = value.encode("utf-8")
    if len(raw) >= _NONE:
        raise ValueError("string field too long")
    return len(raw), raw


def encode_records(messages: Iterable[MessageLike]) -> bytes:
    parts: list[bytes] = []
    for message in messages:
        raw_id = message.id.encode("ascii")
        ct_len, ct = _text(message.content_type)
        key_len, key = _text(message.key)
        parts.append(
            _HEADER.pack(len(raw_id), ct_len, key_len, message.deliveries, len(message.body))
        )
        parts += (raw_id, ct, key, message.body)
    return b"".join(parts)


def decode_records(data: bytes) -> list[Record]:
    records: list[Record] = []
    append = records.append
    unpack = _HEADER.unpack_from
    size = _HEADER.size
    end = len(data)
    offset = 0
    while offset < end:
        stop = offset + size
        if stop > end:
            raise ValueError("truncated record header")
        id_len, ct_len, key_len, deliveries, body_len = unpack(data, offset)
        if id_len == _NONE:
            raise ValueError("record without an id")
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
            raise ValueError("truncated record")
        mid = parse_id(message_id)  # ValueError for an id dqid could not mint
        append(Record(message_id, data[offset:stop], content_type, key, deliveries, mid))
        offset = stop
    return records


def encode_tombstones(tombstones: Tombstones) -> bytes:
    return json.dumps(tombstones.as_dict(), separators=(",", ":")).encode("utf-8")


def decode_tombstones(data: bytes) -> Tombstones:
    if not data:
        return Tombstones()
    return Tombstones.from_dict(json.loads(data))

"""Byte encodings of records and tombstones for the AMP commands.

Records are length-prefixed binary (bodies are any bytes); tombstones are
JSON of ``Tombstones.as_dict()``.  Both may be far larger than one AMP value;
:class:`dqid.amp_commands.Chunked` splits them on the wire.
"""

from __future__ import annotations

import json
import struct
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
    records = []
    view = memoryview(data)
    offset = 0
    size = _HEADER.size
    while offset < len(data):
        if offset + size > len(data):
            raise ValueError("truncated record header")
        id_len, ct_len, key_len, deliveries, body_len = _HEADER.unpack_from(data, offset)
        offset += size
        fields = []
        for length in (id_len, ct_len, key_len):
            if length == _NONE:
                fields.append(None)
                continue
            if offset + length > len(data):
                raise ValueError("truncated record")
            fields.append(bytes(view[offset:offset + length]).decode("utf-8"))
            offset += length
        body = bytes(view[offset:offset + body_len])
        offset += body_len
        if len(body) != body_len or fields[0] is None:
            raise ValueError("truncated record")
        mid = parse_id(fields[0])  # ValueError for an id dqid could not mint
        records.append(Record(fields[0], body, fields[1], fields[2], deliveries, mid))
    return records


def encode_tombstones(tombstones: Tombstones) -> bytes:
    return json.dumps(tombstones.as_dict(), separators=(",", ":")).encode("utf-8")


def decode_tombstones(data: bytes) -> Tombstones:
    if not data:
        return Tombstones()
    return Tombstones.from_dict(json.loads(data))

"""AMP's box framing, read and written a buffer at a time.

A box is key/value pairs, each string a 2-byte big-endian length and its
bytes (a key 1 to 255 bytes, a value up to 65,535), ended by a zero
length.  Twisted's ``BinaryBoxProtocol`` reads a box one string at a time
through a state machine (a slice and two method calls per string); a box of
the replication stream is a dozen strings, and a peer receives several per
message.  :class:`BoxReader` reads every whole string of a buffer in one
loop, and :func:`frame_box` writes a box as one ``bytes``.  The bytes are
AMP's, unchanged: a peer using Twisted's own framing reads and writes the
same boxes.

Pure: no reactor, no Twisted.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

MAX_KEY_LENGTH = 255  # as AMP: a longer key closes the connection
MAX_VALUE_LENGTH = 65535  # as AMP: what two bytes of length can say

_length = struct.Struct(">H").pack
_END_OF_BOX = b"\x00\x00"


class FramingError(ValueError):
    """A key or value that AMP's framing cannot carry."""


def frame_box(box: Mapping[bytes, bytes]) -> bytes:
    """``box`` framed as AMP frames it (keys in sorted order, as
    ``AmpBox.serialize`` writes them)."""
    parts: list[bytes] = []
    for key, value in sorted(box.items()):
        if not 0 < len(key) <= MAX_KEY_LENGTH:
            raise FramingError(f"a key of {len(key)} bytes: {key[:40]!r}")
        if len(value) > MAX_VALUE_LENGTH:
            raise FramingError(f"a value of {len(value)} bytes under {key!r}")
        parts += (_length(len(key)), key, _length(len(value)), value)
    parts.append(_END_OF_BOX)
    return b"".join(parts)


class BoxReader:
    """The boxes in a byte stream, fed in any pieces.

    :meth:`feed` returns the boxes a piece completes; ``feed(b"")`` reads
    on in what is already here.  A key longer than AMP allows stops the
    reading for good (``key_too_long``): the connection is to be closed, as
    AMP closes it.  So does a box longer than ``box_limit`` bytes, when
    there is one (``box_too_long``): what the other side sends before it
    has proven anything is kept small.  While there is a limit, a feed
    returns one box at most, so that the limit read for the next box is
    the one its predecessor left.
    """

    def __init__(self, box_limit: int | None = None) -> None:
        self.box_limit = box_limit  # bytes a box may take; None: any
        self.key_too_long = False
        self.box_too_long = False
        self.stopped = False  # by stop(): nothing more is read
        self._pending = b""  # the start of a string not yet whole
        self._box: dict[bytes, bytes] = {}  # the box being read
        self._box_bytes = 0  # what it took so far, prefixes included
        self._key: bytes | None = None  # its key awaiting a value

    def stop(self) -> None:
        """Read nothing more (the connection is being closed)."""
        self.stopped = True
        self._pending = b""

    def feed(self, data: bytes) -> list[dict[bytes, bytes]]:
        if self.key_too_long or self.box_too_long or self.stopped:
            return []
        buffer = self._pending + data if self._pending else data
        size = len(buffer)
        limit = self.box_limit
        position = 0
        boxes: list[dict[bytes, bytes]] = []
        box, key, box_start = self._box, self._key, -self._box_bytes
        while position + 2 <= size:
            start = position + 2
            end = start + (buffer[position] << 8 | buffer[position + 1])
            if limit is not None and end - box_start > limit:
                self.box_too_long = True
                break
            if key is None:
                if end == start:  # a zero length: the end of the box
                    boxes.append(box)
                    box = {}
                    position = box_start = start
                    if limit is not None:  # one at a time: a box may lift the limit
                        break
                    continue
                if end - start > MAX_KEY_LENGTH:
                    self.key_too_long = True
                    break
                if end > size:
                    break
                key = buffer[start:end]
            else:
                if end > size:
                    break
                box[key] = buffer[start:end]
                key = None
            position = end
        self._pending = buffer[position:]
        self._box, self._key, self._box_bytes = box, key, position - box_start
        return boxes

"""Properties of :mod:`dqid.amp_framing`: the peer protocol's own reading
and writing of AMP boxes must be AMP's, byte for byte.

Twisted's ``AmpBox.serialize`` and ``BinaryBoxProtocol`` are the reference:
a box framed here is the bytes Twisted writes, and any bytes, cut anywhere,
read as the boxes Twisted reads, up to where Twisted closes the connection
for a key that is too long.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport
from twisted.protocols import amp

from dqid.amp_framing import MAX_KEY_LENGTH, MAX_VALUE_LENGTH, BoxReader, FramingError, frame_box

keys = st.binary(min_size=1, max_size=MAX_KEY_LENGTH)
values = st.one_of(st.binary(max_size=300), st.just(b"v" * MAX_VALUE_LENGTH))
boxes = st.dictionaries(keys, values, max_size=8)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """``data`` in pieces at ``points`` (any, in any order)."""
    edges = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in zip(edges, edges[1:])] or [b""]


def read(pieces: list[bytes]) -> tuple[list[dict], bool]:
    reader = BoxReader()
    found: list[dict] = []
    for piece in pieces:
        found += reader.feed(piece)
    return found, reader.key_too_long


class TwistedReader(amp.BinaryBoxProtocol):
    """Twisted's own framing, collecting the boxes it reads."""

    def __init__(self) -> None:
        self.boxes: list[dict] = []
        super().__init__(self)

    def startReceivingBoxes(self, sender: object) -> None:
        pass

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        self.boxes.append(dict(box))


def twisted_read(pieces: list[bytes]) -> tuple[list[dict], bool]:
    protocol = TwistedReader()
    transport = StringTransport()
    protocol.makeConnection(transport)
    for piece in pieces:
        if transport.disconnecting:  # the connection is closing: no more
            break
        protocol.dataReceived(piece)
    return protocol.boxes, transport.disconnecting


@settings(max_examples=300)
@given(boxes)
def test_a_box_is_framed_as_twisted_frames_it(box: dict) -> None:
    assert frame_box(box) == amp.AmpBox(box).serialize()


@settings(max_examples=300)
@given(st.lists(boxes, max_size=5), st.lists(st.integers(0, 10**6), max_size=12))
def test_boxes_cut_anywhere_are_read_whole_and_in_order(sent: list[dict], points: list[int]) -> None:
    data = b"".join(frame_box(box) for box in sent)
    assert read(cut(data, points)) == (sent, False)


@settings(max_examples=500)
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=6))
def test_any_bytes_read_as_twisted_reads_them(data: bytes, points: list[int]) -> None:
    """Garbage included: the same boxes until the same decision to close."""
    pieces = cut(data, points)
    assert read(pieces) == twisted_read(pieces)


@settings(max_examples=200)
@given(st.lists(boxes, max_size=3), st.integers(MAX_KEY_LENGTH + 1, 0xFFFF), st.binary(max_size=50))
def test_a_key_too_long_stops_the_reading(before: list[dict], length: int, after: bytes) -> None:
    """The boxes before it are read; nothing after it, ever."""
    reader = BoxReader()
    data = b"".join(frame_box(box) for box in before) + length.to_bytes(2, "big") + after
    assert reader.feed(data) == before
    assert reader.key_too_long
    assert reader.feed(frame_box({b"k": b"v"})) == []
    assert twisted_read([data]) == (before, True)


def test_a_key_of_the_longest_length_is_read() -> None:
    box = {b"k" * MAX_KEY_LENGTH: b"v" * MAX_VALUE_LENGTH}
    assert read([frame_box(box)]) == ([box], False)


def test_an_empty_box_is_read_as_one() -> None:
    """(AMP refuses it when it dispatches it, not when it reads it.)"""
    assert read([b"\x00\x00\x00\x00"]) == ([{}, {}], False)


@pytest.mark.parametrize("box", [
    {b"": b"v"},
    {b"k" * (MAX_KEY_LENGTH + 1): b"v"},
    {b"k": b"v" * (MAX_VALUE_LENGTH + 1)},
])
def test_what_amp_cannot_frame_is_refused(box: dict) -> None:
    with pytest.raises(FramingError):
        frame_box(box)

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


def read_all(reader: BoxReader, piece: bytes) -> list[dict]:
    """What ``piece`` completes, read on until nothing more is whole."""
    found = reader.feed(piece)
    while more := reader.feed(b""):
        found += more
    return found


def read(pieces: list[bytes]) -> tuple[list[dict], bool]:
    reader = BoxReader()
    found: list[dict] = []
    for piece in pieces:
        found += read_all(reader, piece)
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


@settings(max_examples=300)
@given(st.lists(boxes, max_size=5), st.integers(2, 2000),
       st.lists(st.integers(0, 10**6), max_size=12))
def test_boxes_over_the_limit_stop_the_reading(sent: list[dict], limit: int,
                                               points: list[int]) -> None:
    """With ``box_limit``: every box up to the first longer than the limit
    is read, cut anywhere; that one and everything after it are not."""
    data = b"".join(frame_box(box) for box in sent)
    reader = BoxReader(box_limit=limit)
    found: list[dict] = []
    for piece in cut(data, points):
        got = reader.feed(piece)
        assert len(got) <= 1  # one at a time while limited
        found += got + read_all(reader, b"")
    sizes = [len(frame_box(box)) for box in sent]
    whole = next((i for i, size in enumerate(sizes) if size > limit), len(sent))
    assert found == sent[:whole]
    assert reader.box_too_long == (whole < len(sent))


@pytest.mark.parametrize("spare, read_whole", [(0, True), (-1, False)])
def test_a_box_of_exactly_the_limit_is_read(spare: int, read_whole: bool) -> None:
    box = {b"_command": b"AuthProve", b"proof": b"p" * 32}
    framed = frame_box(box)
    reader = BoxReader(box_limit=len(framed) + spare)
    assert read_all(reader, framed + framed) == ([box, box] if read_whole else [])
    assert reader.box_too_long != read_whole


def test_a_long_value_is_refused_before_it_arrives() -> None:
    """The declared length is enough: nothing of the value is kept."""
    reader = BoxReader(box_limit=4096)
    assert reader.feed(b"\x00\x01k\xff\xff") == []
    assert reader.box_too_long
    assert reader.feed(b"v" * 65535 + frame_box({b"k": b"v"})) == []


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


def test_nothing_is_read_after_stop() -> None:
    box = {b"k": b"v"}
    reader = BoxReader(box_limit=100)
    assert reader.feed(frame_box(box) * 3) == [box]
    reader.stop()
    assert reader.feed(b"") == [] and reader.feed(frame_box(box)) == []

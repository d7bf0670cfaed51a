"""Byte mutations of valid encodings, for the fuzz tests (hypothesis)."""

from __future__ import annotations

from hypothesis import strategies as st


@st.composite
def mutated(draw, valid: bytes) -> bytes:
    """``valid`` with 1-4 edits: bit flips, byte sets, inserts, deletes, cuts,
    forged 16/32-bit big values and repeats of a piece."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(
            ["flip", "set", "insert", "delete", "truncate", "forge", "repeat"]))
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and data:
            at %= len(data)
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at % len(data)] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[at:]
        elif kind == "forge":
            width = draw(st.sampled_from([2, 4]))
            value = draw(st.sampled_from([0, 1, 0xFFFF, 0xFFFE, 2**32 - 1, 2**31]))
            data[at:at + width] = (value % 256**width).to_bytes(width, "big")
        elif kind == "repeat" and data:
            piece = data[at:at + draw(st.integers(1, 16))]
            data[at:at] = piece
    return bytes(data)

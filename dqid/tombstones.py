"""Tombstones: which message ids are gone for good (acked or withdrawn).

Ids are ``(owner, epoch, seq)``; a node mints seqs 1, 2, 3 ... per epoch and
acks mostly in order, so the seqs gone from one (owner, epoch) are kept as
sorted, disjoint, half-open ranges ``[start, end)``.  Memory follows the
number of gaps (messages still queued between acked ones), not the history.

Tombstones only ever grow: ``merge`` is a union, so it is commutative,
associative and idempotent, and a tombstone once written is never lost.
"""

from __future__ import annotations

import bisect
from typing import Iterable, Iterator


class RangeSet:
    """A set of non-negative ints stored as sorted disjoint ``[start, end)``."""

    __slots__ = ("_starts", "_ends")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in ranges:
            self.add_range(start, end)

    def __contains__(self, value: int) -> bool:
        index = bisect.bisect_right(self._starts, value) - 1
        return index >= 0 and value < self._ends[index]

    def __len__(self) -> int:
        """How many values the set holds."""
        return sum(e - s for s, e in zip(self._starts, self._ends))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeSet) and self.ranges() == other.ranges()

    def __repr__(self) -> str:
        return f"RangeSet({self.ranges()!r})"

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends))

    def ranges_within(self, start: int, end: int) -> list[tuple[int, int]]:
        """The set's ranges cut to ``[start, end)`` (those that overlap it)."""
        starts, ends = self._starts, self._ends
        low = bisect.bisect_right(ends, start)
        high = bisect.bisect_left(starts, end)
        return [(max(s, start), min(e, end))
                for s, e in zip(starts[low:high], ends[low:high])]

    def gaps_within(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of ``[start, end)`` the set does not hold."""
        gaps = []
        for low, high in self.ranges_within(start, end):
            if start < low:
                gaps.append((start, low))
            start = high
        if start < end:
            gaps.append((start, end))
        return gaps

    def range_count(self) -> int:
        return len(self._starts)

    def add(self, value: int) -> bool:
        """Add one value; True if it is new.  (Acks come about in order:
        mostly this grows the range just below.)"""
        starts, ends = self._starts, self._ends
        at = bisect.bisect_right(starts, value) - 1  # the range starting at or below
        if at >= 0 and value < ends[at]:
            return False
        joins_next = at + 1 < len(starts) and starts[at + 1] == value + 1
        if at >= 0 and ends[at] == value:
            if joins_next:  # fills the gap between two ranges
                ends[at] = ends[at + 1]
                del starts[at + 1], ends[at + 1]
            else:
                ends[at] = value + 1
        elif joins_next:
            starts[at + 1] = value
        else:
            starts.insert(at + 1, value)
            ends.insert(at + 1, value + 1)
        return True

    def add_range(self, start: int, end: int) -> None:
        if end <= start:
            return
        starts, ends = self._starts, self._ends
        # Ranges that touch or overlap [start, end) merge into one.
        low = bisect.bisect_left(ends, start)
        high = bisect.bisect_right(starts, end)
        if low < high:
            start = min(start, starts[low])
            end = max(end, ends[high - 1])
        starts[low:high] = [start]
        ends[low:high] = [end]

    def update(self, other: "RangeSet") -> None:
        for start, end in other.ranges():
            self.add_range(start, end)

    def copy(self) -> "RangeSet":
        new = RangeSet()
        new._starts = list(self._starts)
        new._ends = list(self._ends)
        return new


class Tombstones:
    """Per owner and epoch, the seqs that are gone.

    (The same structure also summarises which ids a node has seen, for an
    anti-entropy pull: ``Holdings.seen``.)"""

    def __init__(self) -> None:
        self._sets: dict[tuple[str, int], RangeSet] = {}

    def __contains__(self, key: tuple[str, int, int]) -> bool:
        owner, epoch, seq = key
        ranges = self._sets.get((owner, epoch))
        return ranges is not None and seq in ranges

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tombstones) and self.as_dict() == other.as_dict()

    def add(self, owner: str, epoch: int, seq: int) -> bool:
        """Record one; True if it is new."""
        ranges = self._sets.get((owner, epoch))
        if ranges is None:
            ranges = self._sets[(owner, epoch)] = RangeSet()
        return ranges.add(seq)

    def of(self, owner: str, epoch: int) -> RangeSet | None:
        """The seqs gone from ``owner``'s ``epoch`` (None: none known)."""
        return self._sets.get((owner, epoch))

    def add_range(self, owner: str, epoch: int, start: int, end: int) -> None:
        self._sets.setdefault((owner, epoch), RangeSet()).add_range(start, end)

    def merge(self, other: "Tombstones") -> None:
        for key, ranges in other._sets.items():
            self._sets.setdefault(key, RangeSet()).update(ranges)

    def items(self) -> Iterator[tuple[tuple[str, int], RangeSet]]:
        return iter(self._sets.items())

    def for_owner(self, owner: str) -> "Tombstones":
        part = Tombstones()
        for (name, epoch), ranges in self._sets.items():
            if name == owner:
                part._sets[(name, epoch)] = ranges.copy()
        return part

    def range_count(self) -> int:
        """Ranges stored: what memory follows."""
        return sum(r.range_count() for r in self._sets.values())

    def as_dict(self) -> dict[str, dict[int, list[tuple[int, int]]]]:
        """``{owner: {epoch: [[start, end], ...]}}`` (the wire form)."""
        result: dict[str, dict[int, list[tuple[int, int]]]] = {}
        for (owner, epoch), ranges in sorted(self._sets.items()):
            if ranges.range_count():
                result.setdefault(owner, {})[epoch] = ranges.ranges()
        return result

    @classmethod
    def from_dict(cls, data: dict) -> "Tombstones":
        tombstones = cls()
        for owner, epochs in data.items():
            for epoch, ranges in epochs.items():
                for start, end in ranges:
                    tombstones.add_range(str(owner), int(epoch), int(start), int(end))
        return tombstones

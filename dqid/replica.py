"""What a node holds of its peers' queues: records and tombstones.

Pure state.  The store only ever merges: records by union, tombstones by
union, and a tombstone always wins (a tombstoned record is dropped and never
comes back).  So replay, retries, anti-entropy and state transfer are safe
in any order.  The store also remembers the highest epoch seen per owner,
which is how a stale twin of a node id is fenced off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Container, Iterable, Iterator, Protocol

from .ids import MessageId, format_id, parse_id, to_base36
from .tombstones import RangeSet, Tombstones


def matching_ids(held: Container[str] | dict, owner: str, epoch: int,
                 ranges: RangeSet) -> list[str]:
    """The ids in ``held`` (owner's ids) that ``ranges`` of ``epoch`` cover."""
    if len(ranges) <= len(held):
        prefix = format_id(owner, epoch, 0)[:-1]  # "OWNER.EPOCH.", spelt once
        return [
            message_id
            for start, end in ranges.ranges()
            for seq in range(start, end)
            if (message_id := prefix + to_base36(seq)) in held
        ]
    found = []
    for message_id in held:
        mid = parse_id(message_id)
        if mid.epoch == epoch and mid.seq in ranges:
            found.append(message_id)
    return found


class MessageLike(Protocol):
    id: str
    body: bytes
    content_type: str | None
    key: str | None
    deliveries: int
    held: bool  # set aside after --max-deliveries, until kicked
    due: float | None  # delayed until then (wall clock), or None


@dataclass(slots=True, eq=False)
class Record:
    """One message as it travels between nodes and sits in a replica.

    A replica holds many of these, so a record carries no more than it
    must: ``parsed`` is dropped once it is stored (ids parse again on the
    rare reads that need them), and only a record leased from a peer has a
    receipt (:class:`Taken`)."""

    id: str
    body: bytes
    content_type: str | None = None
    key: str | None = None
    deliveries: int = 0
    parsed: MessageId | None = None  # parse_id(id), when the decoder did it
    held: bool = False
    due: float | None = None

    receipt = None  # only a Taken record has one

    @property
    def mid(self) -> MessageId:
        if self.parsed is None:
            self.parsed = parse_id(self.id)
        return self.parsed

    @property
    def owner(self) -> str:
        return self.mid.node


@dataclass(slots=True, eq=False)
class Taken(Record):
    """A record leased from its owner (AMP ``Take``), with the lease's receipt."""

    receipt: str | None = None  # type: ignore[assignment]

    @classmethod
    def lent(cls, record: Record, receipt: str) -> "Taken":
        return cls(record.id, record.body, record.content_type, record.key,
                   record.deliveries, record.parsed, record.held, record.due, receipt)


class ReplicaStore:
    def __init__(self) -> None:
        self._records: dict[str, dict[str, Record]] = {}
        self.tombstones = Tombstones()
        self.epochs: dict[str, int] = {}

    # -- reading -------------------------------------------------------------

    def held(self, owner: str) -> int:
        return len(self._records.get(owner, ()))

    def owners(self) -> list[str]:
        return sorted(self._records)

    def records(self, owner: str | None = None) -> Iterator[Record]:
        if owner is not None:
            return iter(list(self._records.get(owner, {}).values()))
        return iter([r for by_id in self._records.values() for r in by_id.values()])

    def get(self, message_id: str) -> Record | None:
        """The record held under ``message_id`` (None for any other text)."""
        by_id = self._records.get(message_id.partition(".")[0])
        return None if by_id is None else by_id.get(message_id)

    def is_tombstoned(self, message_id: str) -> bool:
        return parse_id(message_id) in self.tombstones

    def live_ids(self) -> set[str]:
        return {i for by_id in self._records.values() for i in by_id}

    # -- merging -------------------------------------------------------------

    def add(self, record: Record) -> bool:
        """Hold ``record`` unless it is tombstoned; True if it is new."""
        mid = record.mid
        # Note the epoch even for a tombstoned record, so what is known does
        # not depend on whether the record or its tombstone came first.
        self.note_epoch(mid.node, mid.epoch)
        if mid in self.tombstones:
            return False
        by_id = self._records.setdefault(mid.node, {})
        if record.id in by_id:
            return False
        by_id[record.id] = record
        record.parsed = None  # memory: a held copy keeps only its id
        return True

    def add_many(self, records: Iterable[Record]) -> list[Record]:
        return [r for r in records if self.add(r)]

    def tombstone(self, message_id: str) -> Record | None:
        """Mark ``message_id`` gone; the record it drops, if held."""
        mid = parse_id(message_id)
        self.tombstones.add(mid.node, mid.epoch, mid.seq)
        return self._drop(mid.node, message_id)

    def merge_tombstones(self, other: Tombstones) -> list[Record]:
        """Union ``other`` in; the records it drops.

        Costs the smaller of the tombstoned seqs and the records held, per
        owner and epoch, so a big sync and a single ack are both cheap.
        """
        self.tombstones.merge(other)
        dropped = []
        for (owner, epoch), ranges in other.items():
            for message_id in matching_ids(self._records.get(owner, {}), owner, epoch, ranges):
                record = self._drop(owner, message_id)
                if record is not None:
                    dropped.append(record)
        return dropped

    def merge(self, other: "ReplicaStore") -> None:
        """Union of two stores (what anti-entropy converges to)."""
        self.merge_tombstones(other.tombstones)
        self.add_many(other.records())
        for owner, epoch in other.epochs.items():
            self.note_epoch(owner, epoch)

    def note_epoch(self, owner: str, epoch: int) -> int:
        """Remember ``epoch`` for ``owner``; the highest known."""
        known = self.epochs.get(owner, 0)
        if epoch > known:
            self.epochs[owner] = known = epoch
        return known

    def take_owner(self, owner: str) -> list[Record]:
        """Remove and return every record of ``owner`` (it is ours now)."""
        return list(self._records.pop(owner, {}).values())

    def _drop(self, owner: str, message_id: str) -> Record | None:
        by_id = self._records.get(owner)
        if not by_id:
            return None
        record = by_id.pop(message_id, None)
        if not by_id:
            del self._records[owner]
        return record

"""What a node holds of its peers' queues: records and tombstones.

Pure state.  The store only ever merges: records by union, tombstones by
union, and a tombstone always wins (a tombstoned record is dropped and never
comes back).  So replay, retries, anti-entropy and state transfer are safe
in any order.  The store also remembers the highest epoch seen per owner,
which is how a stale twin of a node id is fenced off.

Most copies arrive in bulk: a turn's fresh pushes of one owner, with
consecutive seqs.  Such a :class:`Run` is kept as the bytes it arrived in,
and a record of it is only parsed when it is read (a peek, a state change,
a sync, a take-over).  Everything else is a :class:`Record` of its own.
"""

from __future__ import annotations

import bisect
from array import array
from dataclasses import dataclass, field
from itertools import chain
from typing import Container, Iterable, Iterator, Protocol

from .ids import MessageId, consecutive_ids, id_prefix, parse_id, to_base36
from .tombstones import RangeSet, Tombstones


def matching_ids(held: Container[str] | dict, owner: str, epoch: int,
                 ranges: RangeSet) -> list[str]:
    """The ids in ``held`` (owner's ids) that ``ranges`` of ``epoch`` cover."""
    if len(ranges) <= len(held):
        prefix = id_prefix(owner, epoch)
        return [
            message_id
            for start, end in ranges.ranges()
            for message_id in consecutive_ids(prefix, start, end - start)
            if message_id in held
        ]
    found = []
    for message_id in held:
        mid = parse_id(message_id)
        if mid.epoch == epoch and mid.seq in ranges:
            found.append(message_id)
    return found


def tombstones_of(message_ids: Iterable[str]) -> Tombstones:
    """The tombstones of ``message_ids`` (ids a node minted or holds, so
    valid), a batch of acks at a time: the ids of one owner and epoch
    share a prefix, and their seqs mostly follow each other."""
    seqs: dict[str, list[int]] = {}
    for message_id in message_ids:
        prefix, _, seq = message_id.rpartition(".")
        seqs.setdefault(prefix, []).append(int(seq, 36))
    tombstones = Tombstones()
    for prefix, found in seqs.items():
        owner, epoch, _ = parse_id(prefix + ".0")
        found.sort()
        start = end = found[0]
        for seq in found:
            if seq > end:
                tombstones.add_range(owner, epoch, start, end)
                start = seq
            end = seq + 1
        tombstones.add_range(owner, epoch, start, end)
    return tombstones


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


# The state of a copy as it came in a run: no deliveries, not held, not delayed.
FRESH: tuple[int, bool, float | None] = (0, False, None)


@dataclass(slots=True, eq=False)
class Run:
    """Records of one owner, fresh when they came (no deliveries, not held,
    not delayed, no idempotency key, one content type), with the
    consecutive seqs ``first, first + 1, ...`` of one epoch, kept as the
    bytes they arrived in.  ``bodies`` holds each record's body as a start
    and an end offset in ``data``; the ids are ``prefix`` + the seq in base
    36.  ``gone`` has a byte per record, 1 once it is no longer held here
    (tombstoned, or taken out as a Record); ``states`` keeps what the owner
    said since."""

    prefix: str  # "OWNER.EPOCH."
    epoch: int
    first: int
    data: bytes
    bodies: array  # 2 per record: body start, body end
    content_type: str | None
    # What the owner said since of some (deliveries, held, due), by seq.
    states: dict[int, tuple[int, bool, float | None]] | None = None
    # How ``data`` is laid out: a packed run (wire.encode_run), else records
    # (wire.encode_records) as a protocol 3 peer sends them.
    packed: bool = False
    end: int = field(init=False)  # the seq after the last
    gone: bytearray = field(init=False)
    live: int = field(init=False)  # records still held here

    def __post_init__(self) -> None:
        self.live = len(self.bodies) // 2
        self.end = self.first + self.live
        self.gone = bytearray(self.live)

    @property
    def owner(self) -> str:
        return self.prefix.partition(".")[0]

    def __len__(self) -> int:
        return self.end - self.first

    def drop(self, start: int, end: int) -> int:
        """Let go of the seqs in ``[start, end)``; how many were held."""
        first = self.first
        low, high = max(start, first) - first, min(end, self.end) - first
        if low >= high:
            return 0
        gone = self.gone
        if high - low == 1:
            if gone[low]:
                return 0
            gone[low] = 1
            dropped = 1
        else:
            dropped = gone.count(0, low, high)
            gone[low:high] = b"\x01" * (high - low)
        self.live -= dropped
        states = self.states
        if states and dropped:
            for seq in (range(first + low, first + high) if high - low < len(states)
                        else list(states)):
                if low <= seq - first < high:
                    states.pop(seq, None)
        return dropped

    def set_state(self, seq: int, deliveries: int, held: bool, due: float | None) -> bool:
        """What the owner says of ``seq`` now; False if that is what is
        held already.  A fresh state is the run's own: never kept (an
        anti-entropy sync says it of every copy)."""
        state = (deliveries, held, due)
        states = self.states
        known = FRESH if states is None else states.get(seq, FRESH)
        if state == known:
            return False
        if state == FRESH:
            del states[seq]  # type: ignore[union-attr]  # (known was not FRESH)
        else:
            if states is None:
                states = self.states = {}
            states[seq] = state
        return True

    def record(self, seq: int) -> Record:
        """The record of ``seq`` (one the run holds), parsed."""
        index = 2 * (seq - self.first)
        body = self.data[self.bodies[index]:self.bodies[index + 1]]
        record = Record(self.prefix + to_base36(seq), body, self.content_type)
        if self.states is not None and seq in self.states:
            record.deliveries, record.held, record.due = self.states[seq]
        return record

    def live_seqs(self) -> list[int]:
        first = self.first
        return [first + index for index, gone in enumerate(self.gone) if not gone]

    def records(self) -> list[Record]:
        return list(self.iter_records(self.gone))

    def iter_records(self, gone: bytes | bytearray,
                     spans: list[tuple[int, int]] | None = None) -> Iterator[Record]:
        """The records held when ``gone`` was copied from :attr:`gone`
        (those with seqs in ``spans``, if given), each parsed as it is
        reached (the run keeps their bytes even after they go)."""
        first = self.first
        for start, end in [(first, first + len(gone))] if spans is None else spans:
            for index in range(start - first, end - first):
                if not gone[index]:
                    yield self.record(first + index)


class OwnerRuns:
    """One owner's runs: disjoint, sorted by epoch and first seq."""

    __slots__ = ("_keys", "_runs", "_last")

    def __init__(self) -> None:
        self._keys: list[tuple[int, int]] = []  # (epoch, first) of each run
        self._runs: list[Run] = []
        self._last: Run | None = None  # the run found last: acks come in order

    def __iter__(self) -> Iterator[Run]:
        return iter(list(self._runs))

    def __len__(self) -> int:
        return len(self._runs)

    def find(self, epoch: int, seq: int) -> Run | None:
        """The run whose seqs span ``seq`` of ``epoch`` (held or not)."""
        run = self._last
        if run is not None and run.epoch == epoch and run.first <= seq < run.end:
            return run
        at = bisect.bisect_right(self._keys, (epoch, seq)) - 1
        if at >= 0:
            run = self._runs[at]
            if run.epoch == epoch and seq < run.end:
                self._last = run
                return run
        return None

    def within(self, epoch: int, start: int, end: int) -> list[Run]:
        """The runs with seqs in ``[start, end)`` of ``epoch``."""
        keys, runs = self._keys, self._runs
        at = max(bisect.bisect_right(keys, (epoch, start)) - 1, 0)
        found = []
        while at < len(runs) and keys[at] < (epoch, end):
            run = runs[at]
            if run.epoch == epoch and run.end > start:
                found.append(run)
            at += 1
        return found

    def add(self, run: Run) -> bool:
        """Keep ``run``, unless its seqs overlap a run's (False)."""
        key = (run.epoch, run.first)
        at = bisect.bisect_left(self._keys, key)
        runs = self._runs
        if ((at > 0 and runs[at - 1].epoch == run.epoch and runs[at - 1].end > run.first)
                or (at < len(runs) and runs[at].epoch == run.epoch
                    and runs[at].first < run.end)):
            return False
        self._keys.insert(at, key)
        runs.insert(at, run)
        return True

    def remove(self, run: Run) -> None:
        """Stop keeping ``run``; ValueError if it is not kept."""
        at = self._runs.index(run)
        del self._keys[at], self._runs[at]
        if self._last is run:
            self._last = None


class ReplicaStore:
    def __init__(self) -> None:
        self._records: dict[str, dict[str, Record]] = {}
        self._runs: dict[str, OwnerRuns] = {}  # none is empty
        # Runs that went under a quarter live, to unpack (unpack_sparse_runs).
        self._sparse: set[Run] = set()
        self.tombstones = Tombstones()
        self.epochs: dict[str, int] = {}

    # -- reading -------------------------------------------------------------

    def held(self, owner: str) -> int:
        return (len(self._records.get(owner, ()))
                + sum(run.live for run in self._runs.get(owner, ())))

    def owners(self) -> list[str]:
        return sorted({*self._records, *self._runs})

    def records(self, owner: str | None = None) -> Iterator[Record]:
        """The records held (of ``owner``, or of all) when called, even if
        they change or go while the iterator runs (a sync must not miss a
        copy a peek took out of its run meanwhile); those of runs are
        parsed as the iterator reaches them, so a sync's pages never hold
        them all at once."""
        owners = [owner] if owner is not None else list({*self._records, *self._runs})
        held: list[Record] = []
        runs: list[tuple[Run, bytes]] = []
        for name in owners:
            held += self._records.get(name, {}).values()
            runs += [(run, bytes(run.gone)) for run in self._runs.get(name, ())]
        return chain(held, chain.from_iterable(run.iter_records(gone) for run, gone in runs))

    def seen(self) -> Tombstones:
        """The ids held here or known to be gone, per owner and epoch, as
        ranges (for an anti-entropy pull: the peer leaves them out).  A
        run's whole span counts: a seq it no longer holds is tombstoned or
        held as a Record of its own."""
        seen = Tombstones()
        seen.merge(self.tombstones)
        for owner, runs in self._runs.items():
            for run in runs:
                seen.add_range(owner, run.epoch, run.first, run.end)
        for by_id in self._records.values():
            for message_id in by_id:
                seen.add(*parse_id(message_id))
        return seen

    def unseen_records(self, seen: Tombstones) -> tuple[int, Iterator[Record]]:
        """The records held that ``seen`` does not name: how many, and
        them, as :meth:`records` gives them (parsed as they are reached)."""
        held: list[Record] = []
        spans: list[tuple[Run, bytes, list[tuple[int, int]]]] = []
        count = 0
        for owner in list({*self._records, *self._runs}):
            for message_id, record in self._records.get(owner, {}).items():
                if parse_id(message_id) not in seen:
                    held.append(record)
            for run in self._runs.get(owner, ()):
                known = seen.of(owner, run.epoch)
                gaps = ([(run.first, run.end)] if known is None
                        else known.gaps_within(run.first, run.end))
                if gaps:
                    gone = bytes(run.gone)
                    count += sum(gone.count(0, start - run.first, end - run.first)
                                 for start, end in gaps)
                    spans.append((run, gone, gaps))
        count += len(held)
        return count, chain(held, chain.from_iterable(
            run.iter_records(gone, gaps) for run, gone, gaps in spans))

    def get(self, message_id: str) -> Record | None:
        """The record held under ``message_id`` (None for any other text).
        A record of a run is taken out of it to be a Record of its own, so
        what the caller changes in it stays."""
        owner = message_id.partition(".")[0]
        by_id = self._records.get(owner)
        record = None if by_id is None else by_id.get(message_id)
        if record is None and owner in self._runs:
            run, seq = self._run_holding(message_id)
            if run is not None:
                record = run.record(seq)
                self._run_dropped(run, [(seq, seq + 1)])
                self._records.setdefault(owner, {})[message_id] = record
        return record

    def set_state(self, message_id: str, deliveries: int, held: bool,
                  due: float | None) -> bool:
        """What the owner says of a copy held here now; True if that
        changed it (False: no copy here, or it says what is held)."""
        owner = message_id.partition(".")[0]
        by_id = self._records.get(owner)
        record = None if by_id is None else by_id.get(message_id)
        if record is not None:
            if (record.deliveries, record.held, record.due) == (deliveries, held, due):
                return False
            record.deliveries, record.held, record.due = deliveries, held, due
            return True
        if owner in self._runs:
            run, seq = self._run_holding(message_id)
            if run is not None:
                return run.set_state(seq, deliveries, held, due)
        return False

    def holds(self, message_id: str, mid: MessageId | None = None) -> bool:
        """Whether a copy of ``message_id`` (parsed: ``mid``, when the
        caller has it) is held here (makes no Record)."""
        owner = message_id.partition(".")[0]
        by_id = self._records.get(owner)
        if by_id is not None and message_id in by_id:
            return True
        if owner not in self._runs:
            return False
        if mid is None:
            return self._run_holding(message_id)[0] is not None
        return self._run_of(mid) is not None

    def footprint(self) -> tuple[int, int]:
        """How many records are held, and their bodies' bytes (a run's
        share estimated from its live records)."""
        count = body_bytes = 0
        for by_id in self._records.values():
            count += len(by_id)
            body_bytes += sum(len(record.body) for record in by_id.values())
        for runs in self._runs.values():
            for run in runs:
                count += run.live
                bodies = run.bodies
                body_bytes += (sum(bodies[1::2]) - sum(bodies[::2])) * run.live // len(run)
        return count, body_bytes

    def is_tombstoned(self, message_id: str) -> bool:
        return parse_id(message_id) in self.tombstones

    def live_ids(self) -> set[str]:
        ids = {i for by_id in self._records.values() for i in by_id}
        for runs in self._runs.values():
            for run in runs:
                ids.update(run.prefix + to_base36(seq) for seq in run.live_seqs())
        return ids

    # -- merging -------------------------------------------------------------

    def add(self, record: Record) -> bool:
        """Hold ``record`` unless it is tombstoned; True if it is new."""
        mid = record.mid
        # Note the epoch even for a tombstoned record, so what is known does
        # not depend on whether the record or its tombstone came first.
        self.note_epoch(mid.node, mid.epoch)
        if mid in self.tombstones:
            return False
        if mid.node in self._runs and self._run_of(mid) is not None:
            return False
        by_id = self._records.setdefault(mid.node, {})
        if record.id in by_id:
            return False
        by_id[record.id] = record
        record.parsed = None  # memory: a held copy keeps only its id
        return True

    def add_many(self, records: Iterable[Record]) -> list[Record]:
        return [r for r in records if self.add(r)]

    def add_run(self, run: Run) -> int:
        """Hold the records of ``run`` that are neither held nor
        tombstoned; how many that is."""
        owner = run.owner
        self.note_epoch(owner, run.epoch)
        gone = self.tombstones.of(owner, run.epoch)
        if gone is not None:
            for start, end in gone.ranges_within(run.first, run.end):
                run.drop(start, end)
        by_id = self._records.get(owner)
        if by_id:
            within = RangeSet([(run.first, run.end)])
            for message_id in matching_ids(by_id, owner, run.epoch, within):
                seq = parse_id(message_id).seq
                run.drop(seq, seq + 1)
        if not run.live:
            return 0
        if not self._runs.setdefault(owner, OwnerRuns()).add(run):
            # A replay: its records one by one (runs stay disjoint).
            return len(self.add_many(run.records()))
        return run.live

    def tombstone(self, message_id: str) -> str | None:
        """Mark ``message_id`` gone; the idempotency key of the record it
        drops, if it has one."""
        mid = parse_id(message_id)
        self.tombstones.add(mid.node, mid.epoch, mid.seq)
        record = self._drop(mid.node, message_id)
        if record is None and mid.node in self._runs:
            run = self._run_of(mid)
            if run is not None:  # a run's records have no key
                self._run_dropped(run, [(mid.seq, mid.seq + 1)])
        return None if record is None else record.key

    def merge_tombstones(self, other: Tombstones) -> list[str]:
        """Union ``other`` in; the idempotency keys of the records it drops.

        Costs the smaller of the tombstoned seqs and the records held, per
        owner and epoch, and a few range operations per run, so a big sync
        and a single ack are both cheap.
        """
        self.tombstones.merge(other)
        keys = []
        for (owner, epoch), ranges in other.items():
            # Runs first (their records have no keys), then single Records.
            runs = self._runs.get(owner)
            if runs is not None:
                for start, end in ranges.ranges():
                    for run in runs.within(epoch, start, end):
                        self._run_dropped(run, [(start, end)])
            for message_id in matching_ids(self._records.get(owner, {}), owner, epoch, ranges):
                record = self._drop(owner, message_id)
                if record is not None and record.key is not None:
                    keys.append(record.key)
        return keys

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
        taken = list(self._records.pop(owner, {}).values())
        for run in self._runs.pop(owner, ()):
            taken += run.records()
        return taken

    def _run_holding(self, message_id: str) -> tuple[Run | None, int]:
        """The run that holds ``message_id`` (any text), and its seq."""
        try:
            mid = parse_id(message_id)
        except ValueError:
            return None, 0
        return self._run_of(mid), mid.seq

    def _run_of(self, mid: MessageId) -> Run | None:
        """The run that holds ``mid``."""
        runs = self._runs.get(mid.node)
        run = None if runs is None else runs.find(mid.epoch, mid.seq)
        if run is not None and not run.gone[mid.seq - run.first]:
            return run
        return None

    def _run_dropped(self, run: Run, ranges: list[tuple[int, int]]) -> None:
        """Let ``run`` go of the seqs in ``ranges``; an empty run is
        forgotten, one less than a quarter live is noted, to be unpacked
        by :meth:`unpack_sparse_runs` unless it empties first."""
        dropped = 0
        for start, end in ranges:
            dropped += run.drop(start, end)
        if not dropped:
            return
        if not run.live:
            self._forget_run(run)
        elif run.live * 4 < len(run):
            self._sparse.add(run)

    def unpack_sparse_runs(self) -> int:
        """Unpack the runs still held that are less than a quarter live:
        their live records become Records and their bytes are freed, so a
        few long-lived messages never keep much more than their own size.
        (Not at once when acks make a run sparse: while a queue drains, the
        rest of the run is usually acked soon after, and unpacking it first
        would cost more than the memory it frees for that while.)  How many
        records that unpacked."""
        sparse, self._sparse = self._sparse, set()
        unpacked = 0
        for run in sparse:
            if run.live and run.live * 4 < len(run) and self._forget_run(run):
                by_id = self._records.setdefault(run.owner, {})
                for record in run.records():
                    by_id[record.id] = record
                unpacked += run.live
        return unpacked

    def _forget_run(self, run: Run) -> bool:
        """Stop holding ``run`` (its records go with it); False if it was
        not held (taken out already)."""
        owner = run.owner
        runs = self._runs.get(owner)
        if runs is None:
            return False
        try:
            runs.remove(run)
        except ValueError:
            return False
        if not runs:
            del self._runs[owner]
        return True

    def _drop(self, owner: str, message_id: str) -> Record | None:
        by_id = self._records.get(owner)
        if not by_id:
            return None
        record = by_id.pop(message_id, None)
        if not by_id:
            del self._records[owner]
        return record

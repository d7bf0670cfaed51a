"""What a node keeps on disk with ``--data-dir``, and when.

:class:`Durability` gathers what a reactor turn changed (own messages
pushed, copies held for peers, tombstones, delivery counts / held states /
due times, epochs) into one group of journal entries, written and fsynced
off the reactor thread by the :class:`~dqid.disklog.DiskLog` (group
commit).  Callers that must not answer before their change is on disk (a
201, a 204, a ``Copied``) wait on the Deferred they get.  When dead
entries dominate the log, it is compacted to a snapshot of the live state.

:func:`restore` rebuilds a node (and its holdings) from a replayed data
directory at start.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .datadir import DataDir, DataDirError, Replay, should_compact, snapshot_entries
from .disklog import DiskLog
from .idempotency import body_digest
from .ids import MessageId, parse_id
from .journal import (
    DELAYED, HELD, READY, Entry, Epochs, MessageState, epochs_entry, own_records,
    packed_run_entry, replica_records, states_entry, tombstones_entry,
)
from .readiness import Phase
from .replica import MessageLike, Record
from .tombstones import Tombstones

# Compaction is considered at most this often (it reads the whole state).
COMPACT_CHECK_SECONDS = 5.0


def state_of(message: MessageLike) -> MessageState:
    """What a journal STATES entry keeps of a message."""
    if message.held:
        state = HELD
    elif message.due:
        state = DELAYED
    else:
        state = READY
    return MessageState(message.id, message.deliveries, state, message.due or 0.0)


class Durability:
    log = Logger()

    def __init__(self, disk: DiskLog, clock: IReactorTime,
                 live_state: Callable[[], list[Entry]],
                 live_bytes: Callable[[], int],
                 failed: Callable[[str], None]) -> None:
        self.disk = disk
        self.clock = clock
        self.live_state = live_state  # a snapshot of everything held now
        self.live_bytes = live_bytes  # an estimate of that snapshot's size
        self.failed = failed  # the disk failed: the node must stop answering
        self._own: list[MessageLike] = []
        self._replicas: list[MessageLike] = []
        self._replica_bytes: list[bytes] = []
        self._packed_runs: list[bytes] = []
        self._tombstones: Tombstones | None = None
        self._states: dict[str, MessageLike] = {}
        self._epochs: Epochs | None = None
        self._waiters: list[Deferred] = []
        self._flush_due = False
        self._checked = clock.seconds()
        self.broken: str | None = None

    # -- what a turn changed ------------------------------------------------

    def own(self, messages: Iterable[MessageLike]) -> Deferred:
        """This node's new messages (pushes, before they are accepted)."""
        self._own.extend(messages)
        return self._turn()

    def replicas(self, records: Iterable[MessageLike]) -> Deferred:
        """Copies of peers' messages now held here."""
        self._replicas.extend(records)
        return self._turn()

    def replica_run(self, data: bytes, packed: bool) -> Deferred:
        """Copies of peers' messages held here as a run: its bytes as they
        arrived, records or a packed run (a replay skips what is
        tombstoned or held by then)."""
        (self._packed_runs if packed else self._replica_bytes).append(data)
        return self._turn()

    def tombstone(self, mid: MessageId) -> Deferred:
        """One id gone for good (an ack, a withdrawn push)."""
        if self._tombstones is None:
            self._tombstones = Tombstones()
        self._tombstones.add(mid.node, mid.epoch, mid.seq)
        return self._turn()

    def tombstones(self, tombstones: Tombstones) -> Deferred:
        if self._tombstones is None:
            self._tombstones = Tombstones()
        self._tombstones.merge(tombstones)
        return self._turn()

    def states(self, messages: Iterable[MessageLike]) -> None:
        """Deliveries, held states or due times changed (own or copies)."""
        for message in messages:
            self._states[message.id] = message
        self._turn()

    def epochs(self, node: str, epoch: int, known: dict[str, int]) -> Deferred:
        self._epochs = Epochs(node, epoch, dict(known))
        return self._turn()

    # -- the turn's group ------------------------------------------------------

    def _turn(self) -> Deferred:
        waiter: Deferred = Deferred()
        if self.broken is not None:
            waiter.errback(Failure(OSError(self.broken)))
            return waiter
        self._waiters.append(waiter)
        if not self._flush_due:
            self._flush_due = True
            self.clock.callLater(0, self._flush)
        return waiter

    def _flush(self) -> None:
        self._flush_due = False
        entries: list[Entry] = []
        if self._epochs is not None:
            entries.append(epochs_entry(self._epochs))
        if self._own:
            entries.append(own_records(self._own))
        if self._replicas or self._replica_bytes:
            entries.append(replica_records(self._replicas, self._replica_bytes))
        entries += map(packed_run_entry, self._packed_runs)
        if self._tombstones is not None:
            entries.append(tombstones_entry(self._tombstones))
        if self._states:
            entries.append(states_entry(state_of(m) for m in self._states.values()))
        waiters = self._waiters
        self._own, self._replicas, self._states, self._waiters = [], [], {}, []
        self._replica_bytes, self._packed_runs = [], []
        self._tombstones = self._epochs = None
        written = self.disk.write(entries)
        written.addCallbacks(self._written, self._write_failed,
                             callbackArgs=(waiters,), errbackArgs=(waiters,))

    def _written(self, _: object, waiters: list[Deferred]) -> None:
        for waiter in waiters:
            waiter.callback(None)
        self._maybe_compact()

    def _write_failed(self, failure: Failure, waiters: list[Deferred]) -> None:
        if self.broken is None:
            self.broken = f"the data directory failed: {failure.getErrorMessage()}"
            self.log.error("{why}; this node takes no more writes", why=self.broken)
            self.failed(self.broken)
        for waiter in waiters:
            waiter.errback(failure)

    # -- compaction ------------------------------------------------------------------

    def _maybe_compact(self) -> None:
        now = self.clock.seconds()
        if now - self._checked < COMPACT_CHECK_SECONDS or self.disk.compacting:
            return
        self._checked = now
        datadir = self.disk.datadir
        if not should_compact(self.live_bytes(), datadir.log_bytes):
            return
        before = datadir.log_bytes
        d = self.disk.compact(self.live_state())
        d.addCallbacks(
            lambda size: self.log.info("compacted the journal: {before} log bytes into a "
                                       "{size}-byte snapshot", before=before, size=size),
            lambda f: self.log.failure("journal compaction failed", f))


def live_entries(own: Iterable[Any], replicas: Iterable[Any], tombstones: Tombstones,
                 epochs: Epochs | None) -> list[Entry]:
    """The snapshot of a live state: records, their states, tombstones, epochs."""
    own, replicas = list(own), list(replicas)
    states = [state_of(m) for m in (*own, *replicas) if m.deliveries or m.held or m.due]
    return snapshot_entries(own, replicas, tombstones, states, epochs)


def replayed_records(replay: Replay) -> tuple[list[Record], list[Record]]:
    """Own and replica records with their newest states applied; own ones
    in the order they were minted."""
    for records in (replay.own, replay.replicas):
        for message_id, state in replay.states.items():
            record = records.get(message_id)
            if record is not None:
                record.deliveries = state.deliveries
                record.held = state.state == HELD
                record.due = state.due if state.state == DELAYED else None
    own = sorted(replay.own.values(), key=lambda r: parse_id(r.id)[1:])
    return own, list(replay.replicas.values())


class Restorable(Protocol):
    """What :func:`open_data_dir` needs of the node."""

    node_id: str
    epoch: int
    readiness: Any
    queue: Any
    idempotency: Any

    def start_epoch(self, epoch: int) -> None: ...

    def keep_on_disk(self, journal: Any) -> None: ...

    def restore(self, records: Iterable[Record], keep: bool = True) -> None: ...


def open_data_dir(path: str, node: Restorable, holdings: Any | None,
                  reactor: Any) -> DiskLog:
    """Lock and replay ``path``, rebuild ``node`` (and, in a cluster, its
    ``holdings``) from it, and make every later change reach it.  The
    DiskLog, to run as a service.  DataDirLocked, CorruptLog, DataDirError:
    the node must not start (their message is one line)."""
    datadir = DataDir.open(path)
    replay, datadir.replay = datadir.replay, None
    assert replay is not None
    if replay.epochs is not None and replay.epochs.node != node.node_id:
        datadir.close()
        raise DataDirError(f"data directory {datadir.path} belongs to node "
                           f"{replay.epochs.node!r}, not {node.node_id!r}")
    disk = DiskLog(datadir, reactor)
    own, replicas = replayed_records(replay)

    def live_state() -> list[Entry]:
        if holdings is None:
            return live_entries(node.queue.messages(), (), Tombstones(),
                                Epochs(node.node_id, node.epoch, {}))
        store = holdings.store
        return live_entries([*node.queue.messages(), *holdings.recovered.values()],
                            store.records(), store.tombstones,
                            Epochs(node.node_id, node.epoch, dict(store.epochs)))

    def live_bytes() -> int:
        held = [*node.queue.messages()]
        copies = copy_bytes = 0
        if holdings is not None:
            held += holdings.recovered.values()
            copies, copy_bytes = holdings.store.footprint()
        return sum(64 + len(m.body) for m in held) + 64 * copies + copy_bytes

    def failed(why: str) -> None:
        node.readiness.set(Phase.FAILED, why)

    durability = Durability(disk, reactor, live_state, live_bytes, failed)
    known = replay.epochs.epoch if replay.epochs is not None else 0
    if holdings is None:  # standalone: serve at once, in an epoch above every one used
        node.start_epoch(max(known + 1, node.epoch))
        node.keep_on_disk(durability)
        node.restore(own, keep=False)
        durability.epochs(node.node_id, node.epoch, {}).addErrback(lambda f: None)
    else:  # a cluster node: what the disk held, then the usual recovery from peers
        holdings.journal = durability
        node.keep_on_disk(durability)
        if replay.epochs is not None:
            for owner, epoch in replay.epochs.known.items():
                holdings.note_epoch(owner, epoch)
        holdings.note_epoch(node.node_id, known)
        holdings.store.merge_tombstones(replay.tombstones)
        for record in replicas:
            holdings.store.add(record)
            if record.key is not None:
                node.idempotency.remember(record.key, body_digest(record.body), record.id)
        for record in own:
            holdings.recovered[record.id] = record
    if replay.cut_bytes:
        Durability.log.warn("cut a torn tail of {bytes} bytes from {path} (a write the "
                            "crash interrupted: nothing answered was in it)",
                            bytes=replay.cut_bytes, path=datadir.path)
    Durability.log.info("replayed {own} own messages and {replicas} copies from {path}",
                        own=len(own), replicas=len(replicas), path=datadir.path)
    return disk

"""What a cluster node holds and the rules for merging into it.

Holdings owns the replica store (peers' records, tombstones of every owner,
the highest epoch known per owner) and, while the node recovers, the node's
own messages found on peers.  Every way state arrives (a Stream box, a
tombstone batch, a sync page) goes through :meth:`merge_records`,
:meth:`merge_tombstones` or :meth:`merge_epochs`: union, tombstone wins.
"""

from __future__ import annotations

from itertools import chain
from typing import Iterable, Iterator, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from .amp_commands import StaleEpoch
from .idempotency import body_digest
from .ids import MessageId, id_prefix, parse_id
from .queue import PENDING, READY, Message
from .readiness import Readiness
from .replica import Record, ReplicaStore, Run, matching_ids
from .tombstones import Tombstones
from .wire import MAX_SEQ


class OwnQueue(Protocol):
    """What Holdings needs of the node whose replicas it keeps."""

    node_id: str
    epoch: int
    readiness: Readiness

    def restore(self, records: Iterable[Record]) -> None: ...

    def apply_tombstone(self, message_id: str) -> Message: ...

    def accepted_messages(self) -> list[Message]: ...

    @property
    def queue(self): ...  # noqa: ANN201 - a WorkQueue (get, depth, __contains__)

    @property
    def idempotency(self): ...  # noqa: ANN201 - an IdempotencyIndex


class HoldingsJournal(Protocol):
    """What Holdings keeps on disk with ``--data-dir`` (its Durability)."""

    def replicas(self, records: Iterable[Record]) -> Deferred: ...

    def replica_run(self, data: bytes, packed: bool) -> Deferred: ...

    def tombstone(self, mid: MessageId) -> Deferred: ...

    def tombstones(self, tombstones: Tombstones) -> Deferred: ...

    def states(self, messages: Iterable[Record]) -> None: ...

    def epochs(self, node: str, epoch: int, known: dict[str, int]) -> Deferred: ...


class Holdings:
    def __init__(self, node: OwnQueue, clock: IReactorTime) -> None:
        self.node = node
        self.me = node.node_id
        self.clock = clock
        self.store = ReplicaStore()
        # Own messages found on peers while recovering, queued once it ends.
        self.recovered: dict[str, Record] = {}
        self.journal: HoldingsJournal | None = None  # None: nothing on disk

    def held(self, owner: str) -> int:
        return self.store.held(owner)

    def is_tombstoned(self, message_id: str) -> bool:
        return self.store.is_tombstoned(message_id)

    # -- epochs --------------------------------------------------------------

    def note_epoch(self, owner: str, epoch: int) -> None:
        self.store.note_epoch(owner, epoch)

    def known_epoch(self, owner: str) -> int:
        return self.store.epochs.get(owner, 0)

    def check_epoch(self, owner: str, epoch: int) -> None:
        """Refuse ``owner`` at ``epoch`` if a newer epoch of it is known."""
        if epoch and epoch < self.known_epoch(owner):
            raise StaleEpoch(f"{owner} serves with a newer epoch")

    def serve_as(self, epoch: int) -> None:
        """This node serves as ``epoch`` from now on (kept on disk too)."""
        self.store.note_epoch(self.me, epoch)
        if self.journal is not None:
            self.journal.epochs(self.me, epoch, self.store.epochs).addErrback(lambda f: None)

    def merge_epochs(self, epochs: dict[str, int]) -> int | None:
        """Note every epoch; a newer epoch of this node than the one it
        serves with, if there is one (the node must be fenced)."""
        newer = None
        for owner, epoch in epochs.items():
            if (owner == self.me and self.node.readiness.serving
                    and epoch > self.node.epoch):
                newer = epoch
            # Our own too: recovery must pick an epoch above every one seen.
            self.store.note_epoch(owner, int(epoch))
        return newer

    def epochs(self) -> dict[str, int]:
        """Every epoch known, this node's serving one included."""
        epochs = dict(self.store.epochs)
        if self.node.readiness.serving:
            epochs[self.me] = self.node.epoch
        return epochs

    # -- records -------------------------------------------------------------

    def merge_records(self, records: Iterable[Record], source: str | None = None) -> int:
        """Union ``records`` in; how many peers' records were new.  Records
        that ``source`` owns carry its word on their state (deliveries, held,
        due), which replaces what is held here."""
        added, written = self.merge_replicated(records, source)
        if written is not None:
            written.addErrback(lambda f: None)  # the Durability logs a failed disk
        return added

    def merge_replicated(self, records: Iterable[Record], source: str | None = None
                         ) -> tuple[int, Deferred | None]:
        """:meth:`merge_records`, and a Deferred that fires once the new
        copies are on disk (None without ``--data-dir`` or nothing new)."""
        new: list[Record] = []
        changed: list[Record] = []
        node = self.node
        store = self.store
        for record in records:
            mid = record.mid
            if mid.node != self.me:
                if store.add(record):
                    new.append(record)
                    if record.key is not None:
                        node.idempotency.remember_copy(
                            record.key, body_digest(record.body), record.id)
                elif mid.node == source and store.set_state(
                        record.id, record.deliveries, record.held, record.due):
                    changed.append(record)
                continue
            if store.is_tombstoned(record.id):
                continue
            if not node.readiness.serving:
                if not node.readiness.fenced:  # recovering: the most delivered copy
                    known = self.recovered.get(record.id)
                    if known is None or record.deliveries > known.deliveries:
                        self.recovered[record.id] = record
            elif mid.epoch < node.epoch and record.id not in node.queue:
                # Our own message from before a restart, reaching us late.
                node.restore([record])
        written = None
        if self.journal is not None:
            if new:
                written = self.journal.replicas(new)
            if changed:
                self.journal.states(changed)
        return len(new), written

    def merge_run(self, run: Run) -> tuple[int, Deferred | None]:
        """Hold a :class:`Run` of a peer's messages (fresh, with no
        idempotency key: nothing to remember of them); how many were new,
        and a Deferred that fires once they are on disk (None without
        ``--data-dir`` or nothing new)."""
        added = self.store.add_run(run)
        written = None
        if added and self.journal is not None:
            written = self.journal.replica_run(run.data, run.packed)
        return added, written

    def merge_states(self, states: Iterable[tuple[MessageId, str, int, bool, float | None]],
                     source: str) -> None:
        """Deliveries, held states and due times that ``source``, the
        owner, says its messages have now: its word wins for the copies
        held here (messages not held, or tombstoned, are skipped)."""
        for mid, message_id, deliveries, held, due in states:
            if mid.node != source:
                continue  # only an owner speaks for its messages
            if (self.store.set_state(message_id, deliveries, held, due)
                    and self.journal is not None):
                self.journal.states([Record(message_id, b"", None, None, deliveries, None,
                                            held, due)])

    def snapshot(self, seen: Tombstones | None = None) -> tuple[int, Iterator[Record | Message]]:
        """Every record held, own accepted messages first (for a sync): how
        many, and them (the copies in runs parsed as they are reached).

        With ``seen`` (a serving peer's :meth:`seen`) it leaves out what
        the merge would take nothing from: the copies it names (only an
        owner's word on a copy's state counts), and this node's own
        messages it names whose state is still the fresh one, which no
        peer can have changed (deliveries only grow; a delay or a hold is
        not fresh)."""
        store = self.store
        if seen is None:
            own = [*self.node.accepted_messages(), *self.recovered.values()]
            count = len(own) + sum(store.held(owner) for owner in store.owners())
            return count, chain(own, store.records())
        own = self._unseen_own(seen)
        count, copies = store.unseen_records(seen)
        return len(own) + count, chain(own, copies)

    def _unseen_own(self, seen: Tombstones) -> list[Record | Message]:
        """This node's accepted messages, but those ``seen`` names that
        are ready and were never delivered."""
        me, epoch = self.me, self.node.epoch
        prefix = id_prefix(me, epoch)
        cut = len(prefix)
        current = seen.of(me, epoch)
        unseen: list[Record | Message] = [*self.recovered.values()]
        for message in self.node.queue.messages():
            state = message.state
            if state == PENDING:
                continue
            if state == READY and not message.deliveries:
                message_id = message.id
                if message_id.startswith(prefix):
                    if current is not None and int(message_id[cut:], 36) in current:
                        continue
                elif parse_id(message_id) in seen:
                    continue
            unseen.append(message)
        return unseen

    def seen(self) -> Tombstones:
        """What a pull from a peer need not carry, for a serving node: the
        ids held here or known to be gone (:meth:`ReplicaStore.seen`), its
        own queue, and every id of its own serving epoch, which a merge
        leaves alone (it mints them; only an older epoch's message reaching
        it late is taken back)."""
        seen = self.store.seen()
        me, epoch = self.me, self.node.epoch
        seen.add_range(me, epoch, 0, MAX_SEQ + 1)
        prefix = id_prefix(me, epoch)
        for message in self.node.queue.messages():
            if not message.id.startswith(prefix):
                seen.add(*parse_id(message.id))
        return seen

    def take_recovered(self) -> list[Record]:
        """The own messages found while recovering, in id order; cleared."""
        recovered = sorted(self.recovered.values(), key=lambda r: r.mid[1:])
        self.recovered.clear()
        return recovered

    # -- tombstones ----------------------------------------------------------

    def tombstone(self, message_id: str) -> Deferred | None:
        """Write one tombstone here (an ack, a withdrawn push); with
        ``--data-dir``, a Deferred that fires once it is on disk."""
        key = self.store.tombstone(message_id)
        if key is not None:
            self.node.idempotency.released(key, self.clock.seconds())
        self.recovered.pop(message_id, None)
        if self.journal is not None:
            return self.journal.tombstone(parse_id(message_id))
        return None

    def tombstone_many(self, tombstones: Tombstones) -> Deferred | None:
        """:meth:`tombstone` for many ids (a batch of acks) at once."""
        written = None
        if self.journal is not None:
            written = self.journal.tombstones(tombstones)
        now = self.clock.seconds()
        for key in self.store.merge_tombstones(tombstones):
            self.node.idempotency.released(key, now)
        if self.recovered:
            for message_id in [i for i in self.recovered if self.store.is_tombstoned(i)]:
                del self.recovered[message_id]
        return written

    def merge_tombstones(self, tombstones: Tombstones) -> Deferred | None:
        """Union ``tombstones`` in (acks of our own messages take them out
        of our queue); with ``--data-dir``, a Deferred that fires once they
        are on disk."""
        written = self.tombstone_many(tombstones)
        self._apply_own_tombstones(tombstones)
        return written

    def _apply_own_tombstones(self, tombstones: Tombstones) -> None:
        """Acks written elsewhere for messages in our own queue."""
        queue = self.node.queue
        if not queue.depth:
            return
        by_id = queue.by_id
        for (owner, epoch), ranges in tombstones.items():
            if owner != self.me:
                continue
            for message_id in matching_ids(by_id, owner, epoch, ranges):
                message = by_id.get(message_id)
                if message is not None and message.state != PENDING:
                    self.node.apply_tombstone(message_id)


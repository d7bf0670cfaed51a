"""Replication: pushes (group commit), states and tombstones, as a stream.

A push is pending until ``min_copies`` holders (the owner included) have
it.  What a reactor turn changed goes to each linked peer as one ``Stream``
box that needs no answer: the turn's new records (numbered per link), the
changed states of the node's own messages, and tombstones.  Each peer says
``Copied(upto)``, cumulative, for every record it holds (on disk, with
``--data-dir``), and the pushes settle from that (:mod:`dqid.stream`).

* At most ``MAX_IN_FLIGHT`` numbered boxes wait unacknowledged per peer;
  what comes meanwhile waits and goes as one box (group commit under load).
* A link lost, or a peer that acknowledges nothing for
  ``replication_timeout``, counts as no copy.  A push that cannot get its
  copies in time is withdrawn everywhere with a tombstone.
* States are not urgent: they go half a ``states_linger`` to a whole one
  after they change, and a message acked meanwhile sends none (most leases
  end well within it: their states never travel).
* An ack of a peer's message rides the turn's box, numbered to that peer
  (its owner), whose Copied confirms it (:meth:`confirm_tombstone`).
* Tombstones must arrive: a box with tombstones is numbered when its link
  gave no number for ``TOMBSTONES_CONFIRMED_EVERY``, and those a lost link
  carried without a Copied after them go again with the next box to that
  peer (on another link, or once it is back).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import amp_commands as cmd
from .errors import NotReady, NotReplicated
from .batch_encoding import EncodedBatches
from .holdings import Holdings
from .ids import parse_id
from .links import Links
from .peers import Link, Peer
from .queue import GONE, Message
from .readiness import Readiness
from .replica import Record, Run, tombstones_of
from .stream import Acknowledger, Received, Unanswered, Unconfirmed
from .timings import Timings
from .tombstones import Tombstones
from .wire import (
    WireError, decode_records, decode_run, decode_states, decode_tombstones, encode_states,
    encode_tombstones, scan_run,
)

# Numbered Stream boxes to one peer that may wait unacknowledged at once.
MAX_IN_FLIGHT = 4

# A box with tombstones gets a number (and so a Copied, which shows that the
# boxes before it arrived) when its link gave none for this long, seconds:
# a link lost with no Copied since sends at most that much again.
TOMBSTONES_CONFIRMED_EVERY = 0.1


def refusal(error: Exception) -> str:
    """The code Copied says for records refused with ``error``."""
    return next(code.decode("ascii") for kind, code in cmd.COMMON_ERRORS.items()
                if isinstance(error, kind))


@dataclass(eq=False)
class Batch:
    """The pushes of one reactor turn, replicated together."""

    messages: list[Message] = field(default_factory=list)
    waiters: list[Deferred] = field(default_factory=list)
    copies: int = 1
    targets: int = 0
    answered: int = 0
    done: bool = False
    failed: bool = False
    timer: IDelayedCall | None = None


@dataclass(eq=False)
class Awaiting:
    """What one numbered box settles once its peer acknowledges it: copies
    of pushes, and acks of the peer's own messages (``confirmations`` fire
    True once the peer, their owner, has the tombstones)."""

    batches: list[Batch]
    confirmations: list[Deferred]


@dataclass(eq=False)
class Lane:
    """What goes to one peer: boxes unacknowledged on its link, batches
    waiting for room, acks of its messages waiting for this turn's box."""

    # Per link: a peer may have two (each side dials); boxes sent on one
    # are acknowledged on it, so a link that stops being the one used
    # still settles what it carried, until it closes.
    sent: dict[Link, Unanswered[Awaiting]] = field(default_factory=dict)
    backlog: list[Batch] = field(default_factory=list)
    confirmations: list[Deferred] = field(default_factory=list)
    # Tombstones sent on a link and not known to have arrived; those of a
    # lost link, to go again with the next box.
    unconfirmed: dict[Link, Unconfirmed[Tombstones]] = field(default_factory=dict)
    resend: Tombstones | None = None

    def tombstones_lost(self, unconfirmed: Unconfirmed[Tombstones] | None) -> bool:
        """What ``unconfirmed`` kept goes again; True if there was any."""
        lost = unconfirmed.take_all() if unconfirmed is not None else []
        for tombstones in lost:
            if self.resend is None:
                self.resend = Tombstones()
            self.resend.merge(tombstones)
        return bool(lost)


class Replicator:
    log = Logger()

    def __init__(self, links: Links, holdings: Holdings, readiness: Readiness,
                 epoch: Callable[[], int], clock: IReactorTime, timings: Timings,
                 min_copies: int, failed_call: Callable[[Failure, str, Peer], None],
                 work_arrived: Callable[[], None]) -> None:
        self.links = links
        self.holdings = holdings
        self.readiness = readiness
        self.epoch = epoch  # the node's own epoch, for its Stream boxes
        self.clock = clock
        self.timings = timings
        self.min_copies = min_copies
        self.failed_call = failed_call  # logs, and fences on StaleEpoch
        self.work_arrived = work_arrived  # a peer's ready count rose
        self._lanes: dict[str, Lane] = {name: Lane() for name in links.peers}
        # This turn's changes, sent when it ends.
        self._turn_ends: IDelayedCall | None = None
        self._batch: Batch | None = None
        # States wait (each message once): changed in this half linger,
        # and in the one before (they go at the next tick).
        self._states: dict[str, Message] = {}
        self._states_aging: dict[str, Message] = {}
        self._states_tick: IDelayedCall | None = None
        self._states_tick_at = 0.0  # when the tick is (or was) due
        self._tombstones: Tombstones | None = None
        # The peer side: what each link's owner sent, acknowledged per turn.
        self._acknowledgers: dict[Link, Acknowledger] = {}
        self._to_acknowledge: set[Link] = set()
        self._acknowledging: IDelayedCall | None = None

    def in_flight(self, peer: str) -> int:
        """Numbered boxes to ``peer`` not acknowledged yet."""
        return sum(len(sent) for sent in self._lanes[peer].sent.values())

    def holders_reason(self) -> str | None:
        """Why a push cannot get its copies now, or None."""
        holders = 1 + len(self.links.serving())
        if holders < self.min_copies:
            return f"only {holders} of {self.min_copies} required copies reachable"
        return None

    # -- what a turn changed -------------------------------------------------

    def replicate(self, messages: Sequence[Message]) -> Deferred:
        """Fires once ``min_copies`` nodes hold ``messages``."""
        if not self.readiness.serving:
            raise NotReady(self.readiness.refusal() or "not serving")
        batch = self._batch
        if batch is None:
            batch = self._batch = Batch()
            self._end_turn_later()
        batch.messages.extend(messages)
        if self.min_copies <= 1:
            return succeed(None)
        waiter: Deferred = Deferred()
        batch.waiters.append(waiter)
        return waiter

    def tombstone(self, message_id: str) -> Deferred | None:
        """Write one tombstone here and send it to every peer with this
        turn's changes; with ``--data-dir``, a Deferred that fires once it
        is on disk here."""
        mid = parse_id(message_id)
        written = self.holdings.tombstone(message_id)
        if self._tombstones is None:
            self._tombstones = Tombstones()
            self._end_turn_later()
        self._tombstones.add(mid.node, mid.epoch, mid.seq)
        return written

    def tombstone_many(self, message_ids: Sequence[str]) -> Deferred | None:
        """:meth:`tombstone` for a batch of ids, as one set of tombstones."""
        tombstones = tombstones_of(message_ids)
        written = self.holdings.tombstone_many(tombstones)
        self._send_with_the_turn(tombstones)
        return written

    def confirm_tombstone(self, message_id: str, owner: Peer) -> Deferred:
        """Ack a message of peer ``owner`` here (a tombstone, sent with this
        turn's box to every peer): fires True once ``owner`` has it (on
        disk, with ``--data-dir``), False if that cannot be known (the
        tombstone written here reaches it later; with ``--data-dir``, False
        once the tombstone is on this node's disk)."""
        written = self.tombstone(message_id)
        return self._confirmation(owner, written)

    def confirm_tombstones(self, tombstones: Tombstones, owner: Peer) -> Deferred:
        """Ack messages of peer ``owner`` here, together: as
        :meth:`confirm_tombstone`, one confirmation for them all."""
        written = self.holdings.merge_tombstones(tombstones)
        self._send_with_the_turn(tombstones)
        return self._confirmation(owner, written)

    def _send_with_the_turn(self, tombstones: Tombstones) -> None:
        """``tombstones`` go to every peer with this turn's box."""
        if self._tombstones is None:
            self._tombstones = Tombstones()
            self._end_turn_later()
        self._tombstones.merge(tombstones)

    def _confirmation(self, owner: Peer, written: Deferred | None) -> Deferred:
        """Fires True once ``owner`` confirms this turn's tombstones; if it
        cannot, False once ``written`` (their write to this node's disk)
        is done, since only this node's copy of them is sure to last (it
        fails if that write failed)."""
        confirmed: Deferred = Deferred()
        self._lanes[owner.node_id].confirmations.append(confirmed)
        if written is None:
            return confirmed

        def kept(owner_has_them: bool) -> Deferred | bool:
            if owner_has_them:  # on the owner's disk: this write is a spare
                written.addErrback(lambda f: None)  # the Durability logs a failed disk
                return True
            return written.addCallback(lambda _: False)

        return confirmed.addCallback(kept)

    def states_changed(self, changed: list[Message]) -> None:
        """The node's ``changed`` messages changed state (the node gathers
        a turn's changes): they go to every linked peer half a
        ``states_linger`` to a whole one later, unless acked by then."""
        for message in changed:
            self._states[message.id] = message
        if self._states and self._states_tick is None:
            self._states_tick_at = self.clock.seconds()
            self._tick_states_later()

    def _tick_states_later(self) -> None:
        """The next tick, half a linger after the one before was due (so a
        late timer does not stretch the linger)."""
        self._states_tick_at += self.timings.states_linger / 2
        self._states_tick = self.clock.callLater(
            max(0.0, self._states_tick_at - self.clock.seconds()), self._age_states)

    def _age_states(self) -> None:
        """Every half linger: the states that changed in the half before
        the last go now (each waited half a linger to a whole one), those
        since age a half."""
        self._states_tick = None
        due, self._states_aging, self._states = self._states_aging, self._states, {}
        states = [m for m in due.values() if m.state != GONE]
        if states:
            self.flush(states)
        if self._states_aging:
            self._tick_states_later()

    def _end_turn_later(self) -> None:
        if self._turn_ends is None:
            self._turn_ends = self.clock.callLater(0, self.flush)

    def flush(self, states: Sequence[Message] = ()) -> None:
        """Send what this turn changed, and ``states`` (those due), now:
        one Stream box per linked peer (every peer with a link, even one
        whose heartbeat is late: what misses a peer is only restored by
        anti-entropy)."""
        if self._turn_ends is not None:
            if self._turn_ends.active():
                self._turn_ends.cancel()
            self._turn_ends = None
        batch, self._batch = self._batch, None
        if batch is not None and batch.messages and self.min_copies > 1:
            reason = self.holders_reason()
            if reason is not None:
                self._fail_batch(batch, reason)  # its tombstones go below
                batch = None
        tombstones, self._tombstones = self._tombstones, None
        states_payload = encode_states(states) if states else None
        tombstones_payload = encode_tombstones(tombstones) if tombstones else None
        peers = self.links.linked()
        encoded: dict[tuple[int, ...], EncodedBatches] = {}  # once per set of batches
        if batch is not None and batch.messages:
            batch.targets = len(peers)
            for peer in peers:
                self._lanes[peer.node_id].backlog.append(batch)
            if self.min_copies <= 1:
                batch.done = True
            else:
                batch.timer = self.clock.callLater(
                    self.timings.replication_timeout, self._fail_batch, batch,
                    "replication timed out")
        for peer in peers:
            self._send(peer, encoded, states_payload, tombstones, tombstones_payload)

    def _send(self, peer: Peer, encoded: dict[tuple[int, ...], EncodedBatches],
              states: bytes | None = None, tombstones: Tombstones | None = None,
              tombstones_payload: bytes | None = None) -> None:
        """One Stream box to ``peer``: what waits in its lane, unless
        ``MAX_IN_FLIGHT`` numbered boxes are unacknowledged (then it waits,
        and grows, until one is), ``states`` and ``tombstones`` (the turn's,
        encoded as ``tombstones_payload``: a box with acks of the peer's
        messages is numbered, so that the peer confirms them), and the
        tombstones a lost link carried to it."""
        lane = self._lanes[peer.node_id]
        confirmations: list[Deferred] = []
        if tombstones is not None:  # the turn's box: its acks go in it
            confirmations, lane.confirmations = lane.confirmations, []
        link = peer.link()
        if link is None:
            batches, lane.backlog = lane.backlog, []
            self._settle(Awaiting(batches, confirmations), held=False)
            return
        now = self.clock.seconds()
        for stalled in lane.sent.values():
            oldest = stalled.oldest_sent()
            if oldest is not None and now - oldest > self.timings.replication_timeout:
                # The peer acknowledged nothing for that long: no copies there.
                self._settle_all(stalled.drop_all(), held=False)
        sent = lane.sent.get(link)
        if sent is None:  # a new link: its first tombstones wait their turn too
            sent = lane.sent[link] = Unanswered(numbered_at=now)
        records = run = None
        batches = []
        if lane.backlog and self.in_flight(peer.node_id) < MAX_IN_FLIGHT:
            batches = [b for b in lane.backlog if not b.failed]
            lane.backlog = []
            if batches:
                key = tuple(id(b) for b in batches)
                payload = encoded.get(key)
                if payload is None:
                    payload = encoded[key] = EncodedBatches(
                        batches[0].messages if len(batches) == 1
                        else [m for b in batches for m in b.messages])
                if link.version >= cmd.PACKED_RUNS:
                    run = payload.run()
                if run is None:
                    records = payload.records()
        if lane.resend is not None:
            again, lane.resend = lane.resend, None
            if tombstones is not None:
                again.merge(tombstones)
            tombstones, tombstones_payload = again, encode_tombstones(again)
        seq = None
        if batches or confirmations or (
                tombstones is not None
                and now - sent.numbered_at >= TOMBSTONES_CONFIRMED_EVERY):
            seq = sent.send(Awaiting(batches, confirmations), now)
        if records is None and run is None and states is None and tombstones is None:
            return
        if tombstones is not None:
            # Shown to have arrived by a Copied for this box, or if it has
            # no number, for the next one.
            lane.unconfirmed.setdefault(link, Unconfirmed()).keep(
                tombstones, sent.numbered if seq is not None else sent.numbered + 1)
        self.links.send(link, cmd.Stream, epoch=self.epoch(), seq=seq, records=records,
                        run=run, states=states, tombstones=tombstones_payload)

    def on_copied(self, link: Link, upto: int, holder: bool, refused: str | None) -> None:
        """``link``'s peer holds our records numbered up to ``upto`` (or
        refused them)."""
        peer = self.links.peers.get(link.peer_id or "")
        if peer is None:
            return
        lane = self._lanes[peer.node_id]
        sent = lane.sent.get(link)
        if sent is None:
            return  # about a closed link: counted as no copy already
        peer.last_seen = self.links.now()
        settled = sent.acknowledged(upto)
        unconfirmed = lane.unconfirmed.get(link)
        if unconfirmed is not None:
            unconfirmed.acknowledged(upto)
        if refused is not None:
            self._refused(peer, refused)
        for awaiting in settled:
            self._settle(awaiting, held=holder and refused is None,
                         confirmed=refused is None)
        if lane.backlog:
            self._send(peer, {})

    def _refused(self, peer: Peer, code: str) -> None:
        if code == cmd.COMMON_ERRORS[cmd.StaleEpoch].decode("ascii"):
            error: Exception = cmd.StaleEpoch(f"{peer.node_id} knows a newer epoch")
        else:
            error = cmd.NotHolder(f"{peer.node_id} refused our records: {code}")
        self.failed_call(Failure(error), "stream", peer)

    def link_lost(self, link: Link) -> None:
        """``link`` closed: what waited on it is no copy; its peer side is
        gone; the tombstones it may not have delivered go again (on
        another link to the peer if it has one, else once it is back)."""
        self._acknowledgers.pop(link, None)
        self._to_acknowledge.discard(link)
        for lane in self._lanes.values():
            sent = lane.sent.pop(link, None)
            if sent is not None:
                self._settle_all(sent.drop_all(), held=False)
            if lane.tombstones_lost(lane.unconfirmed.pop(link, None)):
                self._end_turn_later()

    def peer_up(self, peer: Peer) -> None:
        """A link to ``peer`` came up: tombstones that lost links carried
        to it go now."""
        if self._lanes[peer.node_id].resend is not None:
            self._end_turn_later()

    def peer_down(self, peer: Peer) -> None:
        """``peer`` is down: what waited for it will not reach it (but the
        tombstones its links may not have delivered go once it is back)."""
        lane = self._lanes[peer.node_id]
        waiting = Awaiting(lane.backlog, lane.confirmations)
        lane.backlog, lane.confirmations = [], []
        self._settle(waiting, held=False)
        sent, lane.sent = lane.sent, {}
        for unanswered in sent.values():
            self._settle_all(unanswered.drop_all(), held=False)
        unconfirmed, lane.unconfirmed = lane.unconfirmed, {}
        for kept in unconfirmed.values():
            lane.tombstones_lost(kept)

    def _settle_all(self, settled: list[Awaiting], held: bool) -> None:
        for awaiting in settled:
            self._settle(awaiting, held)

    def _settle(self, awaiting: Awaiting, held: bool, confirmed: bool = False) -> None:
        """A peer answered for ``awaiting`` (``held``: it counts as a copy;
        ``confirmed``: it has the acks), or can no longer."""
        self._count_answers(awaiting.batches, held)
        for confirmation in awaiting.confirmations:
            confirmation.callback(confirmed)

    def _count_answers(self, batches: list[Batch], held: bool) -> None:
        for batch in batches:
            batch.answered += 1
            if held:
                batch.copies += 1
            self._settle_batch(batch)

    def _settle_batch(self, batch: Batch) -> None:
        if batch.done:
            return
        if batch.copies >= self.min_copies:
            batch.done = True
            if batch.timer is not None and batch.timer.active():
                batch.timer.cancel()
            for waiter in batch.waiters:
                waiter.callback(None)
        elif batch.answered >= batch.targets:
            self._fail_batch(
                batch, f"{batch.copies} of {self.min_copies} required copies made"
            )

    def _fail_batch(self, batch: Batch, why: str) -> None:
        if batch.done:
            return
        batch.done = batch.failed = True
        if batch.timer is not None and batch.timer.active():
            batch.timer.cancel()
        self.log.warn("{count} push(es) not replicated: {why}", count=len(batch.messages),
                      why=why)
        for message in batch.messages:
            self.tombstone(message.id)
        for waiter in batch.waiters:
            waiter.errback(NotReplicated(why))

    # -- the peer side -------------------------------------------------------

    def on_stream(self, link: Link, epoch: int, seq: int | None, records: bytes | None,
                  run: bytes | None, states: bytes | None, tombstones: bytes | None) -> None:
        """Take what ``link``'s owner sent: hold its records, apply its
        states, merge the tombstones; a numbered box is acknowledged with
        Copied once its records and tombstones are held (on disk, with
        ``--data-dir``).  Never raises: a bad part is logged and refused."""
        owner = link.peer_id or ""
        peer = self.links.peers[owner]
        peer.last_seen = self.links.now()
        entry = None
        if records is not None and run is not None:
            self._bad_stream(link, "both records and a packed run")
            records = run = None
        if seq is not None and records is None and run is None and tombstones is None:
            self._bad_stream(link, "a number without records or tombstones")
        elif seq is not None:
            acknowledger = self._acknowledgers.setdefault(link, Acknowledger())
            try:
                entry = acknowledger.receive(seq)
            except WireError as error:
                self._bad_stream(link, str(error))
                records = run = None  # not acknowledgeable: not taken
        elif records is not None or run is not None:
            self._bad_stream(link, "records without a number")
            records = run = None
        writes: list[Deferred] = []
        refused = None
        if records is not None or run is not None:
            refused = self._hold(link, peer, epoch, records, run, writes)
        if states is not None:
            try:
                self.holdings.check_epoch(owner, epoch)
                self.holdings.merge_states(decode_states(states), owner)
            except WireError as error:
                self._bad_stream(link, str(error))
            except cmd.StaleEpoch:
                pass  # an older incarnation no longer speaks for its messages
        if tombstones is not None:
            # Even from a fenced owner: withdrawn pushes must stay withdrawn.
            try:
                written = self.holdings.merge_tombstones(decode_tombstones(tombstones))
            except WireError as error:
                self._bad_stream(link, str(error))
                refused = refused or refusal(error)
            else:
                if written is not None:
                    writes.append(written)
        if entry is None or refused is not None:
            for written in writes:
                written.addErrback(lambda f: None)  # the Durability logs a failed disk
        if entry is None:
            return
        if refused is not None or not writes:
            self._settled(link, entry, refused is None and self.readiness.serving, refused,
                          at_once=True)
        else:  # --data-dir: held once on disk
            gatherResults(writes, consumeErrors=True).addCallbacks(
                lambda _: self._settled(link, entry, self.readiness.serving),
                lambda _: self._settled(link, entry, False, cmd.DISK_FAILED))

    def _hold(self, link: Link, peer: Peer, epoch: int, records: bytes | None,
              packed: bytes | None, writes: list[Deferred]) -> str | None:
        """Hold ``peer``'s records, or its packed run (their disk write
        joins ``writes``); why they were refused, or None."""
        owner = peer.node_id
        try:
            self.holdings.check_epoch(owner, epoch)
            if packed is not None:
                run: Run | None = decode_run(packed)
                decoded: list[Record] = []
            else:  # a protocol 3 turn's fresh pushes are kept as bytes too
                records = records or b""
                run = scan_run(records)
                decoded = decode_records(records) if run is None else []
            if (run is not None and run.owner != owner) or any(
                    record.mid.node != owner for record in decoded):
                raise cmd.NotHolder("replicate your own messages only")
        except (WireError, cmd.StaleEpoch, cmd.NotHolder) as error:
            if isinstance(error, WireError):
                self._bad_stream(link, str(error))
            return refusal(error)
        self.holdings.note_epoch(owner, epoch)
        if run is not None:
            added, written = self.holdings.merge_run(run)
        else:
            added, written = self.holdings.merge_replicated(decoded)
        if added:
            peer.ready_count += added
            self.clock.callLater(0, self.work_arrived)
        if written is not None:
            writes.append(written)
        return None

    def _settled(self, link: Link, entry: Received, holder: bool,
                 refused: str | None = None, at_once: bool = False) -> None:
        """``entry`` is held (or refused): acknowledged now (``at_once``:
        the box settled as it arrived, so its Copied goes with the writes
        of this read) or once per turn (copies settling as the disk
        writes finish)."""
        Acknowledger.settle(entry, holder, refused)
        if at_once:
            self._acknowledge_link(link)
            return
        self._to_acknowledge.add(link)
        if self._acknowledging is None:
            self._acknowledging = self.clock.callLater(0, self._acknowledge)

    def _acknowledge(self) -> None:
        """Once per turn: each link's cumulative Copied."""
        self._acknowledging = None
        links, self._to_acknowledge = self._to_acknowledge, set()
        for link in links:
            self._acknowledge_link(link)

    def _acknowledge_link(self, link: Link) -> None:
        acknowledger = self._acknowledgers.get(link)
        if acknowledger is not None:
            for upto, holder, refused in acknowledger.due():
                self.links.send(link, cmd.Copied, upto=upto, holder=holder, refused=refused)

    def _bad_stream(self, link: Link, why: str) -> None:
        self.log.warn("bad Stream from peer {peer}: {error}", peer=link.peer_id,
                      error=why)

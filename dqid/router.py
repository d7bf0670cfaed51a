"""Requests for messages owned elsewhere.

Acks, nacks and touches go to the owner (an ack the owner cannot take is
written as a tombstone that reaches it later); a get with nothing ready here
leases from a peer that has work, and parked long polls are fed the same
way; an Idempotency-Key first used on another node is confirmed by that
node, and one this node does not know is asked of every peer.  The
``on_*`` methods answer the same requests from peers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from twisted.internet.defer import (
    CancelledError, Deferred, fail, gatherResults, maybeDeferred, succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import amp_commands as cmd
from .errors import NotReady
from .holdings import Holdings
from .idempotency import IdempotencyConflict
from .ids import MessageId, parse_id
from .links import Links
from .node import LeaseChange, acked_at, first_error, unknown_at
from .peers import Link, Peer
from .queue import LeaseLost, Message, NotHeld, NotLeased, UnknownMessage
from .readiness import Readiness
from .replica import Record, Taken
from .replicator import Replicator
from .timings import Timings
from .tombstones import Tombstones
from .wire import decode_records, encode_records

# Forwarded acks per Ack call (ids travel in one AMP value of 64 KiB).
ACK_BATCH = 500
# A peer's answer to Lease, and the error it means here.
LEASE_OUTCOMES: dict[str, type[Exception]] = {
    "unknown": UnknownMessage, "lease_lost": LeaseLost, "not_leased": NotLeased,
    "not_held": NotHeld,
}


class Owner(Protocol):
    """What the Router needs of the node that owns a queue."""

    readiness: Readiness

    def ack_own(self, message_id: str) -> Deferred | None: ...

    def change_own_lease(self, message_id: str, change: LeaseChange) -> Message: ...

    def held_own(self, count: int) -> list[Message]: ...

    @property
    def queue(self) -> Any: ...  # the WorkQueue (peek)

    async def own_key(self, key: str, digest: bytes, asker: str) -> str | None: ...

    def take_own(self, count: int, visibility: float) -> list[Message]: ...

    def has_long_polls(self) -> bool: ...

    def claim_long_poll(self) -> Any: ...

    def answer_long_poll(self, poll: Any, taken: list[Any]) -> bool: ...


@dataclass(eq=False)
class KeyAsked:
    """A peer asked whether it accepted a push under an Idempotency-Key."""

    peer_id: str
    answer: Deferred
    peer_down: bool = False  # given up on: the peer went down meanwhile


@dataclass(eq=False)
class OwnerAcks:
    """The acks of one owner's messages whose copies are here, in one batch:
    they go as one set of tombstones and settle as one."""

    owner: Peer
    tombstones: Tombstones = field(default_factory=Tombstones)
    positions: list[int] = field(default_factory=list)  # in the batch


class Router:
    log = Logger()

    def __init__(self, node: Owner, links: Links, holdings: Holdings,
                 replicator: Replicator, clock: IReactorTime, timings: Timings,
                 failed_call: Callable[[Failure, str, Peer], None]) -> None:
        self.node = node
        self.links = links
        self.holdings = holdings
        self.replicator = replicator
        self.clock = clock
        self.timings = timings
        self.failed_call = failed_call
        self._acks_to_send: dict[str, dict[str, list[Deferred]]] = {}
        self._feeding = False
        self._key_asks: dict[str, set[KeyAsked]] = {}  # per peer, unanswered

    def _refuse_unless_serving(self) -> None:
        if not self.node.readiness.serving:
            raise cmd.NotHolder(self.node.readiness.refusal() or "not serving")

    # -- acks ----------------------------------------------------------------

    def ack(self, message_id: str, mid: MessageId) -> Deferred:
        """Ack a message this node's queue does not hold: sent to its owner
        (with the replication stream when a copy is here, else as an Ack
        call), else written here as a tombstone that reaches it later
        (fails with UnknownMessage when nobody here knows it)."""
        if mid.node == self.links.me:
            if message_id in self.holdings.recovered:
                written = self.replicator.tombstone(message_id)  # (on disk, once it fires)
                return succeed(None) if written is None else written
            return fail(UnknownMessage(message_id))
        owner = self.links.peers.get(mid.node)
        if owner is None or self.holdings.is_tombstoned(message_id):
            return fail(UnknownMessage(message_id))
        if self.links.serving_link(owner) is None:
            return maybeDeferred(self._tombstone_here, message_id)
        if self.holdings.store.holds(message_id):
            # A copy is here: the ack rides the replication stream, and the
            # owner confirms it (on its disk too) with its Copied.  If it
            # cannot, the tombstone written here reaches it later.
            return self.replicator.confirm_tombstone(message_id, owner).addCallback(
                lambda confirmed: None)
        # No copy here (it missed it): only the owner knows the message.
        return self._forward_ack(owner, message_id).addCallback(
            self._forwarded, message_id)

    def ack_many(self, acks: Sequence[tuple[str, MessageId]]) -> Deferred:
        """Ack messages this node's queue does not hold: fires with, per
        ack, True (acked) or False (unknown).  Those a copy of is here go
        to each owner as one set of tombstones, confirmed once; the rest go
        one by one as :meth:`ack` sends them."""
        answers = [False] * len(acks)
        waits: list[Deferred] = []
        riding: dict[str, OwnerAcks] = {}
        linked: dict[str, bool] = {}  # owner: a serving link to it exists
        store = self.holdings.store
        for position, (message_id, mid) in enumerate(acks):
            owner = self.links.peers.get(mid.node)
            if owner is not None and mid not in store.tombstones:
                serving = linked.get(owner.node_id)
                if serving is None:
                    serving = linked[owner.node_id] = (
                        self.links.serving_link(owner) is not None)
                if serving and store.holds(message_id, mid):
                    group = riding.get(owner.node_id)
                    if group is None:
                        group = riding[owner.node_id] = OwnerAcks(owner)
                    if group.tombstones.add(mid.node, mid.epoch, mid.seq):
                        group.positions.append(position)
                    continue  # (a repeat in the batch: unknown, as one by one)
            waits.append(self.ack(message_id, mid).addCallbacks(
                acked_at, unknown_at, callbackArgs=(answers, position),
                errbackArgs=(answers, position)))
        for group in riding.values():
            for position in group.positions:
                answers[position] = True
            # Answered once the owner has them (or cannot say): see ack().
            waits.append(self.replicator.confirm_tombstones(group.tombstones, group.owner))
        if not waits:
            return succeed(answers)
        return gatherResults(waits, consumeErrors=True).addCallbacks(
            lambda _: answers, first_error)

    def _forwarded(self, acked: bool, message_id: str) -> Deferred | None:
        if acked:  # on the owner's disk, and it replicates it
            written = self.holdings.tombstone(message_id)
            if written is not None:
                written.addErrback(lambda f: None)  # the Durability logs a failed disk
            return None
        return self._tombstone_here(message_id)

    def _tombstone_here(self, message_id: str) -> Deferred | None:
        """The owner did not take the ack: a replica's copy is acked here,
        and with ``--data-dir`` the Deferred fires once that is on disk
        here (until the owner has it, this node's disk is where it lasts)."""
        if not self.holdings.store.holds(message_id):
            raise UnknownMessage(message_id)
        return self.replicator.tombstone(message_id)

    def _forward_ack(self, owner: Peer, message_id: str) -> Deferred:
        """Fires True if ``owner`` acked ``message_id``, False if it did not
        know it or could not be asked.  The acks of one turn for one owner
        go as one Ack call."""
        waiting: Deferred = Deferred()
        pending = self._acks_to_send.get(owner.node_id)
        if pending is None or len(pending) >= ACK_BATCH:
            pending = self._acks_to_send[owner.node_id] = {}
            self.clock.callLater(0, self._send_acks, owner, pending)
        pending.setdefault(message_id, []).append(waiting)
        return waiting

    def _send_acks(self, owner: Peer, pending: dict[str, list[Deferred]]) -> None:
        if self._acks_to_send.get(owner.node_id) is pending:
            del self._acks_to_send[owner.node_id]

        def answered(answer: dict) -> None:
            acked = set(answer["acked"])
            for message_id, waiters in pending.items():
                # One ack took it; a second in the same turn finds it gone.
                first, *rest = waiters
                first.callback(message_id in acked)
                for waiting in rest:
                    waiting.callback(False)

        def failed(failure: Failure) -> None:
            self.failed_call(failure, "ack forward", owner)
            for waiters in pending.values():
                for waiting in waiters:
                    waiting.callback(False)  # tombstone here instead

        link = owner.link()
        if link is None:
            failed(Failure(NotReady(f"{owner.node_id} is unreachable")))
            return
        d = self.links.call(link, cmd.Ack, ids=list(pending))
        d.addCallbacks(answered, failed)

    def on_ack(self, ids: list[str]) -> Deferred:
        """Ack our own ``ids``; answered once the tombstones are on disk
        (``--data-dir``): fires with (acked, unknown)."""
        self._refuse_unless_serving()
        acked, unknown, writes = [], [], []
        for message_id in ids:
            try:
                written = self.node.ack_own(message_id)
            except (UnknownMessage, ValueError):
                unknown.append(message_id)
            else:
                acked.append(message_id)
                if written is not None:
                    writes.append(written)
        done = gatherResults(writes, consumeErrors=True) if writes else succeed(None)
        return done.addCallback(lambda _: (acked, unknown))

    # -- nack, touch, kick, peek, held ----------------------------------------

    def _owner_link(self, message_id: str, mid: MessageId) -> Link:
        owner = self.links.peers.get(mid.node)
        if owner is None or self.holdings.is_tombstoned(message_id):
            raise UnknownMessage(message_id)
        link = self.links.serving_link(owner)
        if link is None:
            raise NotReady(f"the owner of {message_id} ({mid.node}) is unreachable")
        return link

    async def lease(self, message_id: str, mid: MessageId, change: LeaseChange) -> None:
        """Nack, touch or kick a message owned by a peer: the owner decides."""
        link = self._owner_link(message_id, mid)
        arguments: dict[str, Any] = {"id": message_id, "action": change.action}
        if change.receipt is not None:
            arguments["receipt"] = change.receipt
        if change.action == "touch":
            arguments["visibility"] = float(change.visibility)
        if change.delay:
            arguments["delay"] = float(change.delay)
        try:
            answer = await self.links.call(link, cmd.Lease, **arguments)
        except Exception as error:
            raise NotReady(f"the owner of {message_id} did not answer: {error}") from None
        outcome = answer["outcome"]
        if outcome in LEASE_OUTCOMES:
            raise LEASE_OUTCOMES[outcome](message_id)

    def on_lease(self, message_id: str, change: LeaseChange) -> str:
        self._refuse_unless_serving()
        try:
            self.node.change_own_lease(message_id, change)
        except UnknownMessage:
            return "unknown"
        except LeaseLost:  # before NotLeased: a kind of it
            return "lease_lost"
        except NotLeased:
            return "not_leased"
        except NotHeld:
            return "not_held"
        return "ok"

    async def peek(self, message_id: str, mid: MessageId) -> tuple[Record, str]:
        """Ask the owner; when it cannot answer, the replica held here."""
        try:
            link = self._owner_link(message_id, mid)
            answer = await self.links.call(link, cmd.Peek, id=message_id)
        except UnknownMessage:
            raise
        except Exception:
            record = self.holdings.store.get(message_id)
            if record is None:
                raise UnknownMessage(message_id) from None
            state = "held" if record.held else "delayed" if record.due else "ready"
            return record, state
        records = decode_records(answer["records"])
        if not records:
            raise UnknownMessage(message_id)
        return records[0], answer["state"]

    def on_peek(self, message_id: str) -> dict:
        self._refuse_unless_serving()
        try:
            message, state = self.node.queue.peek(message_id)
        except UnknownMessage:
            return {"records": b"", "state": ""}
        return {"records": encode_records([message]), "state": state}

    async def held(self, count: int) -> list[Record]:
        """Held messages of the other owners: asked of each serving peer;
        those of a peer that does not serve, from the replicas here."""
        found: list[Record] = []
        for name, peer in sorted(self.links.peers.items()):
            if len(found) >= count:
                break
            link = self.links.serving_link(peer)
            records: list[Record] | None = None
            if link is not None:
                try:
                    answer = await self.links.call(link, cmd.HeldList, count=count - len(found))
                    records = decode_records(answer["records"])
                except Exception as error:
                    self.log.debug("held list of {peer} failed: {error}", peer=name,
                                   error=error)
            if records is None:
                records = [r for r in self.holdings.store.records(name) if r.held]
            found += records[:count - len(found)]
        return found

    def on_held_list(self, count: int) -> bytes:
        self._refuse_unless_serving()
        return encode_records(self.node.held_own(count))

    # -- idempotency keys anywhere ------------------------------------------

    async def confirm_key(self, key: str, digest: bytes, first: str) -> str | None:
        """Ask the owner of ``first`` whether it accepted a push under
        ``key``; its id, or None.  NotReady when the owner is unreachable:
        answering from a replica could confirm a push that is withdrawn."""
        owner_id = parse_id(first).node
        owner = self.links.peers.get(owner_id)
        link = self.links.serving_link(owner) if owner is not None else None
        if link is None:
            raise NotReady(
                f"the node that took the first push with this key ({owner_id}) "
                "is unreachable"
            )
        try:
            answer = await self.links.call(
                link, cmd.KeyLookup,
                timeout=self.timings.replication_timeout + self.timings.call_timeout,
                key=key, digest=digest)
        except cmd.KeyConflict:
            raise IdempotencyConflict(key, first) from None
        except CancelledError:
            raise  # the push itself was cancelled (its client left)
        except Exception as error:
            raise NotReady(f"the node that took the first push with this key did not "
                           f"answer: {error}") from None
        return answer["id"] or None

    def find_key(self, key: str, digest: bytes) -> Deferred:
        """Ask every serving peer whether it accepted a push under ``key``,
        which this node does not know: the id one of them accepted, or None.

        When a push needs every node (``--min-copies`` = all, the default),
        a peer that is down or does not answer makes it NotReady: the push
        could not be accepted without that peer anyway, and going on would
        let a push there under the key, unknown here, be queued too if the
        peer came back before this one is replicated.  With fewer copies
        such a peer is passed over, so that keyed pushes go on while a node
        is down.  Fails with IdempotencyConflict when a peer holds the key
        for another body."""
        timeout = self.timings.replication_timeout + self.timings.call_timeout
        every_node = self.replicator.min_copies > len(self.links.peers)
        serving = self.links.serving()
        if every_node and len(serving) < len(self.links.peers):
            down = sorted(set(self.links.peers) - {p.node_id for p in serving})
            raise NotReady(f"cannot ask {', '.join(down)} about this Idempotency-Key")
        asked = []
        for peer in serving:
            link = self.links.serving_link(peer)
            if link is None:
                if every_node:
                    raise NotReady(f"cannot ask {peer.node_id} about this Idempotency-Key")
                continue
            ask = KeyAsked(peer.node_id, self.links.call(
                link, cmd.KeyLookup, timeout=timeout, key=key, digest=digest))
            self._key_asks.setdefault(peer.node_id, set()).add(ask)
            ask.answer.addBoth(self._key_answered, ask)
            ask.answer.addCallbacks(lambda answer: answer["id"] or None, self._key_not_found,
                                    errbackArgs=(key, ask, every_node))
            asked.append(ask.answer)
        if not asked:
            return succeed(None)
        found = gatherResults(asked, consumeErrors=True).addErrback(first_error)
        return found.addCallback(lambda ids: next((i for i in ids if i is not None), None))

    def _key_answered(self, result: Any, ask: KeyAsked) -> Any:
        self._key_asks.get(ask.peer_id, set()).discard(ask)
        return result

    def peer_down(self, peer: Peer) -> None:
        """Stop waiting for ``peer``'s answers about keys."""
        for ask in list(self._key_asks.pop(peer.node_id, ())):
            ask.peer_down = True
            ask.answer.cancel()

    def _key_not_found(self, failure: Failure, key: str, ask: KeyAsked,
                       every_node: bool) -> Failure | None:
        if failure.check(cmd.KeyConflict):  # described by the peer's id
            raise IdempotencyConflict(key, str(failure.value))
        if failure.check(CancelledError) and not ask.peer_down:
            return failure  # the push itself was cancelled (its client left)
        why = "went down" if ask.peer_down else failure.getErrorMessage() or str(failure.type)
        if every_node:
            raise NotReady(f"{ask.peer_id} did not say whether it has this "
                           f"Idempotency-Key: {why}")
        self.log.info("{peer} did not say whether it has an Idempotency-Key: {error}",
                      peer=ask.peer_id, error=why)
        return None

    def on_key_lookup(self, asker: str, key: str, digest: bytes) -> Deferred:
        self._refuse_unless_serving()

        def conflict(failure: Failure) -> None:
            failure.trap(IdempotencyConflict)
            raise cmd.KeyConflict(failure.value.message_id)  # the description

        d = Deferred.fromCoroutine(self.node.own_key(key, digest, asker))
        d.addCallbacks(lambda first: {"id": first or ""}, conflict)
        return d

    # -- gets anywhere -------------------------------------------------------

    def _peers_with_work(self) -> list[Peer]:
        return sorted(self.links.serving(), key=lambda p: -p.ready_count)

    async def take(self, count: int, visibility: float) -> list[Record]:
        """Lease up to ``count`` messages from a peer with ready work."""
        for peer in self._peers_with_work():
            records = await self._take_from(peer, count, visibility)
            if records:
                return records
        return []

    async def _take_from(self, peer: Peer, count: int, visibility: float) -> list[Record]:
        link = peer.link()
        if link is None:
            return []
        try:
            # amp.Float refuses an int ("Bad float value"): coerce here.
            answer = await self.links.call(link, cmd.Take, count=count,
                                           visibility=float(visibility))
        except Exception as error:
            self.log.debug("take from {peer} failed: {error}", peer=peer.node_id, error=error)
            return []
        records = decode_records(answer["records"])
        receipts = answer["receipts"]
        if len(receipts) != len(records):
            self.log.warn("take from {peer}: {records} records, {receipts} receipts",
                          peer=peer.node_id, records=len(records), receipts=len(receipts))
            return []  # the leases run out there; nothing delivered here
        peer.ready_count = max(0, peer.ready_count - len(records)) if records else 0
        return [Taken.lent(record, receipt) for record, receipt in zip(records, receipts)]

    def on_take(self, count: int, visibility: float) -> dict:
        self._refuse_unless_serving()
        taken = self.node.take_own(count, visibility)
        return {"records": encode_records(taken), "receipts": [m.receipt for m in taken]}

    def feed_long_polls(self) -> None:
        """Serve parked long polls from peers that have ready work."""
        if self._feeding or not self.node.has_long_polls():
            return
        candidates = [p for p in self._peers_with_work() if p.ready_count > 0]
        if not candidates:
            return
        self._feeding = True
        d = Deferred.fromCoroutine(self._feed(candidates))
        d.addErrback(lambda f: self.log.failure("feeding long polls failed", f))

    async def _feed(self, candidates: list[Peer]) -> None:
        try:
            for peer in candidates:
                while peer.ready_count > 0:
                    poll = self.node.claim_long_poll()
                    if poll is None:
                        return
                    records = await self._take_from(peer, poll.count, poll.visibility)
                    if not self.node.answer_long_poll(poll, records):
                        break
        finally:
            self._feeding = False

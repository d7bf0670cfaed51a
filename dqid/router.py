"""Requests for messages owned elsewhere.

Acks, nacks and touches go to the owner (an ack the owner cannot take is
written as a tombstone that reaches it later); a get with nothing ready here
leases from a peer that has work, and parked long polls are fed the same
way; an Idempotency-Key first used on another node is confirmed by that
node.  The ``on_*`` methods answer the same requests from peers.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import amp_commands as cmd
from .errors import NotReady
from .holdings import Holdings
from .idempotency import IdempotencyConflict
from .ids import MessageId, parse_id
from .links import Links
from .peers import Peer
from .queue import Message, NotLeased, UnknownMessage
from .readiness import Readiness
from .replica import Record
from .replicator import Replicator
from .timings import Timings
from .wire import decode_records, encode_records

# Forwarded acks per Ack call (ids travel in one AMP value of 64 KiB).
ACK_BATCH = 500


class Owner(Protocol):
    """What the Router needs of the node that owns a queue."""

    readiness: Readiness

    def ack_own(self, message_id: str) -> Message: ...

    def change_own_lease(self, message_id: str, visibility: float) -> Message: ...

    async def own_key(self, key: str, digest: bytes) -> str | None: ...

    def take_own(self, count: int, visibility: float) -> list[Message]: ...

    def has_long_polls(self) -> bool: ...

    def claim_long_poll(self) -> Any: ...

    def answer_long_poll(self, poll: Any, taken: list[Any]) -> bool: ...


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

    def _refuse_unless_serving(self) -> None:
        if not self.node.readiness.serving:
            raise cmd.NotHolder(self.node.readiness.refusal() or "not serving")

    # -- acks ----------------------------------------------------------------

    async def ack(self, message_id: str, mid: MessageId) -> None:
        """Ack a message this node's queue does not hold."""
        if mid.node == self.links.me:
            if message_id in self.holdings.recovered:
                self.replicator.tombstone(message_id)
                return
            raise UnknownMessage(message_id)
        owner = self.links.peers.get(mid.node)
        if owner is None or self.holdings.is_tombstoned(message_id):
            raise UnknownMessage(message_id)
        if self.links.serving_link(owner) is not None:
            if await self._forward_ack(owner, message_id):
                self.holdings.tombstone(message_id)
                return
        if self.holdings.store.get(message_id) is None:
            raise UnknownMessage(message_id)
        self.replicator.tombstone(message_id)

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

    def on_ack(self, ids: list[str]) -> tuple[list[str], list[str]]:
        self._refuse_unless_serving()
        acked, unknown = [], []
        for message_id in ids:
            try:
                self.node.ack_own(message_id)
            except (UnknownMessage, ValueError):
                unknown.append(message_id)
            else:
                acked.append(message_id)
        return acked, unknown

    # -- nack and touch ------------------------------------------------------

    async def lease(self, message_id: str, mid: MessageId, visibility: float) -> None:
        """Nack (``visibility`` 0) or touch a message owned by a peer."""
        owner = self.links.peers.get(mid.node)
        if owner is None or self.holdings.is_tombstoned(message_id):
            raise UnknownMessage(message_id)
        link = self.links.serving_link(owner)
        if link is None:
            raise NotReady(f"the owner of {message_id} ({mid.node}) is unreachable")
        try:
            answer = await self.links.call(link, cmd.Lease, id=message_id,
                                           visibility=float(visibility))
        except Exception as error:
            raise NotReady(f"the owner of {message_id} did not answer: {error}") from None
        if answer["outcome"] == "unknown":
            raise UnknownMessage(message_id)
        if answer["outcome"] == "not_leased":
            raise NotLeased(message_id)

    def on_lease(self, message_id: str, visibility: float) -> str:
        self._refuse_unless_serving()
        try:
            self.node.change_own_lease(message_id, visibility)
        except UnknownMessage:
            return "unknown"
        except NotLeased:
            return "not_leased"
        return "ok"

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
        except Exception as error:
            raise NotReady(f"the node that took the first push with this key did not "
                           f"answer: {error}") from None
        return answer["id"] or None

    def on_key_lookup(self, key: str, digest: bytes) -> Deferred:
        self._refuse_unless_serving()

        def conflict(failure: Failure) -> None:
            failure.trap(IdempotencyConflict)
            raise cmd.KeyConflict(key)

        d = Deferred.fromCoroutine(self.node.own_key(key, digest))
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
        peer.ready_count = max(0, peer.ready_count - len(records)) if records else 0
        return records

    def on_take(self, count: int, visibility: float) -> bytes:
        self._refuse_unless_serving()
        return encode_records(self.node.take_own(count, visibility))

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

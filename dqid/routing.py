"""Requests for messages owned elsewhere: acks, nacks and touches are sent
to the owner (or, for acks, written as tombstones that reach it); a get with
nothing ready here leases from a peer; an Idempotency-Key first used on
another node is confirmed by that node.

A mixin of :class:`dqid.cluster.Cluster`, which holds the state it uses.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from . import amp_commands as cmd
from .idempotency import IdempotencyConflict
from .ids import MessageId, parse_id
from .node import NotReady
from .peers import CALL_TIMEOUT, Peer
from .queue import NotLeased, UnknownMessage
from .replica import Record
from .wire import decode_records, encode_records

# Forwarded acks per Ack call (ids travel in one AMP value of 64 KiB).
ACK_BATCH = 500


class Routing:
    """Acks, leases, keys and gets for messages owned by peers."""

    async def ack_elsewhere(self, message_id: str, mid: MessageId) -> None:
        """Ack a message this node's queue does not hold."""
        if mid.node == self.me:
            if message_id in self._recovered:
                self._tombstone(message_id)
                return
            raise UnknownMessage(message_id)
        owner = self.peers.get(mid.node)
        if owner is None or self.store.is_tombstoned(message_id):
            raise UnknownMessage(message_id)
        if owner.serving_link(self._now()) is not None:
            if await self._forward_ack(owner, message_id):
                self._released(self.store.tombstone(message_id))
                return
        if self.store.get(message_id) is None:
            raise UnknownMessage(message_id)
        self._tombstone(message_id)

    def _forward_ack(self, owner: Peer, message_id: str) -> Deferred:
        """Fires True if ``owner`` acked ``message_id``, False if it did not
        know it or could not be asked.  The acks of one turn for one owner
        go as one Ack call."""
        waiting: Deferred = Deferred()
        pending = self._ack_batches.get(owner.node_id)
        if pending is None or len(pending) >= ACK_BATCH:
            pending = self._ack_batches[owner.node_id] = {}
            self.clock.callLater(0, self._send_acks, owner, pending)
        pending.setdefault(message_id, []).append(waiting)
        return waiting

    def _send_acks(self, owner: Peer, pending: dict[str, list[Deferred]]) -> None:
        if self._ack_batches.get(owner.node_id) is pending:
            del self._ack_batches[owner.node_id]

        def answered(answer: dict) -> None:
            acked = set(answer["acked"])
            for message_id, waiters in pending.items():
                # One ack took it; a second in the same turn finds it gone.
                first, *rest = waiters
                first.callback(message_id in acked)
                for waiting in rest:
                    waiting.callback(False)

        def failed(failure: Failure) -> None:
            self._call_failed(failure, "ack forward", owner)
            for waiters in pending.values():
                for waiting in waiters:
                    waiting.callback(False)  # tombstone here instead

        link = owner.link()
        if link is None:
            failed(Failure(NotReady(f"{owner.node_id} is unreachable")))
            return
        d = self._call(link, cmd.Ack, ids=list(pending))
        d.addCallbacks(answered, failed)

    async def lease_elsewhere(self, message_id: str, mid: MessageId,
                              visibility: float) -> None:
        """Nack (``visibility`` 0) or touch a message owned by a peer."""
        owner = self.peers.get(mid.node)
        if owner is None or self.store.is_tombstoned(message_id):
            raise UnknownMessage(message_id)
        link = owner.serving_link(self._now())
        if link is None:
            raise NotReady(f"the owner of {message_id} ({mid.node}) is unreachable")
        try:
            answer = await self._call(link, cmd.Lease, id=message_id,
                                      visibility=float(visibility))
        except Exception as error:
            raise NotReady(f"the owner of {message_id} did not answer: {error}") from None
        if answer["outcome"] == "unknown":
            raise UnknownMessage(message_id)
        if answer["outcome"] == "not_leased":
            raise NotLeased(message_id)

    def on_lease(self, message_id: str, visibility: float) -> str:
        if not self.serving:
            raise cmd.NotHolder(self.node.not_ready_reason or "not serving")
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
        owner = self.peers.get(parse_id(first).node)
        link = owner.serving_link(self._now()) if owner is not None else None
        if link is None:
            raise NotReady(
                f"the node that took the first push with this key ({parse_id(first).node}) "
                "is unreachable"
            )
        try:
            answer = await self._call(link, cmd.KeyLookup, timeout=self.replication_timeout
                                      + CALL_TIMEOUT, key=key, digest=digest)
        except cmd.KeyConflict:
            raise IdempotencyConflict(key, first) from None
        except Exception as error:
            raise NotReady(f"the node that took the first push with this key did not "
                           f"answer: {error}") from None
        return answer["id"] or None

    def on_key_lookup(self, key: str, digest: bytes) -> Deferred:
        if not self.serving:
            raise cmd.NotHolder(self.node.not_ready_reason or "not serving")
        def conflict(failure: Failure) -> None:
            failure.trap(IdempotencyConflict)
            raise cmd.KeyConflict(key)

        d = Deferred.fromCoroutine(self.node.own_key(key, digest))
        d.addCallbacks(lambda first: {"id": first or ""}, conflict)
        return d

    def on_ack(self, ids: list[str]) -> tuple[list[str], list[str]]:
        if not self.serving:
            raise cmd.NotHolder(self.node.not_ready_reason or "not serving")
        acked, unknown = [], []
        for message_id in ids:
            try:
                self.node.ack_own(message_id)
            except (UnknownMessage, ValueError):
                unknown.append(message_id)
            else:
                acked.append(message_id)
        return acked, unknown

    # -- gets anywhere -------------------------------------------------------

    def _ready_peers(self) -> list[Peer]:
        peers = [p for p in self.connected() if p.serving]
        peers.sort(key=lambda p: -p.ready)
        return peers

    async def take_remote(self, count: int, visibility: float) -> list[Record]:
        """Lease up to ``count`` messages from a peer with ready work."""
        for peer in self._ready_peers():
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
            answer = await self._call(link, cmd.Take, count=count,
                                      visibility=float(visibility))
        except Exception as error:
            self.log.debug("take from {peer} failed: {error}", peer=peer.node_id, error=error)
            return []
        records = decode_records(answer["records"])
        peer.ready = max(0, peer.ready - len(records)) if records else 0
        return records

    def on_take(self, count: int, visibility: float) -> bytes:
        if not self.serving:
            raise cmd.NotHolder(self.node.not_ready_reason or "not serving")
        return encode_records(self.node.take_own(count, visibility))

    def feed_waiters(self) -> None:
        """Serve parked long polls from peers that have ready work."""
        if self._feeding or not self.node.has_waiters():
            return
        candidates = [p for p in self._ready_peers() if p.ready > 0]
        if not candidates:
            return
        self._feeding = True
        d = Deferred.fromCoroutine(self._feed(candidates))
        d.addErrback(lambda f: self.log.failure("feeding long polls failed", f))

    async def _feed(self, candidates: list[Peer]) -> None:
        try:
            for peer in candidates:
                while peer.ready > 0:
                    waiter = self.node.claim_waiter()
                    if waiter is None:
                        return
                    records = await self._take_from(peer, waiter.count, waiter.visibility)
                    if not self.node.answer_waiter(waiter, records):
                        break
        finally:
            self._feeding = False


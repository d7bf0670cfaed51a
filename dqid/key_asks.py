"""Which message an Idempotency-Key already names, across the cluster.

A push under a key this node knows (its own push, or a peer's copy) is
answered with the first id once that push is confirmed accepted: by this
node for its own, by the owner for a copy.  A key not known here is asked
of every peer before a push under it is queued, since a retry may come here
before the first push's copy does.  Of two nodes asking about one key at
once, the one with the lower node id queues: it holds the other's ask until
its push is queued (and then until that push settles), and the other
answers it "none" at once and asks again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from .errors import NotReplicated
from .idempotency import IdempotencyIndex
from .ids import parse_id


class KeyRemote(Protocol):
    """What the asking needs of the cluster (the node's Remote)."""

    def find_key(self, key: str, digest: bytes) -> Deferred:
        """The id a peer accepted under ``key`` (unknown here), or None."""

    async def confirm_key(self, key: str, digest: bytes, first: str) -> str | None:
        """The id the owner of ``first`` accepted under ``key``, or None."""


class KeyOwner(Protocol):
    """The node whose pushes the keys name."""

    node_id: str
    clock: IReactorTime
    idempotency: IdempotencyIndex
    remote: KeyRemote | None  # None: a standalone node

    def outcome_of(self, message_id: str) -> Deferred:
        """Fires when a push is accepted; fails with NotReplicated if not."""


@dataclass(eq=False)
class KeyAsk:
    """An Idempotency-Key this node is asking its peers about."""

    waiters: list[Deferred] = field(default_factory=list)  # until it is over
    yielded: bool = False  # to a peer with a lower id that asked meanwhile


class KeyAsks:
    """The keys a node is asking its peers about, and the answers to
    peers asking it."""

    def __init__(self, owner: KeyOwner) -> None:
        self.owner = owner
        self._asking: dict[str, KeyAsk] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._asking

    async def first_under(self, key: str, digest: bytes) -> str | None:
        """The accepted id of an earlier push under ``key``, or None when
        the key is free.  When None, the key stays marked as asked about
        until the caller has queued its push (and begun to replicate it)
        and called :meth:`asked`."""
        owner = self.owner
        index = owner.idempotency
        while True:
            first = index.lookup(key, digest, owner.clock.seconds())
            if first is not None:
                first = await self._confirm(key, digest, first)
                if first is not None or owner.remote is None:
                    return first
                continue  # withdrawn, and forgotten here: ask the peers
            if owner.remote is None:
                return None
            asking = self._asking.get(key)
            if asking is not None:  # another push here asks about it
                await self._after(asking)
                continue
            asking = self._asking[key] = KeyAsk()
            try:
                found = await owner.remote.find_key(key, digest)
                # A copy under the key may have come while we asked.
                first = index.lookup(key, digest, owner.clock.seconds())
            except BaseException:
                self.asked(key)
                raise
            if first is None and found is None and not asking.yielded:
                return None  # the key is free: still marked as asked about
            self.asked(key)
            if first is None and found is not None:
                return found

    def asked(self, key: str) -> None:
        """The ask about ``key`` is over (and its push queued, if any)."""
        asking = self._asking.pop(key, None)
        if asking is not None:
            for waiter in asking.waiters:
                waiter.callback(None)

    async def _confirm(self, key: str, digest: bytes, first: str) -> str | None:
        """The accepted id of an earlier push under ``key``, or None when
        that push was never accepted (withdrawn) and the key is free."""
        owner = self.owner
        if parse_id(first).node == owner.node_id or owner.remote is None:
            await owner.outcome_of(first)  # NotReplicated if it is withdrawn
            return first
        # Only the owner knows whether its push was accepted or withdrawn.
        confirmed = await owner.remote.confirm_key(key, digest, first)
        if confirmed is None:
            owner.idempotency.discard(key, first)
        return confirmed

    async def own_key(self, key: str, digest: bytes, asker: str) -> str | None:
        """For peer ``asker``: our accepted id under ``key``; None if there
        is none.  Waits for a push still being replicated, and for an ask
        of ours about the key when ``asker`` yields to us."""
        owner = self.owner
        asking = self._asking.get(key)
        if asking is not None:
            if asker < owner.node_id:
                asking.yielded = True  # the asker may queue: ask again
                return None
            await self._after(asking)
        first = owner.idempotency.lookup(key, digest, owner.clock.seconds())
        if first is None or parse_id(first).node != owner.node_id:
            return None
        try:
            await owner.outcome_of(first)
        except NotReplicated:
            return None
        return first

    @staticmethod
    def _after(asking: KeyAsk) -> Deferred:
        waiter: Deferred = Deferred()
        asking.waiters.append(waiter)
        return waiter

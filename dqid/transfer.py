"""State transfer between peers (anti-entropy) and recovery at start.

Whenever a peer comes up a node pulls that peer's whole state (its queue,
its replicas, its tombstones and known epochs) and merges it in: the merge
is a union, so repeating it is harmless.  Again every
``anti_entropy_interval`` a serving node pulls once more, saying what it
has seen (protocol 5): the peer's pages then carry only the records it
lacks and the peer's own messages whose state changed from fresh, so a
periodic pass costs what differs, not the size of the queue.  A starting
node serves only once it has merged from enough peers; then it takes an
epoch above every one seen for its id.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from . import amp_commands as cmd
from .holdings import Holdings
from .links import Links
from .peers import Link, Peer
from .readiness import Phase, Readiness
from .replica import Record
from .timings import Timings
from .tombstones import Tombstones
from .wire import (
    decode_epochs, decode_records, decode_tombstones, encode_epochs, encode_records,
    encode_tombstones,
)

SYNC_PAGE_BYTES = 1 << 20
SYNC_PAGE_RECORDS = 2000
# A summary of what a node has seen with more ranges than this (about a
# megabyte) is not sent: the pull is a whole one.
MAX_SEEN_RANGES = 50_000


class Recovering(Protocol):
    """What StateTransfer needs of the node that recovers."""

    readiness: Readiness

    def start_epoch(self, epoch: int) -> None: ...

    def restore(self, records: list[Record]) -> None: ...


@dataclass(eq=False)
class SyncState:
    """How far a sync from one peer got since it came up."""

    syncing: bool = False
    synced: bool = False  # a full sync from it finished since it came up
    synced_serving: bool = False  # ... and it was serving at the time
    synced_at: float = float("-inf")


@dataclass(eq=False)
class SyncSession:
    """A peer paging through a snapshot of this node's state."""

    records: Iterator[Any]
    timer: IDelayedCall | None = None


class StateTransfer:
    log = Logger()

    def __init__(self, node: Recovering, links: Links, holdings: Holdings,
                 clock: IReactorTime, timings: Timings, min_copies: int,
                 fence: Callable[[str], None], recovered: Callable[[int], None]) -> None:
        self.node = node
        self.links = links
        self.holdings = holdings
        self.clock = clock
        self.timings = timings
        self.fence = fence  # a newer epoch of this node exists
        self.recovered = recovered  # recovery ended: announce the epoch
        nodes = len(links.members)
        # Any N - K + 1 nodes hold at least one copy of every accepted message.
        self.syncs_needed = min(nodes - min_copies + 1, nodes - 1)
        self.state = {name: SyncState() for name in links.peers}
        self._sessions: dict[str, SyncSession] = {}
        self._started = clock.seconds()
        self._grace_timer: IDelayedCall | None = None

    def start(self) -> None:
        self._started = self.clock.seconds()
        self.maybe_finish_recovery()

    def stop(self) -> None:
        if self._grace_timer is not None and self._grace_timer.active():
            self._grace_timer.cancel()
        for session in self._sessions.values():
            if session.timer is not None and session.timer.active():
                session.timer.cancel()
        self._sessions.clear()

    def synced(self, peer: Peer) -> bool:
        return self.state[peer.node_id].synced

    def peer_down(self, peer: Peer) -> None:
        state = self.state[peer.node_id]
        state.synced = state.synced_serving = False

    # -- pulling a peer's state ----------------------------------------------

    def sync_if_due(self, peer: Peer) -> None:
        """Anti-entropy: pull ``peer``'s state again if it is time."""
        state = self.state[peer.node_id]
        if state.synced and self.links.now() - state.synced_at > self.timings.anti_entropy_interval:
            self.start_sync(peer, again=True)

    def start_sync(self, peer: Peer, again: bool = False) -> None:
        """Pull ``peer``'s state once it is up (``again``: anti-entropy)."""
        state = self.state[peer.node_id]
        if (state.synced and not again) or state.syncing or not peer.links:
            return
        state.syncing = True
        d = Deferred.fromCoroutine(self._sync_from(peer, state, periodic=state.synced))
        d.addErrback(lambda f: self.log.failure("sync from {peer} failed", f,
                                                peer=peer.node_id))

    async def _sync_from(self, peer: Peer, state: SyncState, periodic: bool) -> None:
        try:
            link = peer.link()
            if link is None:
                return
            serving = peer.serving
            start = await self.links.call(link, cmd.SyncStart,
                                          seen=self._summary(link, periodic))
            written = self.holdings.merge_tombstones(decode_tombstones(start["tombstones"]))
            if written is not None:
                written.addErrback(lambda f: None)  # the Durability logs a failed disk
            newer = self.holdings.merge_epochs(decode_epochs(start["epochs"]))
            if newer is not None:
                self.fence(f"epoch {newer} of {self.links.me} exists")
            more, count = True, 0
            while more:
                page = await self.links.call(link, cmd.SyncPage, token=start["token"])
                records = decode_records(page["records"])
                count += len(records)
                self.holdings.merge_records(records, source=peer.node_id)
                more = page["more"]
        except Exception as error:
            self.log.warn("sync from {peer} failed ({error}); retrying",
                          peer=peer.node_id, error=error)
            state.syncing = False
            self.clock.callLater(self.timings.resync_delay, self.start_sync, peer)
            return
        state.syncing = False
        if not peer.links:
            return
        again = state.synced  # periodic anti-entropy, not a peer coming up
        state.synced = True
        state.synced_serving = state.synced_serving or serving
        state.synced_at = self.links.now()
        log = self.log.debug if again else self.log.info
        log("synced {count} records from {peer}", count=count, peer=peer.node_id)
        self.maybe_finish_recovery()

    def _summary(self, link: Link, periodic: bool) -> bytes | None:
        """What this node has seen, for a periodic pull over ``link`` (the
        peer then pages only what differs); None for a whole pull: when a
        peer comes up, while this node is not serving, to a protocol 4
        peer, or when the summary would be too long."""
        if not (periodic and link.version >= cmd.SEEN_SUMMARIES
                and self.node.readiness.serving):
            return None
        seen = self.holdings.seen()
        if seen.range_count() > MAX_SEEN_RANGES:
            return None
        return encode_tombstones(seen)

    # -- serving a peer's pull -----------------------------------------------

    def on_sync_start(self, seen: Tombstones | None = None) -> dict:
        token = uuid.uuid4().hex
        total, snapshot = self.holdings.snapshot(seen)
        session = SyncSession(snapshot)
        self._sessions[token] = session
        self._touch_session(token, session)
        return {
            "token": token,
            "tombstones": encode_tombstones(self.holdings.store.tombstones),
            "epochs": encode_epochs(self.holdings.epochs()),
            "total": total,
        }

    def on_sync_page(self, token: str) -> dict:
        session = self._sessions.get(token)
        if session is None:
            raise cmd.UnknownSync(token)
        page: list[Any] = []
        size = 0
        for message in session.records:
            page.append(message)
            size += len(message.body) + 64
            if size >= SYNC_PAGE_BYTES or len(page) >= SYNC_PAGE_RECORDS:
                break
        more = bool(page) and (size >= SYNC_PAGE_BYTES or len(page) >= SYNC_PAGE_RECORDS)
        if more:
            self._touch_session(token, session)
        else:
            self._end_session(token)
        return {"records": encode_records(page), "more": more}

    def _touch_session(self, token: str, session: SyncSession) -> None:
        if session.timer is not None and session.timer.active():
            session.timer.cancel()
        session.timer = self.clock.callLater(self.timings.sync_session_idle,
                                             self._end_session, token)

    def _end_session(self, token: str) -> None:
        session = self._sessions.pop(token, None)
        if session is not None and session.timer is not None and session.timer.active():
            session.timer.cancel()

    # -- recovery ------------------------------------------------------------

    def recovery_reason(self) -> str:
        synced = sum(1 for s in self.state.values() if s.synced_serving)
        return f"recovering: synced from {synced} of {self.syncs_needed} peers needed"

    def maybe_finish_recovery(self) -> None:
        """Serve once enough peers are synced.

        ``syncs_needed`` serving peers have seen every accepted message, but
        a withdrawn push's tombstone may be missing on one of them; so,
        within ``recovery_grace`` of start, also wait for every peer that is
        up, whose tombstones then win.
        """
        readiness = self.node.readiness
        if readiness.phase is not Phase.RECOVERING:
            return
        serving_synced = sum(1 for s in self.state.values() if s.synced_serving)
        all_synced = all(s.synced for s in self.state.values())
        if not all_synced and serving_synced < self.syncs_needed:
            readiness.set(Phase.RECOVERING, self.recovery_reason())
            return
        waited = self.links.now() - self._started
        grace = self.timings.recovery_grace
        if not all_synced and waited < grace:
            readiness.set(Phase.RECOVERING,
                          self.recovery_reason() + "; waiting briefly for the other peers")
            if self._grace_timer is None or not self._grace_timer.active():
                self._grace_timer = self.clock.callLater(grace - waited,
                                                         self.maybe_finish_recovery)
            return
        self._finish_recovery()

    def _finish_recovery(self) -> None:
        if self._grace_timer is not None and self._grace_timer.active():
            self._grace_timer.cancel()
        me = self.links.me
        epoch = max(self.holdings.known_epoch(me) + 1, int(self.links.now() * 1000))
        self.holdings.serve_as(epoch)
        recovered = self.holdings.take_recovered()
        self.node.start_epoch(epoch)
        self.node.readiness.set(Phase.SERVING)
        self.node.restore(recovered)
        self.log.info("recovered {count} messages; serving as epoch {epoch}",
                      count=len(recovered), epoch=epoch)
        self.recovered(epoch)

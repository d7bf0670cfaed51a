"""State transfer between peers (anti-entropy) and recovery at start.

Whenever a peer comes up, a node pulls that peer's whole state (its queue,
its replicas, its tombstones and known epochs) and merges it in: the merge
is a union, so repeating it is harmless.  A starting node serves only once
it has merged from enough peers; then it takes an epoch above every one
seen for its id and announces it.

A mixin of :class:`dqid.cluster.Cluster`, which holds the state it uses.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall

from . import amp_commands as cmd
from .idempotency import body_digest
from .peers import Peer
from .queue import PENDING
from .replica import Record
from .wire import decode_records, decode_tombstones, encode_records, encode_tombstones

SYNC_PAGE_BYTES = 1 << 20
SYNC_PAGE_RECORDS = 2000
SYNC_SESSION_IDLE = 60.0
RESYNC_DELAY = 1.0
# Anti-entropy: each peer's state is pulled again this often, so a copy or
# tombstone that missed a peer whose link never dropped still arrives.
ANTI_ENTROPY_INTERVAL = 10.0
# A recovering node waits up to this long for every peer to sync.
RECOVERY_GRACE = 2.0


@dataclass(eq=False)
class _SyncSession:
    records: Iterator[Any]
    timer: IDelayedCall | None = None


class StateTransfer:
    """Pulling a peer's whole state, and recovery at start."""

    def _start_sync(self, peer: Peer, again: bool = False) -> None:
        """Pull ``peer``'s state once it is up (``again``: anti-entropy)."""
        if (peer.synced and not again) or peer.syncing or not peer.links:
            return
        peer.syncing = True
        d = Deferred.fromCoroutine(self._sync_from(peer))
        d.addErrback(lambda f: self.log.failure("sync from {peer} failed", f,
                                                peer=peer.node_id))

    async def _sync_from(self, peer: Peer) -> None:
        try:
            link = peer.link()
            if link is None:
                return
            serving = peer.serving
            start = await self._call(link, cmd.SyncStart)
            self._merge_tombstones(decode_tombstones(start["tombstones"]))
            self._merge_epochs(json.loads(start["epochs"]))
            more, count = True, 0
            while more:
                page = await self._call(link, cmd.SyncPage, token=start["token"])
                records = decode_records(page["records"])
                count += len(records)
                self._merge_records(records)
                more = page["more"]
        except Exception as error:
            self.log.warn("sync from {peer} failed ({error}); retrying",
                          peer=peer.node_id, error=error)
            peer.syncing = False
            self.clock.callLater(RESYNC_DELAY, self._start_sync, peer)
            return
        peer.syncing = False
        if not peer.links:
            return
        again = peer.synced  # periodic anti-entropy, not a peer coming up
        peer.synced = True
        peer.synced_serving = peer.synced_serving or serving
        peer.synced_at = self._now()
        log = self.log.debug if again else self.log.info
        log("synced {count} records from {peer}", count=count, peer=peer.node_id)
        self._maybe_finish_recovery()

    def _merge_epochs(self, epochs: dict[str, int]) -> None:
        for owner, epoch in epochs.items():
            if owner == self.me and self.serving and epoch > self.node.epoch:
                self._fence(f"epoch {epoch} of {self.me} exists")
            # Our own too: recovery must pick an epoch above every one seen.
            self.store.note_epoch(owner, int(epoch))

    def _merge_records(self, records: Iterable[Record]) -> int:
        """Union ``records`` in; how many were new."""
        added = 0
        for record in records:
            mid = record.mid
            if mid.node != self.me:
                if self.store.add(record):
                    added += 1
                    self._remember_key(record)
                continue
            if self.store.is_tombstoned(record.id):
                continue
            if self.recovering:
                self._recovered.setdefault(record.id, record)
            elif mid.epoch < self.node.epoch and record.id not in self.node.queue:
                # Our own message from before a restart, reaching us late.
                self.node.restore([record])
        return added

    def _remember_key(self, record: Record) -> None:
        if record.key is not None:
            self.node.idempotency.remember(record.key, body_digest(record.body), record.id)

    def on_sync_start(self) -> dict:
        token = uuid.uuid4().hex
        own = [m for m in self.node.queue.messages() if m.state != PENDING]
        snapshot = [*own, *self._recovered.values(), *self.store.records()]
        epochs = dict(self.store.epochs)
        if self.serving:
            epochs[self.me] = self.node.epoch
        session = _SyncSession(iter(snapshot))
        self._sessions[token] = session
        self._touch_session(token, session)
        return {
            "token": token,
            "tombstones": encode_tombstones(self.store.tombstones),
            "epochs": json.dumps(epochs).encode("utf-8"),
            "total": len(snapshot),
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

    def _touch_session(self, token: str, session: _SyncSession) -> None:
        if session.timer is not None and session.timer.active():
            session.timer.cancel()
        session.timer = self.clock.callLater(SYNC_SESSION_IDLE, self._end_session, token)

    def _end_session(self, token: str) -> None:
        session = self._sessions.pop(token, None)
        if session is not None and session.timer is not None and session.timer.active():
            session.timer.cancel()

    # -- recovery ------------------------------------------------------------

    def _maybe_finish_recovery(self) -> None:
        """Serve once enough peers are synced.

        ``syncs_needed`` serving peers have seen every accepted message, but
        a withdrawn push's tombstone may be missing on one of them; so,
        within ``RECOVERY_GRACE`` of start, also wait for every peer that is
        up, whose tombstones then win.
        """
        if not self.recovering:
            return
        serving_synced = sum(1 for p in self.peers.values() if p.synced_serving)
        all_synced = all(p.synced for p in self.peers.values())
        if not all_synced and serving_synced < self.syncs_needed:
            self.node.set_not_ready(self._recovery_reason())
            return
        waited = self._now() - self._started
        if not all_synced and waited < RECOVERY_GRACE:
            self.node.set_not_ready(
                self._recovery_reason() + "; waiting briefly for the other peers"
            )
            if self._grace_timer is None or not self._grace_timer.active():
                self._grace_timer = self.clock.callLater(
                    RECOVERY_GRACE - waited, self._maybe_finish_recovery
                )
            return
        self._finish_recovery()

    def _finish_recovery(self) -> None:
        if self._grace_timer is not None and self._grace_timer.active():
            self._grace_timer.cancel()
        known = self.store.epochs.get(self.me, 0)
        epoch = max(known + 1, int(self._now() * 1000))
        self.store.note_epoch(self.me, epoch)
        recovered = sorted(self._recovered.values(), key=lambda r: r.mid[1:])
        self._recovered.clear()
        self.recovering = False
        self.node.start_epoch(epoch)
        self.node.restore(recovered)
        self.node.set_not_ready(None)
        self.log.info("recovered {count} messages; serving as epoch {epoch}",
                      count=len(recovered), epoch=epoch)
        for peer in self.peers.values():
            for link in list(peer.links):
                d = self._call(link, cmd.Announce, node=self.me, epoch=epoch)
                d.addErrback(self._call_failed, "announce", peer)

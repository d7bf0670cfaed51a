"""Idempotency keys for pushes: pure state, time passed in.

A key maps to the digest of the body first pushed with it and to that push's
message id.  It is remembered while the message is queued and for
``retain_after_ack`` seconds after its ack; a withdrawn push forgets it.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass


def body_digest(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=16).digest()


class IdempotencyConflict(Exception):
    """The key was used before with another body."""

    def __init__(self, key: str, message_id: str) -> None:
        super().__init__(key, message_id)
        self.key = key
        self.message_id = message_id


@dataclass(slots=True)
class _Entry:
    digest: bytes
    message_id: str
    forget_at: float | None = None


class IdempotencyIndex:
    def __init__(self, retain_after_ack: float = 300.0) -> None:
        self.retain_after_ack = retain_after_ack
        self._entries: dict[str, _Entry] = {}
        self._expiring: deque[tuple[float, str]] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: str, digest: bytes, now: float) -> str | None:
        """The id first pushed with ``key``, None if the key is new.

        Raises IdempotencyConflict when the key came with another body.
        """
        self.sweep(now)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.digest != digest:
            raise IdempotencyConflict(key, entry.message_id)
        return entry.message_id

    def remember(self, key: str, digest: bytes, message_id: str) -> None:
        self._entries[key] = _Entry(digest, message_id)

    def remember_copy(self, key: str, digest: bytes, message_id: str) -> None:
        """A peer's copy under ``key`` is held here: remembered, unless the
        key names a message still queued (not released), this node's own
        push above all: its answer to a peer asking about the key must stay
        that push's id."""
        entry = self._entries.get(key)
        if entry is None or entry.forget_at is not None:
            self._entries[key] = _Entry(digest, message_id)

    def released(self, key: str, now: float) -> None:
        """The key's message was acked: forget the key after the window."""
        entry = self._entries.get(key)
        if entry is None or entry.forget_at is not None:
            return
        entry.forget_at = now + self.retain_after_ack
        self._expiring.append((entry.forget_at, key))

    def discard(self, key: str, message_id: str) -> None:
        """The push under ``key`` was withdrawn: the key is free again."""
        entry = self._entries.get(key)
        if entry is not None and entry.message_id == message_id:
            del self._entries[key]

    def sweep(self, now: float) -> None:
        expiring = self._expiring
        while expiring and expiring[0][0] <= now:
            forget_at, key = expiring.popleft()
            entry = self._entries.get(key)
            if entry is not None and entry.forget_at == forget_at:
                del self._entries[key]

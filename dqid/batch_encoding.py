"""A turn's pushes as the bytes a Stream box carries them in, made once per
turn for every peer that gets them: a packed run (protocol 4) when they
are one, else records (``wire.encode_records``, what protocol 3 reads)."""

from __future__ import annotations

from operator import attrgetter
from typing import Sequence

from .ids import consecutive_ids, parse_id, to_base36
from .queue import PENDING, Message
from .wire import RUN_MIN_RECORDS, encode_records, encode_run

_ID, _BODY = attrgetter("id"), attrgetter("body")
_STATE, _DEADLINE = attrgetter("state"), attrgetter("deadline")
_DELIVERIES = attrgetter("deliveries")
_CONTENT_TYPE, _KEY = attrgetter("content_type"), attrgetter("key")


def packed_run(messages: Sequence[Message]) -> bytes | None:
    """``messages`` as a packed run (``wire.encode_run``), or None when
    they are not one: fewer than ``RUN_MIN_RECORDS``, not all pending
    pushes with no delay and no key, of one content type, with the
    consecutive ids of one epoch.  Checked with C loops (``map``), not a
    Python loop per message."""
    count = len(messages)
    if count < RUN_MIN_RECORDS:
        return None
    first = messages[0]
    if set(map(type, messages)) != {Message} and (
            len(set(map(_CONTENT_TYPE, messages))) != 1 or any(map(_KEY, messages))):
        return None
    if (set(map(_STATE, messages)) != {PENDING} or any(map(_DEADLINE, messages))
            or any(map(_DELIVERIES, messages))):
        return None
    mid = parse_id(first.id)
    prefix = first.id[:-len(to_base36(mid.seq))]
    if list(map(_ID, messages)) != consecutive_ids(prefix, mid.seq, count):
        return None
    return encode_run(first.id, first.content_type, list(map(_BODY, messages)))


class EncodedBatches:
    """The messages of one set of batches, encoded as each link needs."""

    __slots__ = ("messages", "_run", "_records")

    def __init__(self, messages: Sequence[Message]) -> None:
        self.messages = messages
        self._run: bytes | None | bool = False  # False: not tried yet
        self._records: bytes | None = None

    def run(self) -> bytes | None:
        if self._run is False:
            self._run = packed_run(self.messages)
        return self._run  # type: ignore[return-value]

    def records(self) -> bytes:
        if self._records is None:
            self._records = encode_records(self.messages)
        return self._records

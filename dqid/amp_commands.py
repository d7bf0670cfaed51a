"""The AMP commands dqid nodes speak to each other (protocol version 3:
Replicate, Tombstones and States became the unanswered ``Stream`` and its
cumulative acknowledgement ``Copied``).

Every connection starts with :class:`Hello`; after it, either side may call
any command on it.  Byte payloads (records, tombstones) may exceed AMP's
65,535-byte value limit, so they travel as :class:`Chunked`.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache

from twisted.protocols import amp

from .amp_framing import frame_box
from .wire import WireError, join_chunks

PROTOCOL_MIN = 3
PROTOCOL_MAX = 5
# Protocol 4: a Stream box may carry its records as a packed run.
PACKED_RUNS = 4
# Protocol 5: an anti-entropy SyncStart may say what the caller has seen.
SEEN_SUMMARIES = 5

CHUNK = amp.MAX_VALUE_LENGTH


class Chunked(amp.Argument):
    """Bytes of any length, split over keys ``name``, ``name.1``, ...

    ``name`` holds the number of chunks; each chunk is at most one AMP value.
    An optional one is left out of the box when it is None.
    """

    def toBox(self, name, strings, objects, proto):
        value = objects.get(_identifier(name))
        if value is None and self.optional:
            return
        self.put(name, value, strings)

    @staticmethod
    def put(name: bytes, value: bytes, strings: dict[bytes, bytes]) -> None:
        """``value`` into ``strings`` as its count and chunks."""
        chunks = [value[i:i + CHUNK] for i in range(0, len(value), CHUNK)] or [b""]
        strings[name] = b"%d" % len(chunks)
        for index, chunk in enumerate(chunks):
            strings[b"%s.%d" % (name, index + 1)] = chunk

    def fromBox(self, name, strings, objects, proto):
        if self.optional and name not in strings:
            objects[_identifier(name)] = None
            return
        # A forged count or a missing chunk is a WireError (BAD_INPUT).
        objects[_identifier(name)] = join_chunks(strings, name)


def encode_unanswered(command: type[amp.Command], values: dict) -> bytes:
    """The framed box of an unanswered ``command`` (``requiresAnswer``
    False) with ``values``, the bytes AMP would send, without its per-call
    Command machinery: the replication stream is the hot path, and AMP's
    own encoding costs more than the rest of a box."""
    box = {amp.COMMAND: command.commandName}
    for name, identifier, argument in _arguments(command):
        value = values.get(identifier)
        if value is None:
            if not argument.optional:
                raise TypeError(f"{command.__name__} needs {name!r}")
        elif isinstance(argument, Chunked):
            argument.put(name, value, box)
        else:
            box[name] = argument.toString(value)
    return frame_box(box)


def decode_unanswered(command: type[amp.Command], box: Mapping[bytes, bytes]) -> dict:
    """The values of an unanswered ``command``'s ``box``, as keyword
    arguments; a missing, unparseable or forged value is a WireError."""
    values = {}
    for name, identifier, argument in _arguments(command):
        if isinstance(argument, Chunked):
            values[identifier] = (None if argument.optional and name not in box
                                  else join_chunks(box, name))
            continue
        raw = box.get(name)
        if raw is None:
            if not argument.optional:
                raise WireError(f"{command.__name__} without {identifier}")
            values[identifier] = None
            continue
        try:
            values[identifier] = argument.fromString(raw)
        except (ValueError, TypeError) as error:  # UnicodeDecodeError too
            raise WireError(f"{command.__name__} {identifier}: {error}"[:200]) from None
    return values


@cache
def _arguments(command: type[amp.Command]) -> tuple[tuple[bytes, str, amp.Argument], ...]:
    """A command's arguments as (wire name, Python name, Argument)."""
    return tuple((name, _identifier(name), argument) for name, argument in command.arguments)


def _identifier(name: bytes) -> str:
    """The Python name of an argument's wire name (as AMP spells them)."""
    return name.decode("ascii").replace("-", "_")


class ClusterMismatch(Exception):
    """The two nodes were not configured with the same set of node ids."""


class NoCommonVersion(Exception):
    """The two nodes share no protocol version."""


class StaleEpoch(Exception):
    """The caller is an older incarnation of its node id: it is fenced."""


class NotHolder(Exception):
    """The callee cannot serve this now (recovering, fenced, stopping)."""


class KeyConflict(Exception):
    """The Idempotency-Key was first used with another body; its
    description is the id first pushed under the key."""


class UnknownSync(Exception):
    """The sync session expired or never existed; start again."""


def negotiate(local_min: int, local_max: int, remote_min: int, remote_max: int) -> int | None:
    """The best protocol version both sides speak, or None."""
    best = min(local_max, remote_max)
    return best if best >= max(local_min, remote_min) else None


COMMON_ERRORS = {
    WireError: b"BAD_INPUT",
    StaleEpoch: b"STALE_EPOCH",
    NotHolder: b"NOT_HOLDER",
}


# What Copied says of records it did not take: an error code, or a failed disk.
DISK_FAILED = "DISK"
REFUSAL_CODES = frozenset({*(code.decode("ascii") for code in COMMON_ERRORS.values()),
                           DISK_FAILED})


class Hello(amp.Command):
    """First call on a connection: versions, ids, cluster membership, epoch.

    ``epoch`` 0 means the caller is still recovering and has none yet.
    ``software`` (both ways) is the dqid release, for the log; optional, so
    a peer that does not send it still speaks protocol 2.
    """

    arguments = [
        (b"version_min", amp.Integer()),
        (b"version_max", amp.Integer()),
        (b"node", amp.Unicode()),
        (b"epoch", amp.Integer()),
        (b"cluster", amp.ListOf(amp.Unicode())),
        (b"software", amp.Unicode(optional=True)),
    ]
    response = [
        (b"version", amp.Integer()),
        (b"node", amp.Unicode()),
        (b"epoch", amp.Integer()),
        (b"serving", amp.Boolean()),
        (b"software", amp.Unicode(optional=True)),
    ]
    errors = {
        ClusterMismatch: b"CLUSTER_MISMATCH",
        NoCommonVersion: b"NO_COMMON_VERSION",
        **COMMON_ERRORS,
    }


class Announce(amp.Command):
    """The caller finished recovery and serves with ``epoch`` from now on."""

    arguments = [(b"node", amp.Unicode()), (b"epoch", amp.Integer())]
    response: list = []
    errors = dict(COMMON_ERRORS)


class Heartbeat(amp.Command):
    """Liveness both ways, with each side's count of ready messages."""

    arguments = [
        (b"node", amp.Unicode()),
        (b"epoch", amp.Integer()),
        (b"ready", amp.Integer()),
        (b"serving", amp.Boolean()),
    ]
    response = [
        (b"epoch", amp.Integer()),
        (b"ready", amp.Integer()),
        (b"serving", amp.Boolean()),
    ]
    errors = dict(COMMON_ERRORS)


class Stream(amp.Command):
    """What a turn of the caller changed, for the callee to hold (not
    answered; see :mod:`dqid.stream`): its new records; the states of its
    own messages that changed (``wire.encode_states``); tombstones of any
    owner.  A box with records, or with acks of the callee's messages that
    the callee must confirm, or with tombstones now and then (to learn that
    the boxes before it arrived), is numbered ``seq`` on this link, and the
    callee acknowledges it with ``Copied``.  ``epoch`` is the caller's
    serving epoch.  From protocol 4 (``PACKED_RUNS``) the new records may
    come as ``run`` instead, one packed run (``wire.encode_run``)."""

    arguments = [
        (b"epoch", amp.Integer()),
        (b"seq", amp.Integer(optional=True)),
        (b"records", Chunked(optional=True)),
        (b"run", Chunked(optional=True)),
        (b"states", Chunked(optional=True)),
        (b"tombstones", Chunked(optional=True)),
    ]
    response: list = []
    requiresAnswer = False


class Copied(amp.Command):
    """The callee's records numbered up to ``upto`` on this link are held
    by the caller (cumulative, not answered).  ``holder`` is False when the
    caller stored them but may not count as a holder yet (it is
    recovering); ``refused`` is an error code (``STALE_EPOCH``,
    ``NOT_HOLDER``, ``BAD_INPUT``, ``DISK``) when it did not take them."""

    arguments = [
        (b"upto", amp.Integer()),
        (b"holder", amp.Boolean()),
        (b"refused", amp.Unicode(optional=True)),
    ]
    response: list = []
    requiresAnswer = False


class Ack(amp.Command):
    """Acks forwarded to the owner of ``ids``."""

    arguments = [(b"ids", amp.ListOf(amp.Unicode()))]
    response = [
        (b"acked", amp.ListOf(amp.Unicode())),
        (b"unknown", amp.ListOf(amp.Unicode())),
    ]
    errors = dict(COMMON_ERRORS)


class Lease(amp.Command):
    """Change the lease of one of the callee's own messages: ``action``
    "nack" (ready again, after ``delay`` s), "touch" (the lease runs
    ``visibility`` s from now) or "kick" (a held message ready again); nack
    and touch act only on the lease ``receipt`` names.  ``outcome`` is "ok",
    "unknown", "not_leased", "lease_lost" or "not_held"."""

    arguments = [
        (b"id", amp.Unicode()),
        (b"action", amp.Unicode()),
        (b"receipt", amp.Unicode(optional=True)),
        (b"visibility", amp.Float(optional=True)),
        (b"delay", amp.Float(optional=True)),
    ]
    response = [(b"outcome", amp.Unicode())]
    errors = dict(COMMON_ERRORS)


class Peek(amp.Command):
    """One of the callee's own messages and its state, changing nothing:
    ``records`` holds it (empty when it is not queued)."""

    arguments = [(b"id", amp.Unicode())]
    response = [(b"records", Chunked()), (b"state", amp.Unicode())]
    errors = dict(COMMON_ERRORS)


class HeldList(amp.Command):
    """Up to ``count`` of the callee's own held messages, oldest first."""

    arguments = [(b"count", amp.Integer())]
    response = [(b"records", Chunked())]
    errors = dict(COMMON_ERRORS)


class KeyLookup(amp.Command):
    """Is there an accepted message of the callee's under this
    Idempotency-Key?  Answers once a push still being replicated settles.
    ``id`` is "" when there is none (never pushed, or withdrawn)."""

    arguments = [(b"key", amp.Unicode()), (b"digest", amp.String())]
    response = [(b"id", amp.Unicode())]
    errors = {KeyConflict: b"KEY_CONFLICT", **COMMON_ERRORS}


class Take(amp.Command):
    """Lease up to ``count`` of the callee's own ready messages; each
    lease's receipt, in the order of ``records``."""

    arguments = [(b"count", amp.Integer()), (b"visibility", amp.Float())]
    response = [(b"records", Chunked()), (b"receipts", amp.ListOf(amp.Unicode()))]
    errors = dict(COMMON_ERRORS)


class SyncStart(amp.Command):
    """Begin a state transfer: the callee's tombstones and known epochs now,
    and a token to page through every record it holds (its own queue and
    its replicas of every peer).

    From protocol 5 (``SEEN_SUMMARIES``) a serving caller's periodic pull
    sends ``seen``, the ids it holds or knows gone, as tombstones are
    encoded; the pages then leave out what the caller's merge would take
    nothing from (``Holdings.snapshot``)."""

    arguments = [(b"seen", Chunked(optional=True))]
    response = [
        (b"token", amp.Unicode()),
        (b"tombstones", Chunked()),
        (b"epochs", Chunked()),
        (b"total", amp.Integer()),
    ]
    errors = dict(COMMON_ERRORS)


class SyncPage(amp.Command):
    """The next page of records of a sync session."""

    arguments = [(b"token", amp.Unicode())]
    response = [(b"records", Chunked()), (b"more", amp.Boolean())]
    errors = {UnknownSync: b"UNKNOWN_SYNC", **COMMON_ERRORS}


class NodeStats(amp.Command):
    """The callee's ``/stats`` as a JSON object (for ``GET /cluster``)."""

    arguments: list = []
    response = [(b"stats", Chunked())]
    errors = dict(COMMON_ERRORS)

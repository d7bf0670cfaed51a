"""A node's data directory: its lock, its journal segments, replay, appends
and compaction.

No reactor here.  :meth:`DataDir.open` runs before the node serves; after
that exactly one thread (the writer of :mod:`dqid.disklog`) calls
:meth:`DataDir.append` and :meth:`DataDir.compact`.

Layout::

    lock              flock'ed while a process has the directory open
    snapshot-N        the live state when generation N began (none for N = 1)
    log-N             every group appended since (journal segments)
    synced            "log-N LENGTH": how much of log-N is known fsynced (a
                      test aid for simulated power cuts, see simulate_power_cut)
    *.tmp             a snapshot or log being written; deleted on open

The state is ``snapshot-N`` (N the highest) followed by ``log-N``.
Compaction writes ``snapshot-(N+1)`` and an empty ``log-(N+1)`` (each
written to a temp file, fsynced, renamed; then the directory is fsynced),
switches appends to the new log and deletes generation N.  A crash at any
point leaves either generation N whole or generation N+1 whole.
"""

from __future__ import annotations

import fcntl
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from twisted.logger import Logger

from .journal import (
    HEADER_SIZE, CorruptLog, Entry, EntryType, Epochs, MessageState, SegmentScan,
    decode_payload, encode_group, encode_header, epochs_entry, new_salt, own_records,
    replica_records, scan_segment, states_entry, tombstones_entry,
)
from .replica import Record
from .tombstones import Tombstones

LOCK = "lock"
SYNCED = "synced"
_SEGMENT_RE = re.compile(r"\A(snapshot|log)-(\d{8})\Z")
_TMP = ".tmp"

# A log shorter than this is never compacted (see should_compact).
MIN_COMPACT_BYTES = 8 * 1024 * 1024
# Records per entry in a snapshot: entries stay moderate in size.
SNAPSHOT_CHUNK = 4096

log = Logger()


class DataDirLocked(Exception):
    """Another process (or another DataDir in this one) has the directory."""


class DataDirError(Exception):
    """The directory's segments do not make a whole state (one line)."""


class DiskFailed(Exception):
    """An earlier write or fsync failed; nothing more is written, since what
    the disk holds after a failed fsync cannot be known."""


def segment_name(kind: str, generation: int) -> str:
    return f"{kind}-{generation:08d}"


# -- replay -------------------------------------------------------------------

@dataclass
class Replay:
    """The state a data directory holds, to rebuild the node from.

    Merged as :class:`dqid.replica.ReplicaStore` merges: records by union,
    tombstones by union, and a tombstone always wins.  ``own`` and
    ``replicas`` keep the order records were first written in; ``states``
    holds the newest state written of each own message still live.
    """

    own: dict[str, Record] = field(default_factory=dict)
    replicas: dict[str, Record] = field(default_factory=dict)
    tombstones: Tombstones = field(default_factory=Tombstones)
    states: dict[str, MessageState] = field(default_factory=dict)
    epochs: Epochs | None = None  # None: no epoch was ever written
    entries: int = 0  # journal entries read
    cut_bytes: int = 0  # torn tail cut from the newest log

    def apply(self, entry: Entry) -> None:
        decoded = decode_payload(entry)
        kind = entry.type
        self.entries += 1
        if kind == EntryType.OWN_RECORDS:
            own = self.own
            for record in decoded:
                own.setdefault(record.id, record)
        elif kind in (EntryType.REPLICA_RECORDS, EntryType.REPLICA_RUN):
            replicas = self.replicas
            for record in decoded:
                replicas.setdefault(record.id, record)
        elif kind == EntryType.TOMBSTONES:
            self.tombstones.merge(decoded)
        elif kind == EntryType.STATES:
            for state in decoded:
                self.states[state.id] = state
        else:
            self.epochs = _merge_epochs(self.epochs, decoded)

    def finish(self) -> None:
        """Drop what tombstones cover, and states of messages not held."""
        tombstones = self.tombstones
        for held in (self.own, self.replicas):
            gone = [i for i, record in held.items() if record.mid in tombstones]
            for message_id in gone:
                del held[message_id]
        self.states = {i: s for i, s in self.states.items()
                       if i in self.own or i in self.replicas}

    def snapshot_entries(self) -> list[Entry]:
        """Entries that replay to this same state."""
        return snapshot_entries(self.own.values(), self.replicas.values(), self.tombstones,
                                self.states.values(), self.epochs)


def _merge_epochs(old: Epochs | None, new: Epochs) -> Epochs:
    if old is None:
        return new
    known = dict(old.known)
    for owner, epoch in new.known.items():
        known[owner] = max(epoch, known.get(owner, 0))
    return Epochs(new.node, max(old.epoch, new.epoch), known)


def snapshot_entries(own: Iterable, replicas: Iterable, tombstones: Tombstones,
                     states: Iterable[MessageState], epochs: Epochs | None) -> list[Entry]:
    """The entries of a snapshot of a live state, for :meth:`DataDir.compact`.

    ``own`` and ``replicas`` are messages or records (anything with id,
    body, content_type, key and deliveries), in the order to keep.
    """
    entries = [tombstones_entry(tombstones)]
    if epochs is not None:
        entries.append(epochs_entry(epochs))
    for make, items in ((own_records, list(own)), (replica_records, list(replicas))):
        for start in range(0, len(items), SNAPSHOT_CHUNK):
            entries.append(make(items[start:start + SNAPSHOT_CHUNK]))
    states = list(states)
    if states:
        entries.append(states_entry(states))
    return entries


def should_compact(live_bytes: int, log_bytes: int,
                   min_bytes: int = MIN_COMPACT_BYTES) -> bool:
    """Whether to compact: the log since the last snapshot (``log_bytes``,
    :attr:`DataDir.log_bytes`) is at least ``min_bytes`` and at least as
    big as the live state (``live_bytes``, an estimate of its snapshot: say
    64 bytes plus the body per message held).

    Dead bytes then dominate the log, disk use stays under about the last
    snapshot plus ``max(min_bytes, live_bytes)``, and each compaction
    rewrites no more than the log grew since the last one.  A fresh log
    starts empty, so a low estimate cannot make compaction repeat at once.
    """
    return log_bytes >= min_bytes and log_bytes >= live_bytes


# -- the directory -----------------------------------------------------------

class DataDir:
    """An open, locked data directory.  Use :meth:`open`."""

    def __init__(self, path: str, lock_fd: int, fsync: Callable[[int], None]) -> None:
        self.path = path
        self.replay: Replay | None = None  # set by open(); drop it once used
        self._lock_fd = lock_fd
        self._fsync = fsync
        self._generation = 1
        self._snapshot_bytes = 0
        self._log_fd = -1
        self._log_size = 0
        self._salt = 0
        self._next_group = 0
        self._synced_fd = -1
        self._failed: BaseException | None = None

    # -- opening -------------------------------------------------------------

    @classmethod
    def open(cls, path: str, *, fsync: Callable[[int], None] = os.fdatasync) -> "DataDir":
        """Lock ``path`` (created if missing) and replay it into ``.replay``.

        Raises :class:`DataDirLocked` if another opener holds it,
        :class:`CorruptLog` for damage before a tail, :class:`DataDirError`
        for a missing segment.  ``fsync`` is what makes a log file durable
        (injectable for tests).
        """
        path = os.path.abspath(path)
        os.makedirs(path, exist_ok=True)
        lock_fd = _lock(path)
        datadir = cls(path, lock_fd, fsync)
        try:
            datadir._load()
        except BaseException:
            datadir.close()
            raise
        return datadir

    def _load(self) -> None:
        snapshots, logs = self._list()
        base = max(snapshots, default=1)  # generation 1 starts with no snapshot
        logs = sorted(g for g in logs if g >= base)
        if logs and logs != list(range(base, base + len(logs))):
            missing = next(g for g in range(base, logs[-1]) if g not in logs)
            raise DataDirError(f"data directory {self.path}: segment "
                               f"{segment_name('log', missing)} is missing")
        replay = Replay()
        if base in snapshots:
            snapshot = self._read(segment_name("snapshot", base), replay, tail_allowed=False)
            self._snapshot_bytes = snapshot.size
        next_group = 0
        scanned: SegmentScan | None = None
        for number, generation in enumerate(logs):
            newest = number == len(logs) - 1
            scanned = self._read(segment_name("log", generation), replay, tail_allowed=newest)
            next_group = scanned.next_group
        replay.finish()
        self.replay = replay
        self._remove_older_than(base)
        if scanned is not None and scanned.good_length >= HEADER_SIZE:
            fd = os.open(scanned.path, os.O_WRONLY | os.O_APPEND)
            self._switch_log(base, fd, scanned.good_length, scanned.salt, next_group)
            self._fsync(fd)  # what was replayed is on disk before anything builds on it
        else:  # a fresh directory, a crash right after a snapshot, a torn header
            fd, salt = self._new_log(base, next_group)
            self._switch_log(base, fd, HEADER_SIZE, salt, next_group)
        _fsync_dir(self.path)

    def _list(self) -> tuple[set[int], set[int]]:
        snapshots: set[int] = set()
        logs: set[int] = set()
        for name in os.listdir(self.path):
            if name.endswith(_TMP):
                os.unlink(os.path.join(self.path, name))  # an unfinished write
                continue
            match = _SEGMENT_RE.match(name)
            if match:
                (snapshots if match[1] == "snapshot" else logs).add(int(match[2]))
        if not snapshots and logs and min(logs) != 1:
            raise DataDirError(f"data directory {self.path}: segment "
                               f"{segment_name('snapshot', min(logs))} is missing")
        return snapshots, logs

    def _read(self, name: str, replay: Replay, tail_allowed: bool) -> SegmentScan:
        path = os.path.join(self.path, name)
        scanned = scan_segment(path)
        if scanned.torn:
            if not tail_allowed:
                raise CorruptLog(path, scanned.good_length,
                                 f"{scanned.torn_reason} in a file that is never appended to")
            self._cut(scanned)
            replay.cut_bytes += scanned.size - scanned.good_length
        for entry, offset in zip(scanned.entries, scanned.offsets):
            try:
                replay.apply(entry)
            except Exception as error:  # checksummed, yet not what we write
                raise CorruptLog(path, offset, f"undecodable {entry.type.name} entry: "
                                               f"{error}".replace("\n", " ")) from error
        return scanned

    def _cut(self, scanned: SegmentScan) -> None:
        log.warn("cutting a torn tail of {path}: {cut} bytes from offset {offset} ({reason})",
                 path=scanned.path, cut=scanned.size - scanned.good_length,
                 offset=scanned.good_length, reason=scanned.torn_reason)
        fd = os.open(scanned.path, os.O_WRONLY)
        try:
            os.ftruncate(fd, scanned.good_length)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _remove_older_than(self, generation: int) -> None:
        for name in os.listdir(self.path):
            match = _SEGMENT_RE.match(name)
            if match and int(match[2]) < generation:
                os.unlink(os.path.join(self.path, name))

    def _new_log(self, generation: int, first_group: int) -> tuple[int, int]:
        """Write an empty ``log-generation`` (atomically; fsync the directory
        after); its descriptor for appending, and its salt."""
        salt = new_salt()
        path = os.path.join(self.path, segment_name("log", generation))
        _write_atomically(path, encode_header(salt, first_group))
        return os.open(path, os.O_WRONLY | os.O_APPEND), salt

    def _switch_log(self, generation: int, fd: int, size: int, salt: int,
                    next_group: int) -> None:
        """Append to ``fd``, log-generation, from now on."""
        if self._log_fd >= 0:
            os.close(self._log_fd)
        self._generation = generation
        self._log_fd, self._log_size, self._synced_size = fd, size, size
        self._salt, self._next_group = salt, next_group
        self._record_synced()

    # -- sizes ---------------------------------------------------------------

    @property
    def log_bytes(self) -> int:
        """Bytes appended to the log since the last snapshot."""
        return self._log_size - HEADER_SIZE

    @property
    def disk_bytes(self) -> int:
        """The snapshot and the log: what the state takes on disk."""
        return self._snapshot_bytes + self._log_size

    @property
    def log_path(self) -> str:
        return os.path.join(self.path, segment_name("log", self._generation))

    # -- writing (the writer thread) ------------------------------------------

    def append(self, entries: Sequence[Entry], *, sync: bool = True) -> int:
        """Write ``entries`` as one group, then (``sync``) fsync: on disk when
        this returns.  The bytes written.  A failed write is taken back; a
        failed fsync makes this and every later call raise
        :class:`DiskFailed`."""
        self._check()
        data = encode_group(entries, group=self._next_group, salt=self._salt)
        if data:
            try:
                _write_all(self._log_fd, data)
            except OSError as error:
                self._take_back(error)
                raise
            self._log_size += len(data)
            self._next_group = (self._next_group + 1) % (1 << 32)
        if sync:
            self.sync()
        return len(data)

    def sync(self) -> None:
        """fsync what was appended and not synced yet."""
        self._check()
        if self._synced_size == self._log_size:
            return
        try:
            self._fsync(self._log_fd)
        except OSError as error:
            self._failed = error
            raise
        self._synced_size = self._log_size
        self._record_synced()

    def compact(self, live_entries: Iterable[Entry]) -> int:
        """Make ``live_entries`` the new snapshot and start an empty log.

        ``live_entries`` must cover everything appended so far that is still
        live (:func:`snapshot_entries` builds them).  Returns the snapshot's
        size.  If it fails before the new generation is complete, the old one
        stays in use; if it cannot be rolled back, :class:`DiskFailed`.
        """
        self._check()
        new = self._generation + 1
        snapshot_path = os.path.join(self.path, segment_name("snapshot", new))
        salt = new_salt()
        data = encode_header(salt, 0) + encode_group(live_entries, group=0, salt=salt)
        _write_atomically(snapshot_path, data)  # a failure here leaves nothing behind
        fd = -1
        try:
            fd, log_salt = self._new_log(new, self._next_group)
            _fsync_dir(self.path)
        except OSError as error:
            if fd >= 0:
                os.close(fd)
            self._roll_back(new, error)
            raise
        self._switch_log(new, fd, HEADER_SIZE, log_salt, self._next_group)
        self._snapshot_bytes = len(data)
        try:
            self._remove_older_than(new)
            _fsync_dir(self.path)
        except OSError:
            pass  # generation ``new`` is whole; the next open removes what is left
        return len(data)

    def _roll_back(self, generation: int, error: OSError) -> None:
        """Remove a half-made generation; DiskFailed if that fails too."""
        try:
            for kind in ("log", "snapshot"):
                path = os.path.join(self.path, segment_name(kind, generation))
                if os.path.exists(path):
                    os.unlink(path)
            _fsync_dir(self.path)
        except OSError:
            self._failed = error

    def _take_back(self, error: OSError) -> None:
        try:
            os.ftruncate(self._log_fd, self._log_size)
        except OSError:
            self._failed = error

    def _check(self) -> None:
        if self._failed is not None:
            raise DiskFailed(f"data directory {self.path}: an earlier write failed "
                             f"({self._failed})")
        if self._log_fd < 0:
            raise DiskFailed(f"data directory {self.path} is closed")

    def _record_synced(self) -> None:
        if self._synced_fd < 0:
            self._synced_fd = os.open(os.path.join(self.path, SYNCED),
                                      os.O_WRONLY | os.O_CREAT, 0o644)
        name = segment_name("log", self._generation)
        line = f"{name} {self._synced_size}".ljust(63) + "\n"
        os.pwrite(self._synced_fd, line.encode("ascii"), 0)

    # -- closing -------------------------------------------------------------

    def close(self) -> None:
        """Close the files and release the lock (idempotent)."""
        for name in ("_log_fd", "_synced_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)


# -- helpers -------------------------------------------------------------------

def _lock(path: str) -> int:
    lock_path = os.path.join(path, LOCK)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise DataDirLocked(f"data directory {path} is in use (locked by pid {holder})") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _write_atomically(path: str, data: bytes) -> None:
    """``path`` holds ``data`` whole or not at all (fsync the directory after)."""
    temp = path + _TMP
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(temp)
        except OSError:
            pass  # the next open removes it
        raise
    os.close(fd)
    os.rename(temp, path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def simulate_power_cut(path: str) -> int:
    """Test aid: drop what was written to the data directory at ``path``
    after its last fsync, as a power cut would.  Run it while no process
    has the directory open.  The bytes dropped."""
    with open(os.path.join(path, SYNCED), encoding="ascii") as file:
        name, length = file.read().split()
    segment = os.path.join(path, name)
    dropped = os.path.getsize(segment) - int(length)
    if dropped > 0:
        os.truncate(segment, int(length))
    return max(dropped, 0)

"""Group commit (dqid.disklog) on the real reactor, with a real writer
thread: a write's Deferred fires only once it is fsynced, one fsync carries
every write of a turn, and a failed fsync fails its writers."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.task import deferLater

from dqid import journal
from dqid.datadir import DataDir, DiskFailed, snapshot_entries
from dqid.disklog import DiskLog, DiskLogStopped
from dqid.replica import Record
from dqid.tombstones import Tombstones


class Fsync:
    """An fsync that counts its calls, may wait for a gate, may fail."""

    def __init__(self) -> None:
        self.calls = 0
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.error: OSError | None = None

    def __call__(self, fd: int) -> None:
        self.entered.set()
        self.gate.wait(30)
        self.calls += 1
        if self.error is not None:
            raise self.error
        os.fdatasync(fd)


@pytest.fixture
def fsync() -> Fsync:
    return Fsync()


@pytest.fixture
def disklog(tmp_path: Path, fsync: Fsync):
    datadir = DataDir.open(str(tmp_path), fsync=fsync)
    fsync.calls = 0  # opening syncs the log it found
    fsync.entered.clear()
    service = DiskLog(datadir, reactor)
    service.startService()
    yield service
    fsync.gate.set()
    pytest_twisted.blockon(service.stopService())
    datadir.close()


def push(seq: int) -> list[journal.Entry]:
    return [journal.own_records([Record(f"a.1.{seq}", b"x" * 100)])]


def replayed_ids(path: Path) -> list[str]:
    """The own ids on disk now, read from the files (the writer holds the lock)."""
    ids = []
    for name in sorted(os.listdir(path), key=lambda n: (n[-8:], n.startswith("log"))):
        if name.startswith(("snapshot-", "log-")):
            entries, _good_length = journal.scan(str(path / name))
            ids += [record.id for entry in entries if entry.type == journal.EntryType.OWN_RECORDS
                    for record in journal.decode_payload(entry)]
    return ids


async def until(condition, timeout: float = 10.0) -> None:
    waited = 0.0
    while not condition():
        assert waited < timeout, "timed out"
        await deferLater(reactor, 0.005, lambda: None)
        waited += 0.005


@pytest_twisted.ensureDeferred
async def test_writes_of_one_turn_share_one_fsync(disklog, fsync, tmp_path) -> None:
    waiting = [disklog.write(push(seq)) for seq in range(1, 101)]
    results = await DeferredList(waiting, fireOnOneErrback=True, consumeErrors=True)
    assert all(ok for ok, _ in results)
    assert fsync.calls == 1
    assert (disklog.groups, disklog.entries) == (1, 100)
    assert replayed_ids(tmp_path) == [f"a.1.{seq}" for seq in range(1, 101)]


@pytest_twisted.ensureDeferred
async def test_a_write_fires_only_after_its_fsync(disklog, fsync) -> None:
    fsync.gate.clear()
    written = disklog.write(push(1))
    await until(fsync.entered.is_set)
    await deferLater(reactor, 0.05, lambda: None)  # the reactor turns meanwhile
    assert not written.called
    fsync.gate.set()
    await written
    assert fsync.calls == 1


@pytest_twisted.ensureDeferred
async def test_writes_gather_while_an_fsync_runs(disklog, fsync, tmp_path) -> None:
    fsync.gate.clear()
    first = disklog.write(push(1))
    await until(fsync.entered.is_set)
    later = []
    for seq in range(2, 12):  # ten writes over ten turns, all during that fsync
        later.append(disklog.write(push(seq)))
        await deferLater(reactor, 0, lambda: None)
    assert not any(d.called for d in [first, *later])
    fsync.gate.set()
    await DeferredList([first, *later], fireOnOneErrback=True, consumeErrors=True)
    assert fsync.calls == 2
    assert replayed_ids(tmp_path) == [f"a.1.{seq}" for seq in range(1, 12)]


@pytest_twisted.ensureDeferred
async def test_a_failing_fsync_fails_its_waiters_and_every_later_write(disklog, fsync) -> None:
    fsync.error = OSError(errno.EIO, "Input/output error")
    waiting = [disklog.write(push(seq)) for seq in range(1, 4)]
    for written in waiting:
        with pytest.raises(OSError) as caught:
            await written
        assert caught.value.errno == errno.EIO
    fsync.error = None
    with pytest.raises(DiskFailed):
        await disklog.write(push(4))


@pytest_twisted.ensureDeferred
async def test_compaction_keeps_its_place_among_the_writes(disklog, tmp_path) -> None:
    first = disklog.write(push(1))
    live = snapshot_entries([Record("a.1.1", b"x" * 100)], [], Tombstones(), [], None)
    snapshot = disklog.compact(live)
    assert disklog.compacting
    second = disklog.write(push(2))
    await DeferredList([first, snapshot, second], fireOnOneErrback=True, consumeErrors=True)
    assert snapshot.result > 0 and not disklog.compacting
    assert sorted(os.listdir(tmp_path)) == ["lock", "log-00000002", "snapshot-00000002",
                                            "synced"]
    assert replayed_ids(tmp_path) == ["a.1.1", "a.1.2"]


@pytest_twisted.ensureDeferred
async def test_stopping_finishes_the_writes_asked_for_and_refuses_new_ones(
        tmp_path: Path, fsync: Fsync) -> None:
    datadir = DataDir.open(str(tmp_path), fsync=fsync)
    service = DiskLog(datadir, reactor)
    service.startService()
    asked = [service.write(push(seq)) for seq in range(1, 6)]
    await service.stopService()
    assert all(d.called for d in asked)
    with pytest.raises(DiskLogStopped):
        await service.write(push(6))
    datadir.close()
    assert replayed_ids(tmp_path) == [f"a.1.{seq}" for seq in range(1, 6)]

"""The data directory (dqid.datadir): locked, replayed, compacted, and what a
crash or a damaged file does to it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dqid import datadir as datadir_module
from dqid import journal
from dqid.datadir import (
    DataDir, DataDirError, DataDirLocked, DiskFailed, Replay, should_compact,
    simulate_power_cut, snapshot_entries,
)
from dqid.journal import CorruptLog, Epochs, MessageState
from dqid.ids import format_id
from dqid.replica import Record
from dqid.wire import encode_run
from dqid.tombstones import Tombstones

ROOT = Path(__file__).resolve().parent.parent


def record(seq: int, owner: str = "a", body: bytes | None = None) -> Record:
    return Record(f"{owner}.1.{seq}", body if body is not None else b"m%d" % seq,
                  "text/plain" if seq % 3 == 0 else None, f"k{seq}" if seq % 5 == 0 else None)


def tombstones(owner: str, *seqs: int) -> Tombstones:
    gone = Tombstones()
    for seq in seqs:
        gone.add(owner, 1, seq)
    return gone


def state_of(replay: Replay) -> tuple:
    def rows(held: dict[str, Record]) -> list[tuple]:
        return [(r.id, r.body, r.content_type, r.key, r.deliveries) for r in held.values()]

    return (rows(replay.own), rows(replay.replicas), replay.tombstones.as_dict(),
            replay.states, replay.epochs)


def history() -> list[list[journal.Entry]]:
    """Groups as a node would write them: pushes, copies, acks, a state."""
    return [
        [journal.epochs_entry(Epochs("a", 1, {"b": 1}))],
        [journal.own_records([record(1), record(2), record(3)])],
        [journal.replica_records([record(1, "b"), record(2, "b")])],
        [journal.tombstones_entry(tombstones("a", 1)), journal.own_records([record(4)])],
        [journal.states_entry([MessageState("a.1.2", 1), MessageState("a.1.1", 1)])],
        [journal.states_entry([MessageState("a.1.2", 2, journal.HELD)]),
         journal.tombstones_entry(tombstones("b", 2))],
        [journal.epochs_entry(Epochs("a", 2, {"c": 5}))],
    ]


def write_history(path: Path) -> None:
    datadir = DataDir.open(str(path))
    try:
        for group in history():
            datadir.append(group)
    finally:
        datadir.close()


def reopen(path: Path) -> Replay:
    datadir = DataDir.open(str(path))
    datadir.close()
    assert datadir.replay is not None
    return datadir.replay


def test_a_fresh_directory_replays_to_nothing(tmp_path: Path) -> None:
    replay = reopen(tmp_path / "data")
    assert state_of(replay) == ([], [], {}, {}, None)


def test_replay_merges_as_the_store_does(tmp_path: Path) -> None:
    write_history(tmp_path)
    own, replicas, gone, states, epochs = state_of(reopen(tmp_path))
    assert [row[0] for row in own] == ["a.1.2", "a.1.3", "a.1.4"]  # a.1.1 acked
    assert own[1] == ("a.1.3", b"m3", "text/plain", None, 0)
    assert [row[0] for row in replicas] == ["b.1.1"]
    assert gone == {"a": {1: [(1, 2)]}, "b": {1: [(2, 3)]}}
    assert states == {"a.1.2": MessageState("a.1.2", 2, journal.HELD)}  # newest; acked gone
    assert epochs == Epochs("a", 2, {"b": 1, "c": 5})


def test_a_tombstone_wins_whatever_the_order(tmp_path: Path) -> None:
    datadir = DataDir.open(str(tmp_path))
    datadir.append([journal.tombstones_entry(tombstones("b", 7))])
    datadir.append([journal.replica_records([record(7, "b")])])  # a late copy
    datadir.close()
    assert reopen(tmp_path).replicas == {}


def test_a_packed_run_replays_as_its_records_less_what_is_tombstoned(tmp_path: Path) -> None:
    datadir = DataDir.open(str(tmp_path))
    datadir.append([journal.packed_run_entry(
        encode_run(format_id("c", 1, 10), "text/plain", [b"r%d" % i for i in range(20)]))])
    datadir.append([journal.tombstones_entry(tombstones("c", 12, 29))])
    datadir.close()
    replicas = reopen(tmp_path).replicas
    assert sorted(replicas, key=lambda i: int(i.rsplit(".", 1)[1], 36)) == [
        format_id("c", 1, seq) for seq in range(10, 30) if seq not in (12, 29)]
    assert (replicas["c.1.b"].body, replicas["c.1.b"].content_type) == (b"r1", "text/plain")


def test_a_damaged_packed_run_stops_the_open(tmp_path: Path) -> None:
    datadir = DataDir.open(str(tmp_path))
    run = encode_run("c.1.10", None, [b"body"] * 20)
    datadir.append([journal.Entry(journal.EntryType.REPLICA_RUN, run[:-1])])
    datadir.close()
    with pytest.raises(CorruptLog):
        DataDir.open(str(tmp_path))


# -- the lock ------------------------------------------------------------------

def test_a_second_opener_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    first = DataDir.open(str(tmp_path))
    with pytest.raises(DataDirLocked) as caught:
        DataDir.open(str(tmp_path))
    message = str(caught.value)
    assert str(tmp_path) in message and "\n" not in message
    assert f"locked by pid {os.getpid()}" in message
    first.close()
    DataDir.open(str(tmp_path)).close()


def test_a_second_process_is_refused(tmp_path: Path) -> None:
    holder = DataDir.open(str(tmp_path))
    try:
        script = ("import sys\n"
                  "from dqid.datadir import DataDir, DataDirLocked\n"
                  "try:\n"
                  "    DataDir.open(sys.argv[1])\n"
                  "except DataDirLocked as error:\n"
                  "    print(error)\n"
                  "    sys.exit(3)\n")
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    finally:
        holder.close()
    assert done.returncode == 3, done.stderr
    assert done.stdout.strip() == (f"data directory {tmp_path} is in use "
                                   f"(locked by pid {os.getpid()})")


# -- crashes and damage -------------------------------------------------------------

def test_a_torn_tail_is_cut_and_appends_go_on(tmp_path: Path) -> None:
    write_history(tmp_path)
    before = state_of(reopen(tmp_path))
    log_path = tmp_path / "log-00000001"
    clean_size = log_path.stat().st_size
    with open(log_path, "ab") as log:
        log.write(os.urandom(700))  # a crash mid-write
    datadir = DataDir.open(str(tmp_path))
    assert datadir.replay.cut_bytes == 700
    assert log_path.stat().st_size == clean_size
    datadir.append([journal.own_records([record(9)])])
    datadir.close()
    after = reopen(tmp_path)
    assert after.cut_bytes == 0
    assert state_of(after)[0] == before[0] + [("a.1.9", b"m9", "text/plain", None, 0)]


def test_a_torn_header_of_a_new_log_is_rewritten(tmp_path: Path) -> None:
    write_history(tmp_path)
    datadir = DataDir.open(str(tmp_path))
    expected = state_of(datadir.replay)
    datadir.compact(datadir.replay.snapshot_entries())
    datadir.close()
    os.truncate(tmp_path / "log-00000002", 11)  # as if its creation were not atomic
    datadir = DataDir.open(str(tmp_path))
    assert state_of(datadir.replay) == expected
    datadir.append([journal.own_records([record(9)])])
    datadir.close()
    assert list(reopen(tmp_path).own)[-1] == "a.1.9"


def test_a_flipped_byte_in_the_middle_stops_the_open(tmp_path: Path) -> None:
    write_history(tmp_path)
    log_path = tmp_path / "log-00000001"
    data = bytearray(log_path.read_bytes())
    data[len(data) // 2] ^= 0x20
    log_path.write_bytes(bytes(data))
    with pytest.raises(CorruptLog) as caught:
        DataDir.open(str(tmp_path))
    assert str(log_path) in str(caught.value)
    assert 0 < caught.value.offset <= len(data) // 2
    assert log_path.read_bytes() == bytes(data)  # nothing cut
    with pytest.raises(CorruptLog):  # the lock was given back
        DataDir.open(str(tmp_path))


def test_a_missing_segment_stops_the_open(tmp_path: Path) -> None:
    datadir = DataDir.open(str(tmp_path))
    datadir.append(history()[1])
    datadir.compact(snapshot_entries([record(1)], [], Tombstones(), [], None))
    datadir.close()
    os.unlink(tmp_path / "snapshot-00000002")
    with pytest.raises(DataDirError, match="snapshot-00000002 is missing"):
        DataDir.open(str(tmp_path))


def test_a_power_cut_drops_what_was_not_fsynced(tmp_path: Path) -> None:
    datadir = DataDir.open(str(tmp_path))
    datadir.append([journal.own_records([record(1)])])
    datadir.append([journal.own_records([record(2)])], sync=False)
    datadir.close()
    assert simulate_power_cut(str(tmp_path)) > 0
    assert [r.id for r in reopen(tmp_path).own.values()] == ["a.1.1"]


def test_a_failed_write_is_taken_back(tmp_path: Path, monkeypatch) -> None:
    datadir = DataDir.open(str(tmp_path))
    datadir.append([journal.own_records([record(1)])])
    real_write_all = datadir_module._write_all

    def half_then_fail(fd: int, data: bytes) -> None:
        os.write(fd, data[:len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datadir_module, "_write_all", half_then_fail)
    with pytest.raises(OSError):
        datadir.append([journal.own_records([record(2, body=b"x" * 500)])])
    monkeypatch.setattr(datadir_module, "_write_all", real_write_all)
    datadir.append([journal.own_records([record(3)])])  # the disk has room again
    datadir.close()
    assert [r.id for r in reopen(tmp_path).own.values()] == ["a.1.1", "a.1.3"]


def test_a_failed_fsync_fails_every_later_write(tmp_path: Path) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    datadir = DataDir.open(str(tmp_path))
    datadir._fsync = failing_fsync
    with pytest.raises(OSError):
        datadir.append([journal.own_records([record(1)])])
    datadir._fsync = os.fsync
    with pytest.raises(DiskFailed, match=str(tmp_path)):
        datadir.append([journal.own_records([record(2)])])
    datadir.close()


# -- compaction ------------------------------------------------------------------

def test_replay_after_compaction_equals_replay_before(tmp_path: Path) -> None:
    write_history(tmp_path)
    datadir = DataDir.open(str(tmp_path))
    before = datadir.replay
    datadir.compact(before.snapshot_entries())
    datadir.close()
    assert sorted(os.listdir(tmp_path)) == ["lock", "log-00000002", "snapshot-00000002",
                                            "synced"]
    assert state_of(reopen(tmp_path)) == state_of(before)


def test_appends_after_compaction_replay_after_the_snapshot(tmp_path: Path) -> None:
    write_history(tmp_path)
    datadir = DataDir.open(str(tmp_path))
    datadir.compact(datadir.replay.snapshot_entries())
    datadir.append([journal.tombstones_entry(tombstones("a", 2)),
                    journal.own_records([record(5)])])
    datadir.close()
    assert [r.id for r in reopen(tmp_path).own.values()] == ["a.1.3", "a.1.4", "a.1.5"]


def test_a_crash_inside_compaction_keeps_one_whole_generation(tmp_path: Path) -> None:
    write_history(tmp_path)
    expected = state_of(reopen(tmp_path))
    datadir = DataDir.open(str(tmp_path))
    datadir.compact(datadir.replay.snapshot_entries())
    datadir.close()
    # As if it crashed after the snapshot's rename, before the new log's.
    os.unlink(tmp_path / "log-00000002")
    (tmp_path / "log-00000002.tmp").write_bytes(b"dqid")
    assert state_of(reopen(tmp_path)) == expected
    assert sorted(os.listdir(tmp_path)) == ["lock", "log-00000002", "snapshot-00000002",
                                            "synced"]


def test_should_compact_when_the_log_outgrows_the_live_state() -> None:
    assert not should_compact(live_bytes=100, log_bytes=1000, min_bytes=4096)  # small log
    assert should_compact(live_bytes=100, log_bytes=5000, min_bytes=4096)
    assert not should_compact(live_bytes=9000, log_bytes=5000, min_bytes=4096)  # mostly live
    assert should_compact(live_bytes=0, log_bytes=4096, min_bytes=4096)


def test_disk_use_stays_bounded_across_pushes_and_acks(tmp_path: Path) -> None:
    """A long run of pushes and acks: disk use follows what is queued."""
    body = b"b" * 100
    min_bytes = 64 * 1024
    datadir = DataDir.open(str(tmp_path))
    queued: dict[str, Record] = {}
    gone = Tombstones()
    largest_disk = largest_queue = live_bytes = 0
    compactions = 0
    for step in range(10_000):
        pushed = record(step + 1, body=body)
        queued[pushed.id] = pushed
        live_bytes += 64 + len(body)
        datadir.append([journal.own_records([pushed])], sync=False)
        if len(queued) > 50 + step % 100:  # the queue's depth wanders between 50 and 150
            acked = queued.pop(next(iter(queued)))
            live_bytes -= 64 + len(body)
            gone.add("a", 1, acked.mid.seq)
            datadir.append([journal.tombstones_entry(tombstones("a", acked.mid.seq))],
                           sync=False)
        if should_compact(live_bytes, datadir.log_bytes, min_bytes):
            datadir.compact(snapshot_entries(queued.values(), [], gone, [], None))
            compactions += 1
        largest_disk = max(largest_disk, sum(f.stat().st_size for f in tmp_path.iterdir()))
        largest_queue = max(largest_queue, live_bytes)
    datadir.close()
    assert compactions >= 10
    assert largest_disk < 2 * largest_queue + min_bytes + 4096
    assert list(reopen(tmp_path).own) == list(queued)

"""--data-dir on real processes: kill -9 and restart, torn tails, flipped
bytes, a second process, a simulated power cut, compaction."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from dqid.datadir import simulate_power_cut

from .procs import DqidProcess, run_dqid

pytestmark = pytest.mark.process


def node(pool, tmp_path: Path, *args: str) -> DqidProcess:
    return pool.node("n1", f"--data-dir={tmp_path / 'data'}", "--size=1000000", *args)


def push_under_load(process: DqidProcess, seconds: float, threads: int = 4
                    ) -> tuple[list[str], list[str], list[str]]:
    """Push (and ack every third) from ``threads`` clients until killed;
    the ids answered 201 (in order, per client), those whose ack was
    answered 204, and those whose ack was sent (its answer may be lost in
    the kill: such a message may or may not be gone)."""
    created: list[str] = []
    acked: list[str] = []
    ack_sent: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(n: int) -> None:
        count = 0
        while time.monotonic() < stop:
            try:
                reply = process.http("POST", "/push", b"%d-%d" % (n, count), timeout=2)
            except OSError:
                return
            if reply.status != 201:
                return
            message_id = reply.json()["id"]
            count += 1
            with lock:
                created.append(message_id)
            if count % 3 == 0:
                with lock:
                    ack_sent.append(message_id)
                try:
                    if process.http("POST", f"/ack/{message_id}", timeout=2).status == 204:
                        with lock:
                            acked.append(message_id)
                except OSError:
                    return

    workers = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(threads)]
    for worker in workers:
        worker.start()
    time.sleep(seconds / 2)
    process.kill()  # kill -9 mid-load
    for worker in workers:
        worker.join(5)
    return created, acked, ack_sent


def queued_ids(process: DqidProcess) -> list[str]:
    """Every queued id, in delivery order (taken with long leases)."""
    ids = []
    while True:
        reply = process.http("GET", "/get?count=100&visibility=600")
        if reply.status == 204:
            return ids
        ids += [m["id"] for m in reply.json()["messages"]]


def test_a_standalone_node_killed_under_load_keeps_every_201(pool, tmp_path) -> None:
    first = node(pool, tmp_path).start()
    first.wait_for("/ready")
    created, acked, ack_sent = push_under_load(first, 3.0)
    assert len(created) > 50
    second = node(pool, tmp_path).start()
    second.wait_for("/ready")
    ids = queued_ids(second)
    kept = [i for i in created if i not in set(ack_sent)]
    assert set(kept) <= set(ids), set(kept) - set(ids)  # nothing answered 201 is lost
    assert not set(acked) & set(ids)  # nothing answered 204 comes back
    # Same ids, same order: the line is the order they were minted in.
    assert [i for i in ids if i in set(kept)] == sorted(kept, key=lambda i: int(i.rsplit(".", 1)[1], 36))
    # A new epoch: no id is ever reused.
    new = second.http("POST", "/push", b"after").json()["id"]
    assert new not in created and new.split(".")[1] != created[0].split(".")[1]


def test_a_power_cut_loses_nothing_that_was_answered(pool, tmp_path) -> None:
    """Everything written after the last fsync is dropped before the
    restart: a 201 given before its fsync would show as lost."""
    first = node(pool, tmp_path).start()
    first.wait_for("/ready")
    created, acked, ack_sent = push_under_load(first, 3.0)
    dropped = simulate_power_cut(str(tmp_path / "data"))
    second = node(pool, tmp_path).start()
    second.wait_for("/ready")
    ids = set(queued_ids(second))
    kept = set(created) - set(ack_sent)
    assert kept <= ids, (dropped, kept - ids)
    assert not set(acked) & ids


def test_a_torn_tail_is_cut_and_logged(pool, tmp_path) -> None:
    first = node(pool, tmp_path).start()
    first.wait_for("/ready")
    ids = [first.http("POST", "/push", b"job %d" % n).json()["id"] for n in range(5)]
    first.kill()
    log = sorted((tmp_path / "data").glob("log-*"))[-1]
    with open(log, "ab") as file:  # a write the crash interrupted
        file.write(b"\xd9\x7e\x00\x00\x01\x00" + os.urandom(40))
    second = node(pool, tmp_path).start()
    second.wait_for("/ready")
    assert queued_ids(second) == ids
    assert "torn tail" in second.log_text()


def test_a_flipped_byte_before_the_tail_stops_the_start_naming_file_and_offset(
        pool, tmp_path) -> None:
    first = node(pool, tmp_path).start()
    first.wait_for("/ready")
    for n in range(20):
        assert first.http("POST", "/push", b"job %d" % n).status == 201
    first.kill()
    log = sorted((tmp_path / "data").glob("log-*"))[-1]
    data = bytearray(log.read_bytes())
    middle = len(data) // 3
    data[middle] ^= 0xFF
    log.write_bytes(bytes(data))
    done = run_dqid(["--node-id=n1", f"--data-dir={tmp_path / 'data'}",
                     "--http=tcp:0:interface=127.0.0.1"], timeout=30)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "corrupt journal" in lines[0] and str(log) in lines[0] and "offset" in lines[0]
    assert "Traceback" not in done.stderr + done.stdout
    assert log.read_bytes() == bytes(data)  # never cut, never rewritten


def test_a_second_process_on_the_same_directory_is_refused(pool, tmp_path) -> None:
    first = node(pool, tmp_path).start()
    first.wait_for("/ready")
    done = run_dqid(["--node-id=n1", f"--data-dir={tmp_path / 'data'}",
                     "--http=tcp:0:interface=127.0.0.1"], timeout=30)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "in use" in lines[0], done.stderr
    assert first.http("GET", "/ready").status == 200


def test_disk_use_follows_the_queue_not_its_history(pool, tmp_path) -> None:
    first = node(pool, tmp_path).start()
    first.wait_for("/ready")
    body = b"x" * 2000
    batch = {"messages": [{"body": body.decode()} for _ in range(200)]}
    import json
    written = 0
    deadline = time.monotonic() + 60
    while written < 40 * 1024 * 1024 and time.monotonic() < deadline:
        reply = first.http("POST", "/push/batch", json.dumps(batch).encode())
        assert reply.status == 201, reply
        ids = reply.json()["ids"]
        assert first.http("POST", "/ack", json.dumps({"ids": ids}).encode()).status == 200
        written += len(body) * len(ids)
    assert written >= 40 * 1024 * 1024, "too slow to write 40 MiB in a minute"
    time.sleep(6)  # compaction is considered every few seconds
    first.http("POST", "/push", b"one more")  # a write after that: the check runs
    time.sleep(1)
    used = sum(f.stat().st_size for f in (tmp_path / "data").iterdir())
    assert used < 20 * 1024 * 1024, f"{used} bytes on disk after {written} written"
    assert "compacted the journal" in first.log_text()


def test_a_batch_of_acks_answered_stays_acked_across_a_kill(pool, tmp_path) -> None:
    import json
    first = node(pool, tmp_path).start()
    first.wait_for("/ready")
    batch = {"messages": [{"body": f"m{i}"} for i in range(50)]}
    ids = first.http("POST", "/push/batch", json.dumps(batch).encode()).json()["ids"]
    got = first.http("GET", "/get?count=30").json()["messages"]
    acked = [m["id"] for m in got if m["id"] != ids[3]] + ["n1.1.zzz"]
    reply = first.http("POST", "/ack", json.dumps({"ids": acked}).encode())
    assert reply.json() == {"acked": acked[:-1], "unknown": ["n1.1.zzz"]}
    first.kill()  # answered: the tombstones were on disk
    second = node(pool, tmp_path).start()
    second.wait_for("/ready")
    assert second.http("GET", "/stats").json()["depth"] == 50 - 29
    left = second.http("GET", "/get?count=100").json()["messages"]
    assert sorted(m["id"] for m in left) == sorted(set(ids) - set(acked))


def test_held_and_delayed_messages_stay_so_across_a_restart(pool, tmp_path) -> None:
    first = node(pool, tmp_path, "--max-deliveries=1").start()
    first.wait_for("/ready")
    poison = first.http("POST", "/push", b"poison").json()["id"]
    later = first.http("POST", "/push?delay=3600", b"later").json()["id"]
    got = first.http("GET", "/get")
    receipt = got.headers["dqid-receipt"]
    assert first.http("POST", f"/nack/{poison}?receipt={receipt}").status == 204
    assert first.http("GET", "/stats").json()["held"] == 1
    time.sleep(0.3)  # the state change reaches the disk after its turn
    first.kill()
    second = node(pool, tmp_path, "--max-deliveries=1").start()
    second.wait_for("/ready")
    stats = second.http("GET", "/stats").json()
    assert (stats["held"], stats["delayed"], stats["ready"]) == (1, 1, 0)
    peeked = second.http("GET", f"/messages/{poison}")
    assert (peeked.headers["dqid-state"], peeked.headers["dqid-deliveries"]) == ("held", "1")
    assert second.http("GET", f"/messages/{later}").headers["dqid-state"] == "delayed"
    assert second.http("GET", "/get").status == 204

"""A real ``twistd -n dqid`` process on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from .procs import DqidProcess, free_port, http, run_dqid

pytestmark = pytest.mark.process


def _exited_cleanly(code: int) -> bool:
    # twistd exits 0, or re-raises SIGTERM on itself.
    return code in (0, -signal.SIGTERM)


def test_standalone_node_serves_the_api_and_stops_on_sigterm(pool) -> None:
    node = pool.node("solo", "--size=3", "--visibility=30").start()
    node.wait_for("/ready")

    pushed = [node.http("POST", "/push", f"job {i}".encode(),
                        {"Content-Type": "text/plain"}) for i in range(3)]
    assert [r.status for r in pushed] == [201, 201, 201]
    full = node.http("POST", "/push", b"one too many")
    assert full.status == 429
    assert full.json()["error"] == "queue_full"
    assert full.headers["retry-after"]

    got = node.http("GET", "/get?visibility=10")
    assert got.status == 200
    assert got.body == b"job 0"
    assert got.headers["dqid-id"] == pushed[0].json()["id"]
    assert got.headers["content-type"] == "text/plain"
    assert node.http("POST", f"/ack/{got.headers['dqid-id']}").status == 204
    assert node.http("POST", f"/ack/{got.headers['dqid-id']}").status == 404

    stats = node.http("GET", "/stats").json()
    assert stats["node"] == "solo"
    assert (stats["depth"], stats["ready"], stats["leased"]) == (2, 2, 0)
    assert stats["counters"]["acked"] == 1
    assert stats["counters"]["rejected_full"] == 1

    # Drain, then park a long poll and stop the node under it.
    for _ in range(2):
        message = node.http("GET", "/get")
        assert node.http("POST", f"/ack/{message.headers['dqid-id']}").status == 204
    answer: dict[str, int] = {}

    def long_poll() -> None:
        answer["status"] = node.http("GET", "/get?wait=15", timeout=20).status

    poller = threading.Thread(target=long_poll)
    poller.start()
    deadline_stats = node.http("GET", "/stats").json()
    for _ in range(100):
        if deadline_stats["waiting_gets"] == 1:
            break
        deadline_stats = node.http("GET", "/stats").json()
    assert deadline_stats["waiting_gets"] == 1
    node.signal(signal.SIGTERM)
    poller.join(10)
    assert answer.get("status") == 204
    assert _exited_cleanly(node.wait_exit())
    log = node.log_text()
    assert "Traceback" not in log
    assert "dqid node solo" in log


def test_console_script_runs_a_node(tmp_path) -> None:
    script = os.path.join(os.path.dirname(sys.executable), "dqid")
    port = free_port()
    proc = subprocess.Popen(
        [script, "--node-id=script", f"--http=tcp:{port}:interface=127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path,
    )
    try:
        probe = DqidProcess(tmp_path, "script", http_port=port)
        probe.proc = proc
        probe.wait_for("/health")
        assert http(port, "POST", "/push", b"x").status == 201
        assert not list(tmp_path.glob("*.pid")), "the console script writes no pidfile"
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=15)[0].decode()
    assert _exited_cleanly(proc.returncode)
    assert "Traceback" not in output


@pytest.mark.parametrize(
    "args, names",
    [
        (["--size=0"], "--size"),
        (["--size=abc"], "--size"),
        (["--peer=nonsense"], "--peer"),
        (["--http=nonsense:1"], "--http"),
        (["--node-id=bad id!"], "--node-id"),
        (["--min-copies=2"], "--min-copies"),
        (["--visibility=-1"], "--visibility"),
    ],
)
def test_bad_options_end_with_one_line_and_nonzero_exit(args, names) -> None:
    result = run_dqid(args)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert names in lines[0]


def test_port_in_use_stops_start_up_with_a_clear_message(tmp_path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_dqid(
            [f"--http=tcp:{port}:interface=127.0.0.1", "--node-id=clash"], timeout=30
        )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output
    assert "cannot listen for http" in output

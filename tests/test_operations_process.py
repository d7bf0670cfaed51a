"""Versions, JSON logs and config files on real processes (DESIGN.md,
"Operations"): what an operator types, and what comes out."""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .procs import TWISTD, DqidProcess, cluster_key_file, free_port, http

pytestmark = pytest.mark.process

SCRIPT = os.path.join(os.path.dirname(sys.executable), "dqid")
VERSION = importlib.metadata.version("dqid")


@pytest.mark.parametrize("command", [[SCRIPT, "--version"], [TWISTD, "dqid", "--version"]])
def test_version_prints_dqid_and_the_package_version(command) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"dqid {VERSION}\n"
    assert done.stderr == ""


def run_script(tmp_path: Path, args: list[str], node_id: str, port: int) -> list[str]:
    """Run the console script with ``args`` until /health answers, push one
    message, SIGTERM it; its stdout lines."""
    proc = subprocess.Popen([SCRIPT, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        probe = DqidProcess(tmp_path, node_id, http_port=port)
        probe.proc = proc
        probe.wait_for("/health")
        assert http(port, "POST", "/push", b"x").status == 201
        stats = http(port, "GET", "/stats").json()
        assert stats["node"] == node_id and stats["version"] == VERSION
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=15)[0].decode()
    return output.splitlines()


def assert_json_lines(lines: list[str], node_id: str) -> list[dict]:
    events = [json.loads(line) for line in lines]  # every line is one object
    assert events and all(isinstance(e, dict) for e in events)
    assert all("log_format" in e and "log_time" in e and "log_namespace" in e
               for e in events)
    started = [e for e in events if e.get("log_format", "").startswith("dqid node {node} (epoch")]
    assert len(started) == 1, lines
    assert started[0]["node"] == node_id  # named fields stay fields
    assert isinstance(started[0]["epoch"], int)
    assert not any("Traceback" in line for line in lines)
    return events


def test_the_console_script_logs_json_lines(tmp_path) -> None:
    port = free_port()
    lines = run_script(tmp_path, ["--log-format=json", "--node-id=j1",
                                  f"--http=tcp:{port}:interface=127.0.0.1"], "j1", port)
    events = assert_json_lines(lines, "j1")
    assert any(e.get("log_format") == "dqid node {node} stopping" for e in events)


def test_twistd_logs_the_same_with_its_logger_option(tmp_path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "--logger=dqid.logs.json_observer", "dqid",
         "--node-id=j2", f"--http=tcp:{port}:interface=127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        probe = DqidProcess(tmp_path, "j2", http_port=port)
        probe.proc = proc
        probe.wait_for("/health")
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=15)[0].decode()
    assert_json_lines(output.splitlines(), "j2")


def test_a_config_file_runs_a_node_and_the_command_line_wins(tmp_path) -> None:
    port = free_port()
    config = tmp_path / "dqid.toml"
    config.write_text(f'node-id = "from-file"\nhttp = "tcp:{port}:interface=127.0.0.1"\n'
                      'size = 3\nlog-format = "json"\n')
    lines = run_script(tmp_path, [f"--config={config}", "--node-id=from-cli"],
                       "from-cli", port)
    assert_json_lines(lines, "from-cli")


def test_a_cluster_whose_peers_live_in_the_config_file(pool, tmp_path) -> None:
    """One file per node holds the peer list; /cluster shows all three."""
    key = cluster_key_file(tmp_path)
    ports = {n: (free_port(), free_port()) for n in "abc"}
    nodes = []
    for name in "abc":
        peers = ", ".join(f'"{p}=127.0.0.1:{ports[p][1]}"' for p in "abc" if p != name)
        config = tmp_path / f"{name}.toml"
        config.write_text(f"peer = [{peers}]\ncluster-key-file = \"{key}\"\n"
                          "min-copies = 2\n")
        nodes.append(pool.node(name, f"--config={config}", http_port=ports[name][0],
                               amp_port=ports[name][1]).start())
    for node in nodes:
        node.wait_for("/ready", 30)
    document = nodes[0].http("GET", "/cluster").json()
    assert sorted(document["nodes"]) == ["a", "b", "c"]
    assert all(entry["up"] for entry in document["nodes"].values()), document
    assert document["nodes"]["b"]["stats"]["min_copies"] == 2


@pytest.mark.parametrize("content, problem", [
    ("size = ", "not TOML"),
    ("colour = 'blue'", "unknown option 'colour'"),
    ("node_id = 'x'", "option names use -, not _"),
    ("size = 0", "--size must be a whole number >= 1"),
    ("peer = 'nonsense'", "--peer must be ID=HOST:PORT"),
])
def test_a_bad_config_file_is_one_line_and_exit_2(tmp_path, content, problem) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(content + "\n")
    done = subprocess.run([SCRIPT, f"--config={config}"], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and problem in lines[0], done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_a_missing_config_file_is_one_line_naming_it(tmp_path) -> None:
    missing = tmp_path / "nowhere.toml"
    done = subprocess.run([SCRIPT, "--config", str(missing)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"dqid: error: --config {missing}: cannot read it: "
                                   "No such file or directory (see --help)")

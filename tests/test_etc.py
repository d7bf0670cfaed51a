"""The deployment examples in etc/ work as documented."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dqid.options import Options

from .procs import cluster_key_file, free_port, http

ETC = Path(__file__).resolve().parent.parent / "etc"


def test_systemd_unit_options_parse(tmp_path: Path) -> None:
    unit = (ETC / "dqid.service").read_text()
    exec_start = unit.split("ExecStart=", 1)[1].split("\n#", 1)[0].replace("\\\n", " ")
    words = shlex.split(exec_start)
    # The unit names where the key lives; this machine has none there.
    key_option = "--cluster-key-file=/etc/dqid/cluster.key"
    assert key_option in words
    key = cluster_key_file(tmp_path)
    words[words.index(key_option)] = f"--cluster-key-file={key}"
    options = Options()
    options.parseOptions(words[words.index("dqid") + 1:])
    assert options["cluster-key"] == key.read_bytes().strip()
    assert options["node-id"] == "n1"
    assert [p.node_id for p in options["peers"]] == ["n2", "n3"]
    assert options["min-copies"] == 3
    assert options["data-dir"] == "/var/lib/dqid"  # systemd's StateDirectory=dqid


def _free_base() -> int:
    """A base port whose +0..2 and +100..102 are all free."""
    for _ in range(50):
        base = free_port()
        if base > 65000:
            continue
        ports = [base + i for i in (0, 1, 2, 100, 101, 102)]
        if all(_is_free(p) for p in ports):
            return base
    raise RuntimeError("no free port range")


def _is_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_ready(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if http(port, "GET", "/ready", timeout=2).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"node on {port} not ready")


@pytest.mark.process
def test_local_cluster_recipe_survives_the_readme_walkthrough(tmp_path) -> None:
    base = _free_base()
    env = dict(os.environ, DQID_BASE_PORT=str(base), DQID_RUN_DIR=str(tmp_path),
               TWISTD=os.path.join(os.path.dirname(sys.executable), "twistd"))

    def recipe(*args: str) -> str:
        done = subprocess.run([str(ETC / "local-cluster.sh"), *args], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    recipe("start")
    try:
        for port in (base, base + 1, base + 2):
            _wait_ready(port)
        pushed = http(base, "POST", "/push", b"survive me")
        assert pushed.status == 201
        recipe("kill", "n1")
        recipe("start-node", "n1")
        _wait_ready(base)
        got = http(base, "GET", "/get")
        assert (got.status, got.body) == (200, b"survive me")
        assert got.headers["dqid-id"] == pushed.json()["id"]
    finally:
        recipe("stop")
    assert not list(tmp_path.glob("*.pid"))


def test_the_example_config_file_holds_the_defaults_the_recipe_shares(tmp_path) -> None:
    node = ["--node-id=n1", "--peer=n2=127.0.0.1:8182", "--peer=n3=127.0.0.1:8183",
            f"--cluster-key-file={cluster_key_file(tmp_path)}"]
    shared = Options()
    shared.parseOptions([f"--config={ETC / 'dqid.toml'}", *node])
    defaults = Options()
    defaults.parseOptions(node)
    names = ("size", "visibility", "max-message-bytes", "max-deliveries", "log-format")
    assert {n: shared[n] for n in names} == {n: defaults[n] for n in names}
    assert shared["min-copies"] == 3  # in the recipe's cluster of three: every node
    assert "--config=\"$CONFIG\"" in (ETC / "local-cluster.sh").read_text()

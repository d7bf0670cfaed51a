"""Real dqid processes on loopback for tests: start, talk HTTP, signal by PID.

Everything here is synchronous (subprocess + http.client) so a test reads
top to bottom.  Processes are only ever signalled by their own PID.
"""

from __future__ import annotations

import http.client as httplib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

TWISTD = shutil.which("twistd", path=os.path.dirname(sys.executable)) or "twistd"


_HANDED_OUT: set[int] = set()  # ports free_port gave, not to be given twice
_PORT_DRAWS = random.Random()  # its own: tests seed the shared one


def _ephemeral_low() -> int:
    """The lowest port the kernel picks for an outgoing connection."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            return int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port nothing listens on, for a process to listen on.

    Drawn below the kernel's ephemeral range: a port the kernel picked
    (bind to port 0) can be taken by any outgoing connection before the
    process it was meant for listens on it, which failed a soak run with
    "Address already in use".  Never the same port twice in one run."""
    low = _ephemeral_low()
    if low > 2048:
        for _ in range(200):
            port = _PORT_DRAWS.randrange(1024, low)
            if port in _HANDED_OUT:
                continue
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _HANDED_OUT.add(port)
            return port
    with socket.socket() as sock:  # (no room below the range)
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a live process has used so far (from
    /proc); 0.0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """The resident set size of a live process (VmRSS from /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Reply:
    conn = httplib.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Reply(
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            response.read(),
        )
    finally:
        conn.close()


def stop_process(proc: subprocess.Popen | None, grace: float) -> int | None:
    """SIGTERM ``proc`` by its PID, SIGKILL it if it has not gone within
    ``grace`` seconds; its exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


def wait_for_200(
    request: Callable[..., Reply],
    path: str,
    timeout: float,
    proc: subprocess.Popen | None,
    name: str,
    log_tail: Callable[[], str],
    interval: float = 0.05,
) -> Reply:
    """Poll GET ``path`` with ``request`` every ``interval`` seconds until
    200; fail with the log tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}:\n{log_tail()}")
        try:
            reply = request("GET", path, timeout=2)
            if reply.status == 200:
                return reply
            last = reply
        except OSError as error:
            last = error
        time.sleep(interval)
    raise AssertionError(f"{name} {path} not 200 in {timeout}s: {last}\n{log_tail()}")


def cluster_key_file(directory: Path, name: str = "cluster.key") -> Path:
    """A cluster key file (mode 0600, 32 random bytes as hex) in
    ``directory``, made once and then reused."""
    path = directory / name
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(os.urandom(32).hex() + "\n")
    return path


@dataclass
class DqidProcess:
    """One ``twistd -n dqid`` process with its own ports and log file."""

    workdir: Path
    node_id: str
    args: list[str] = field(default_factory=list)
    http_port: int = field(default_factory=free_port)
    amp_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    twistd: str = TWISTD
    started_at: float = 0.0  # time.monotonic() just before the process started

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.node_id}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        return [
            self.twistd, "-n", "--pidfile=", f"--logfile={self.log_path}", "dqid",
            f"--node-id={self.node_id}",
            f"--http=tcp:{self.http_port}:interface=127.0.0.1",
            f"--amp=tcp:{self.amp_port}:interface=127.0.0.1",
            *self.args,
        ]

    def start(self) -> "DqidProcess":
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / f"{self.node_id}.out", "ab") as out:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT,
                cwd=self.workdir, start_new_session=True,
            )
        return self

    def http(self, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None, timeout: float = 10.0) -> Reply:
        return http(self.http_port, method, path, body, headers, timeout)

    def wait_for(self, path: str = "/health", timeout: float = 20.0,
                 interval: float = 0.05) -> Reply:
        """Poll ``path`` until it answers 200; fail with the log if not."""
        return wait_for_200(self.http, path, timeout, self.proc, self.node_id, self.log_tail,
                            interval)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def wait_exit(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """kill -9 by PID and reap."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it does not go within 10 s."""
        return stop_process(self.proc, 10)

    def log_text(self) -> str:
        parts = []
        for path in (self.log_path, self.workdir / f"{self.node_id}.out"):
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def run_dqid(args: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run ``twistd -n dqid ARGS`` to completion (for start-up errors)."""
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", "dqid", *args],
        capture_output=True, text=True, timeout=timeout,
    )

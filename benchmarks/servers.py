"""The servers under test, as real processes on 127.0.0.1, stopped by PID.

Built on the test helpers: a dqid node is a ``tests.procs.DqidProcess``, a
cluster is a ``tests.cluster.LocalCluster``, and the bare twisted.web
server (``bare.py``) runs with the same life cycle.  A ``Fleet`` remembers
every process of a run so that all get stopped, also after an error.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.cluster import LocalCluster
from tests.procs import TWISTD, DqidProcess
from tests.tls_certs import Pki, make_pki

TARGETS = ("bare", "standalone", "cluster", "standalone-disk", "cluster-disk")
CLUSTER_IDS = ("a", "b", "c")
MIN_COPIES = 3
BARE_PROGRAM = Path(__file__).with_name("bare.py")


class BareServer(DqidProcess):
    """The bare baseline server, started, polled and stopped like a node."""

    def command(self) -> list[str]:
        return [sys.executable, str(BARE_PROGRAM), str(self.http_port)]


def stats(process: DqidProcess) -> dict:
    """GET /stats of a node; fails on any answer but 200."""
    reply = process.http("GET", "/stats")
    if reply.status != 200:
        raise RuntimeError(f"{process.node_id} /stats answered {reply.status}: "
                           f"{reply.body[:300]!r}")
    return reply.json()


def start_all(processes: list[DqidProcess], timeout: float = 60.0) -> None:
    """Start every process, then wait until each answers GET /ready."""
    for process in processes:
        process.start()
    for process in processes:
        process.wait_for("/ready", timeout, interval=0.01)


@dataclass
class Pool:
    """Makes the processes of one group (a target, the recovery cluster)
    in the group's own folder; what ``LocalCluster`` expects of a pool."""

    fleet: "Fleet"
    workdir: Path

    def node(self, node_id: str, *args: str, **ports: int) -> DqidProcess:
        process = DqidProcess(self.workdir, node_id, list(args), twistd=self.fleet.twistd,
                              **ports)
        return self.fleet.track(process)

    def bare(self) -> BareServer:
        return self.fleet.track(BareServer(self.workdir, "bare"))


@dataclass
class Fleet:
    """Every process started in one run, each group in its own folder."""

    workdir: Path
    twistd: str = TWISTD
    peer_tls: bool = False  # cluster links over mutual TLS
    pki: Pki | None = None  # the certificates, made on first use
    processes: list[DqidProcess] = field(default_factory=list)

    def node_args(self, node_id: str) -> list[str]:
        """Options of one cluster node: its certificate, with --peer-tls."""
        if not self.peer_tls:
            return []
        if self.pki is None:
            self.pki = make_pki(self.workdir / "pki", CLUSTER_IDS, foreign=())
        files = self.pki.nodes[node_id]
        return [f"--peer-tls-cert={files.cert}", f"--peer-tls-key={files.key}",
                f"--peer-tls-ca={files.ca}"]

    def track(self, process: DqidProcess) -> DqidProcess:
        self.processes.append(process)
        return process

    def pool(self, label: str) -> Pool:
        """A new folder ``label``, or ``label-2``, ``label-3`` ... when a
        group is started afresh."""
        name, n = label, 1
        while (self.workdir / name).exists():
            n += 1
            name = f"{label}-{n}"
        (self.workdir / name).mkdir(parents=True)
        return Pool(self, self.workdir / name)

    def standalone(self, node_id: str, size: int, label: str = "standalone",
                   disk: bool = False) -> DqidProcess:
        pool = self.pool(label)
        data = [f"--data-dir={pool.workdir / (node_id + '-data')}"] if disk else []
        return pool.node(node_id, f"--size={size}", *data)

    def cluster(self, label: str, size: int, disk: bool = False) -> LocalCluster:
        """Three nodes that know each other, ``--min-copies=3`` (with
        ``disk``: each with its ``--data-dir``)."""
        pool = self.pool(label)

        def node_args(node_id: str) -> list[str]:
            data = [f"--data-dir={pool.workdir / (node_id + '-data')}"] if disk else []
            return self.node_args(node_id) + data

        return LocalCluster(pool, CLUSTER_IDS, f"--size={size}",
                            f"--min-copies={MIN_COPIES}", node_args=node_args)

    def target(self, target: str, size: int) -> list[DqidProcess]:
        """Fresh (not yet started) processes for a benchmark target."""
        disk = target.endswith("-disk")
        if target == "bare":
            return [self.pool("bare").bare()]
        if target.startswith("standalone"):
            return [self.standalone("solo", size, label=target, disk=disk)]
        return list(self.cluster(target, size, disk=disk).nodes.values())

    def stop_all(self) -> None:
        for process in self.processes:
            process.stop()

    def problems_in_logs(self) -> list[str]:
        """Tracebacks and unhandled errors in the logs (a log shared by a
        node and its replacement is read once)."""
        found: list[str] = []
        seen: set[Path] = set()
        for process in self.processes:
            if process.log_path in seen:
                continue
            seen.add(process.log_path)
            lines = process.log_text().splitlines()
            for n, line in enumerate(lines):
                if "Traceback" in line or "Unhandled" in line or "unhandled error" in line:
                    found.append(f"{process.workdir.name}/{process.node_id} log: "
                                 + "\n    ".join(lines[max(0, n - 1):n + 12]))
                    if len(found) > 6:
                        return found
        return found

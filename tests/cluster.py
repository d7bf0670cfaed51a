"""A local cluster of real dqid processes for tests (sync, by PID)."""

from __future__ import annotations

import time
from typing import Callable, Iterable

from .procs import DqidProcess, Reply, cluster_key_file, free_port


class LocalCluster:
    """N ``twistd dqid`` nodes on loopback, each knowing the others as peers."""

    def __init__(self, pool, ids: Iterable[str] = ("a", "b", "c"), *args: str,
                 fault_proxy: bool = False,
                 node_args: Callable[[str], list[str]] | None = None) -> None:
        self.pool = pool
        self.ids = list(ids)
        self.args = list(args)
        # Options of one node only (its certificate, its data directory).
        self.node_args = node_args or (lambda node_id: [])
        self.ports = {i: (free_port(), free_port()) for i in self.ids}
        # With a fault proxy, node S reaches peer D's AMP port through its
        # own route (S, D), so the links of one node can be cut alone.
        self.routes: dict[tuple[str, str], int] = {}
        self.faults = None
        if fault_proxy:
            self.routes = {
                (s, d): free_port() for s in self.ids for d in self.ids if s != d
            }
            self.faults = pool.faultproxy(
                {port: self.ports[d][1] for (s, d), port in self.routes.items()}
            )
        self.nodes: dict[str, DqidProcess] = {}
        for node_id in self.ids:
            self.nodes[node_id] = self._make(node_id)

    def _peer_port(self, source: str, dest: str) -> int:
        if self.routes:
            return self.routes[(source, dest)]
        return self.ports[dest][1]

    def _make(self, node_id: str, http_port: int | None = None,
              amp_port: int | None = None) -> DqidProcess:
        default_http, default_amp = self.ports[node_id]
        peers = [
            f"--peer={other}=127.0.0.1:{self._peer_port(node_id, other)}"
            for other in self.ids if other != node_id
        ]
        key = f"--cluster-key-file={cluster_key_file(self.pool.workdir)}"
        return self.pool.node(node_id, *peers, key, *self.args, *self.node_args(node_id),
                              http_port=http_port or default_http,
                              amp_port=amp_port or default_amp)

    def cut(self, node_id: str, mode: str = "blackhole") -> None:
        """Cut every AMP link of ``node_id`` (both directions); its HTTP
        port stays reachable.  ``mode`` "pass" heals it."""
        assert self.faults is not None, "start the cluster with fault_proxy=True"
        for (source, dest), port in self.routes.items():
            if node_id in (source, dest):
                self.faults.set_mode(port, mode)

    def heal(self) -> None:
        assert self.faults is not None
        for port in self.routes.values():
            self.faults.set_mode(port, "pass")

    def start_twin(self, node_id: str, wait: str = "/ready") -> DqidProcess:
        """Start a replacement of ``node_id`` on new ports while the old
        process may still live (paused): peers are routed to the new one."""
        assert self.faults is not None, "start the cluster with fault_proxy=True"
        http_port, amp_port = free_port(), free_port()
        self.ports[node_id] = (http_port, amp_port)
        for (source, dest), port in self.routes.items():
            if dest == node_id:
                self.faults.retarget(port, amp_port)
        twin = self._make(node_id)
        self.nodes[node_id] = twin
        twin.start()
        if wait:
            twin.wait_for(wait, 30)
        return twin

    def http_ports(self) -> list[int]:
        return [node.http_port for node in self.nodes.values()]

    def __getitem__(self, node_id: str) -> DqidProcess:
        return self.nodes[node_id]

    def start(self, timeout: float = 30.0) -> "LocalCluster":
        for node in self.nodes.values():
            node.start()
        for node in self.nodes.values():
            try:
                node.wait_for("/ready", timeout)
            except AssertionError as error:
                # Say which node failed to start (a dead peer keeps this one
                # recovering), not only the one that waited for it.
                dead = [f"{n.node_id} exited with {n.proc.returncode}:\n{n.log_tail()}"
                        for n in self.nodes.values() if n.proc is not None and not n.alive()]
                raise AssertionError("\n".join([str(error), *dead])) from None
        return self

    def replace(self, node_id: str, wait: str = "/ready") -> DqidProcess:
        """kill -9 ``node_id`` and start a fresh process with the same id."""
        self.nodes[node_id].kill()
        fresh = self._make(node_id)
        self.nodes[node_id] = fresh
        fresh.start()
        if wait == "recovered":
            self.wait_recovered(node_id)
        elif wait:
            fresh.wait_for(wait, 30)
        return fresh

    def wait_recovered(self, node_id: str, timeout: float = 30.0) -> None:
        """Until ``node_id`` has its queue back (it may still refuse writes
        for lack of peers)."""
        def recovered() -> bool:
            try:
                reason = self.stats(node_id)["not_ready_reason"] or ""
            except (OSError, ValueError):
                return False
            return not reason.startswith("recovering")

        self.wait_until(recovered, timeout, what=f"{node_id} to recover")

    def stats(self, node_id: str) -> dict:
        return self.nodes[node_id].http("GET", "/stats").json()

    def wait_until(self, check, timeout: float = 15.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def held_everywhere(self, owner: str) -> dict[str, int]:
        return {
            n: self.stats(n)["peers"][owner]["held"] for n in self.ids if n != owner
        }

    def push(self, node_id: str, body: bytes, headers: dict | None = None) -> Reply:
        return self.nodes[node_id].http("POST", "/push", body, headers)

    def drain(self, timeout: float = 30.0) -> dict[str, bytes]:
        """Take and ack everything, through every node in turn, until all
        answer 204 twice in a row.  Returns {id: body}."""
        seen: dict[str, bytes] = {}
        deadline = time.monotonic() + timeout
        quiet_rounds = 0
        while quiet_rounds < 2:
            assert time.monotonic() < deadline, f"drain did not finish; got {len(seen)}"
            got_any = False
            for node in self.nodes.values():
                reply = node.http("GET", "/get?count=100&visibility=60")
                if reply.status == 204:
                    continue
                assert reply.status == 200, reply
                got_any = True
                messages = reply.json()["messages"]
                for message in messages:
                    seen[message["id"]] = message["body"].encode()
                acked = node.http(
                    "POST", "/ack",
                    ('{"ids": [%s]}' % ",".join(f'"{m["id"]}"' for m in messages)).encode(),
                ).json()
                assert not acked["unknown"], acked
            quiet_rounds = 0 if got_any else quiet_rounds + 1
            if not got_any:
                time.sleep(0.3)  # let heartbeats carry ready counts
        return seen

"""A local cluster of real dqid processes for tests (sync, by PID)."""

from __future__ import annotations

import time
from typing import Iterable

from .procs import DqidProcess, Reply, free_port


class LocalCluster:
    """N ``twistd dqid`` nodes on loopback, each knowing the others as peers."""

    def __init__(self, pool, ids: Iterable[str] = ("a", "b", "c"), *args: str) -> None:
        self.pool = pool
        self.ids = list(ids)
        self.args = list(args)
        self.ports = {i: (free_port(), free_port()) for i in self.ids}
        self.nodes: dict[str, DqidProcess] = {}
        for node_id in self.ids:
            self.nodes[node_id] = self._make(node_id)

    def _make(self, node_id: str) -> DqidProcess:
        http_port, amp_port = self.ports[node_id]
        peers = [
            f"--peer={other}=127.0.0.1:{self.ports[other][1]}"
            for other in self.ids if other != node_id
        ]
        return self.pool.node(node_id, *peers, *self.args,
                              http_port=http_port, amp_port=amp_port)

    def __getitem__(self, node_id: str) -> DqidProcess:
        return self.nodes[node_id]

    def start(self, timeout: float = 30.0) -> "LocalCluster":
        for node in self.nodes.values():
            node.start()
        for node in self.nodes.values():
            node.wait_for("/ready", timeout)
        return self

    def replace(self, node_id: str, wait: str = "/ready") -> DqidProcess:
        """kill -9 ``node_id`` and start a fresh process with the same id."""
        self.nodes[node_id].kill()
        fresh = self._make(node_id)
        self.nodes[node_id] = fresh
        fresh.start()
        if wait:
            fresh.wait_for(wait, 30)
        return fresh

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

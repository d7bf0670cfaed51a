#!/usr/bin/env python3
"""Benchmark dqid against a bare twisted.web server, in one run.

Starts, on 127.0.0.1 with free ports, as separate processes:

* ``bare``       a tiny twisted.web Resource server (POST /push appends to a
                 deque, GET /get pops): the ceiling of the framework;
* ``standalone`` one dqid node;
* ``cluster``    three dqid nodes with --min-copies=3 (requests go
                 round-robin over the three HTTP ports, like a balancer).

For every target it runs three phases of ``--count`` messages: push, get+ack
(get only on the bare server) and end-to-end (producers and consumers at
once).  The dqid targets then run two batch phases of ``--batch-count``
messages: batch push (POST /push/batch of ``--batch-size``) and batch
get+ack (GET /get?count=K, then POST /ack with the K ids).  Load comes from
``--procs`` client processes holding ``--concurrency`` keep-alive HTTP/1.1
connections in all (raw sockets, one thread each).

Then it measures how long a replacement cluster node takes to recover a
queue of ``--recover-count`` messages, and the RSS a standalone node spends
per queued message, and checks the issue's targets (met / NOT met).

Uses only the standard library (the servers need twisted, as dqid does).
Every process it starts is stopped by its PID (SIGTERM, then SIGKILL), also
on errors and Ctrl-C.

    /work/venv/bin/python benchmarks/bench.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from typing import Any

TARGETS = ("bare", "standalone", "cluster")
PHASES = ("push", "get+ack", "e2e")
BATCH_PHASES = ("batch push", "batch get+ack")  # dqid only: bare has no batch endpoints
REQUEST_TIMEOUT = 30.0  # seconds one request may take before it counts as hung
MAX_SAMPLES = 8  # unexpected responses kept per client process and phase
MAX_PUSH_BATCH = 1000  # dqid's limits: messages per POST /push/batch,
MAX_GET_COUNT = 100  # and per GET /get?count=K
RECOVERY_FILL_BATCH = 1000  # messages per POST /push/batch filling the recovery cluster


# --------------------------------------------------------------------------
# the bare twisted.web baseline server (run as ``bench.py --bare-server PORT``)

def bare_server(port: int) -> None:
    import collections
    import itertools

    from twisted.internet import reactor
    from twisted.web import resource, server

    queue: collections.deque = collections.deque()
    ids = itertools.count(1)

    class Push(resource.Resource):
        isLeaf = True

        def render_POST(self, request):
            body = request.content.read()
            queue.append(body)
            request.setResponseCode(201)
            request.setHeader(b"Content-Type", b"application/json")
            return b'{"id":"%d"}' % next(ids)

    class Get(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            if not queue:
                request.setResponseCode(204)
                return b""
            request.setHeader(b"Content-Type", b"application/octet-stream")
            return queue.popleft()

    class Ready(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            return b'{"status":"ready"}'

    class QuietSite(server.Site):
        def log(self, request):  # no access log, like dqid
            pass

    root = resource.Resource()
    root.putChild(b"push", Push())
    root.putChild(b"get", Get())
    root.putChild(b"ready", Ready())
    site = QuietSite(root)
    site.displayTracebacks = False
    reactor.listenTCP(port, site, interface="127.0.0.1")
    reactor.run()


# --------------------------------------------------------------------------
# processes

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_twistd() -> str:
    return (shutil.which("twistd", path=os.path.dirname(sys.executable))
            or shutil.which("twistd") or "twistd")


def control(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    """One request on its own connection (for /ready, /stats, fills)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


class Server:
    """One server process with its own log; stopped by PID."""

    def __init__(self, name: str, command: list[str], http_port: int, workdir: str) -> None:
        self.name = name
        self.command = command
        self.http_port = http_port
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, f"{self.name}.log")

    def start(self) -> "Server":
        out = open(os.path.join(self.workdir, f"{self.name}.out"), "ab")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=self.workdir, start_new_session=True,
        )
        out.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 60.0, path: str = "/ready") -> float:
        """Poll ``path`` until 200; seconds since start."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                status, body = control(self.http_port, "GET", path, timeout=2)
                if status == 200:
                    return time.monotonic() - self.started_at
                last = (status, body[:200])
            except OSError as error:
                last = error
            time.sleep(0.01)
        raise RuntimeError(f"{self.name} {path} not 200 after {timeout}s (last: {last})\n"
                           f"{self.log_tail()}")

    def stats(self) -> dict:
        status, body = control(self.http_port, "GET", "/stats")
        if status != 200:
            raise RuntimeError(f"{self.name} /stats answered {status}: {body[:300]!r}")
        return json.loads(body)

    def kill9(self) -> None:
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if not self.alive():
            return
        try:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill9()
        except ProcessLookupError:
            pass

    def log_text(self) -> str:
        parts = []
        for path in (self.log_path, os.path.join(self.workdir, f"{self.name}.out")):
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    parts.append(f.read())
        return "\n".join(parts)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


class Fleet:
    """Every server started in this run, so that all get stopped."""

    def __init__(self, args: argparse.Namespace, workdir: str) -> None:
        self.args = args
        self.workdir = workdir
        self.twistd = args.twistd or find_twistd()
        self.servers: list[Server] = []

    def _name(self, name: str) -> str:
        """``name``, or ``name-2``, ``name-3`` ... for a later incarnation."""
        taken = {s.name for s in self.servers}
        if name not in taken:
            return name
        n = 2
        while f"{name}-{n}" in taken:
            n += 1
        return f"{name}-{n}"

    def bare(self) -> Server:
        port = free_port()
        server = Server(self._name("bare"), [sys.executable, os.path.abspath(__file__),
                                             "--bare-server", str(port)], port, self.workdir)
        self.servers.append(server)
        return server

    def dqid(self, name: str, node_id: str, size: int, http_port: int, amp_port: int,
             extra: list[str]) -> Server:
        name = self._name(name)
        command = [
            self.twistd, "-n", "--pidfile=", f"--logfile={os.path.join(self.workdir, name)}.log",
            "dqid", f"--node-id={node_id}", f"--size={size}",
            f"--http=tcp:{http_port}:interface=127.0.0.1",
            f"--amp=tcp:{amp_port}:interface=127.0.0.1", *extra,
        ]
        server = Server(name, command, http_port, self.workdir)
        self.servers.append(server)
        return server

    def target(self, target: str, size: int) -> list[Server]:
        """Fresh (not yet started) server processes for a benchmark target."""
        if target == "bare":
            return [self.bare()]
        if target == "standalone":
            return [self.dqid("standalone", "solo", size, free_port(), free_port(), [])]
        return list(LocalCluster(self, "cluster", size).nodes.values())

    def stop_all(self) -> None:
        for server in self.servers:  # SIGTERM all first, then wait for each
            if server.alive():
                try:
                    os.kill(server.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for server in self.servers:
            if server.proc is None:
                continue
            try:
                server.proc.wait(10)
            except subprocess.TimeoutExpired:
                server.kill9()

    def problems_in_logs(self) -> list[str]:
        found = []
        for server in self.servers:
            text = server.log_text()
            lines = text.splitlines()
            for n, line in enumerate(lines):
                if "Traceback" in line or "Unhandled" in line or "unhandled error" in line:
                    found.append(f"{server.name} log: "
                                 + "\n    ".join(lines[max(0, n - 1):n + 12]))
                    if len(found) > 6:
                        return found
        return found


class LocalCluster:
    """Three dqid nodes (a, b, c) on loopback that know each other as peers."""

    def __init__(self, fleet: Fleet, prefix: str, size: int,
                 ids: tuple[str, ...] = ("a", "b", "c"), min_copies: int = 3) -> None:
        self.fleet = fleet
        self.prefix = prefix
        self.size = size
        self.ids = ids
        self.min_copies = min_copies
        self.ports = {i: (free_port(), free_port()) for i in ids}
        self.nodes = {i: self.node(i) for i in ids}

    def node(self, node_id: str) -> Server:
        """A new process for ``node_id`` (same ports, same peers)."""
        http_port, amp_port = self.ports[node_id]
        peers = [f"--peer={o}=127.0.0.1:{self.ports[o][1]}" for o in self.ids if o != node_id]
        return self.fleet.dqid(f"{self.prefix}-{node_id}", node_id, self.size, http_port,
                               amp_port, [*peers, f"--min-copies={self.min_copies}"])


# --------------------------------------------------------------------------
# the load generator (client processes, each with threads on raw sockets)

class RawConn:
    """A minimal keep-alive HTTP/1.1 client connection on a raw socket."""

    __slots__ = ("port", "sock", "buf")

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.buf = b""

    def connect(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=REQUEST_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.buf = b""

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None
        self.buf = b""

    def _more(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        return chunk

    def request(self, data: bytes) -> tuple[int, bytes, bytes]:
        """Send one request; (status, raw head, body)."""
        if self.sock is None:
            self.connect()
        self.sock.sendall(data)
        buf = self.buf
        while True:
            i = buf.find(b"\r\n\r\n")
            if i >= 0:
                break
            buf += self._more()
        head = buf[:i + 2]  # keeps the last header's CRLF
        buf = buf[i + 4:]
        status = int(head[9:12])
        lower = head.lower()
        j = lower.find(b"\r\ncontent-length:")
        if j >= 0:
            n = int(lower[j + 17:lower.find(b"\r\n", j + 2)])
            while len(buf) < n:
                buf += self._more()
            body, buf = buf[:n], buf[n:]
        elif status == 204 or status == 304 or status < 200:
            body = b""
        elif b"\r\ntransfer-encoding: chunked\r\n" in lower:
            body, buf = self._chunked(buf)
        else:  # body up to close
            parts = [buf]
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                parts.append(chunk)
            self.close()
            return status, head, b"".join(parts)
        self.buf = buf
        if b"\r\nconnection: close\r\n" in lower:
            self.close()
        return status, head, body

    def _chunked(self, buf: bytes) -> tuple[bytes, bytes]:
        parts = []
        while True:
            while (i := buf.find(b"\r\n")) < 0:
                buf += self._more()
            size = int(buf[:i].split(b";", 1)[0], 16)
            buf = buf[i + 2:]
            if size == 0:
                while True:  # trailers up to an empty line
                    while (i := buf.find(b"\r\n")) < 0:
                        buf += self._more()
                    line, buf = buf[:i], buf[i + 2:]
                    if not line:
                        return b"".join(parts), buf
            while len(buf) < size + 2:
                buf += self._more()
            parts.append(buf[:size])
            buf = buf[size + 2:]


def header(head: bytes, name: bytes) -> bytes | None:
    """A header's value from a raw head (``name`` lower case)."""
    j = head.lower().find(b"\r\n" + name + b":")
    if j < 0:
        return None
    start = j + len(name) + 3
    return head[start:head.find(b"\r\n", start)].strip()


class Flow:
    """One client connection slot (a thread): its requests, timings, errors."""

    def __init__(self, ports: list[int], offset: int, spec: dict) -> None:
        self.conns = [RawConn(p) for p in ports]
        self.turn = offset
        self.spec = spec
        self.lat = {"push": array("d"), "get": array("d"), "ack": array("d")}
        self.delivery = array("d")
        self.statuses: dict[int, int] = {}
        self.samples: list[str] = []
        self.errors = 0
        self.empties = 0
        self.done = 0
        self.end = 0.0
        self.timed_out = False
        self.deadline = float("inf")

    def connect(self) -> None:
        for conn in self.conns:
            conn.connect()

    def close(self) -> None:
        for conn in self.conns:
            conn.close()

    def call(self, data: bytes, what: str, kind: str) -> tuple[int, bytes, bytes] | None:
        """One request, round-robin over the target's ports; None if it
        failed at the connection level (recorded)."""
        conn = self.conns[self.turn % len(self.conns)]
        self.turn += 1
        t0 = time.perf_counter()
        try:
            status, head, body = conn.request(data)
        except (OSError, ValueError) as error:
            conn.close()
            self.errors += 1
            self.sample(f"{what} to port {conn.port}: {type(error).__name__}: {error} "
                        f"after {time.perf_counter() - t0:.3f}s")
            time.sleep(0.05)
            return None
        self.lat[kind].append(time.perf_counter() - t0)
        self.statuses[status] = self.statuses.get(status, 0) + 1
        return status, head, body

    def unexpected(self, what: str, kind: str, status: int, head: bytes, body: bytes) -> None:
        self.errors += 1
        self.lat[kind].pop()  # only successful requests count for latency
        self.sample(f"{what} -> {status}: {body[:300]!r} "
                    f"(head: {head.decode('latin-1').strip()[:300]!r})")

    def sample(self, text: str) -> None:
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(text)

    def over(self) -> bool:
        if self.errors > 1000 or time.perf_counter() > self.deadline:
            self.timed_out = True
            return True
        return False

    # -- roles ---------------------------------------------------------------

    def produce(self, quota: int) -> None:
        spec = self.spec
        size = spec["size"]
        stamp = spec["stamp"]
        fixed = spec["push_req"]
        prefix = b"POST /push HTTP/1.1\r\nHost: bench\r\nContent-Length: %d\r\n\r\n" % size
        pad = b"x" * max(0, size - 24)
        while self.done < quota and not self.over():
            if stamp:
                data = prefix + b"%024.6f" % time.perf_counter() + pad
            else:
                data = fixed
            reply = self.call(data, "POST /push", "push")
            if reply is None:
                continue
            status, head, body = reply
            if status == 201:
                self.done += 1
            else:
                self.unexpected("POST /push", "push", status, head, body)
                time.sleep(0.05 if status in (429, 503) else 0.01)
        self.end = time.perf_counter()

    def consume(self, quota: int) -> None:
        spec = self.spec
        get_req = spec["get_req"]
        ack = spec["ack"]
        stamp = spec["stamp"]
        backoff = 0.002
        while self.done < quota and not self.over():
            reply = self.call(get_req, "GET /get", "get")
            if reply is None:
                continue
            status, head, body = reply
            if status == 204:
                self.lat["get"].pop()
                self.empties += 1
                time.sleep(backoff)
                backoff = min(backoff * 2, 0.02)
                continue
            if status != 200:
                self.unexpected("GET /get", "get", status, head, body)
                time.sleep(0.01)
                continue
            backoff = 0.002
            if stamp:
                try:
                    self.delivery.append(time.perf_counter() - float(body[:24]))
                except ValueError:
                    pass
            if ack:
                mid = header(head, b"dqid-id")
                if mid is None:
                    self.unexpected("GET /get (no Dqid-Id)", "get", status, head, body)
                    continue
                what = "POST /ack/" + mid.decode("latin-1")
                data = b"POST /ack/%s HTTP/1.1\r\nHost: bench\r\nContent-Length: 0\r\n\r\n" % mid
                while not self.over():
                    reply = self.call(data, what, "ack")
                    if reply is None:
                        continue  # connection failed: retry the ack
                    status, head, body = reply
                    if status != 204:
                        self.unexpected(what, "ack", status, head, body)
                        if status == 503:
                            time.sleep(0.05)
                            continue  # not ready: retry
                    break  # 204, or 404 (delivered anyway)
            self.done += 1
        self.end = time.perf_counter()

    def produce_batch(self, quota: int) -> None:
        """POST /push/batch of ``batch`` messages (fewer for the last one)."""
        spec = self.spec
        batch = spec["batch"]
        full = spec["batch_req"]
        while self.done < quota and not self.over():
            n = min(batch, quota - self.done)
            data = full if n == batch else batch_push_request(n, spec["size"])
            reply = self.call(data, "POST /push/batch", "push")
            if reply is None:
                continue
            status, head, body = reply
            if status == 201:
                try:
                    got = len(json.loads(body)["ids"])
                except (ValueError, KeyError, TypeError):
                    got = -1
                if got != n:
                    self.unexpected(f"POST /push/batch of {n} (ids: {got})", "push",
                                    status, head, body)
                self.done += max(got, 0)
            else:
                self.unexpected("POST /push/batch", "push", status, head, body)
                time.sleep(0.05 if status in (429, 503) else 0.01)
        self.end = time.perf_counter()

    def consume_batch(self, quota: int) -> None:
        """GET /get?count=K, then POST /ack {"ids": [...]} of what came."""
        spec = self.spec
        batch = min(spec["batch"], MAX_GET_COUNT)
        backoff = 0.002
        while self.done < quota and not self.over():
            k = min(batch, quota - self.done)
            data = (b"GET /get?count=%d&visibility=300 HTTP/1.1\r\nHost: bench\r\n\r\n" % k)
            reply = self.call(data, f"GET /get?count={k}", "get")
            if reply is None:
                continue
            status, head, body = reply
            if status == 204:
                self.lat["get"].pop()
                self.empties += 1
                time.sleep(backoff)
                backoff = min(backoff * 2, 0.02)
                continue
            try:
                ids = [m["id"] for m in json.loads(body)["messages"]] if status == 200 else None
            except (ValueError, KeyError, TypeError):
                ids = None
            if not ids or len(ids) > k:
                self.unexpected(f"GET /get?count={k}", "get", status, head, body)
                time.sleep(0.01)
                continue
            backoff = 0.002
            payload = json.dumps({"ids": ids}).encode()
            data = (b"POST /ack HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
            what = f"POST /ack of {len(ids)} ids"
            while not self.over():
                reply = self.call(data, what, "ack")
                if reply is None:
                    continue  # connection failed: retry the acks (repeats answer unknown)
                status, head, body = reply
                if status == 200:
                    try:
                        unknown = json.loads(body)["unknown"]
                    except (ValueError, KeyError, TypeError):
                        unknown = None
                    if unknown != []:
                        self.unexpected(what, "ack", status, head, body)
                    break
                self.unexpected(what, "ack", status, head, body)
                if status == 503:
                    time.sleep(0.05)
                    continue  # not ready: retry
                break
            self.done += len(ids)
        self.end = time.perf_counter()


def batch_push_request(n: int, size: int) -> bytes:
    """POST /push/batch of ``n`` messages of ``size`` bytes (ASCII bodies)."""
    payload = json.dumps({"messages": [{"body": "m" * size}] * n}).encode()
    return (b"POST /push/batch HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def client_process(index: int, flows_spec: list[tuple[str, int, int]], spec: dict,
                   barrier: Any, results: Any) -> None:
    """Runs in a client process: one thread per flow, all started together."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us by PID
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    flows = []
    try:
        for role, quota, offset in flows_spec:
            flow = Flow(spec["ports"], offset, spec)
            flow.connect()
            flows.append((flow, role, quota))
    except OSError as error:
        barrier.abort()
        results.put({"index": index, "fatal": f"connect failed: {error}"})
        return
    go = threading.Event()
    threads = []
    for flow, role, quota in flows:
        target = {"producer": flow.produce, "consumer": flow.consume,
                  "batch-producer": flow.produce_batch,
                  "batch-consumer": flow.consume_batch}[role]
        thread = threading.Thread(target=lambda t=target, q=quota: (go.wait(), t(q)))
        thread.start()
        threads.append(thread)
    try:
        barrier.wait(timeout=60)
    except threading.BrokenBarrierError:
        results.put({"index": index, "fatal": "the start barrier broke"})
        for flow, _, _ in flows:
            flow.deadline = 0.0
        go.set()
        return
    start = time.perf_counter()
    cpu0 = time.process_time()
    deadline = start + spec["timeout"]
    for flow, _, _ in flows:
        flow.deadline = deadline
    go.set()
    for thread in threads:
        thread.join()
    cpu = time.process_time() - cpu0
    for flow, _, _ in flows:
        flow.close()
    out: dict[str, Any] = {"index": index, "cpu": cpu, "statuses": {}, "samples": [],
                           "lat": {k: array("d") for k in ("push", "get", "ack")},
                           "delivery": array("d"), "errors": 0,
                           "empties": 0, "produced": 0, "consumed": 0, "end": 0.0,
                           "timed_out": False}
    for flow, role, _ in flows:
        for kind, values in flow.lat.items():
            out["lat"][kind].extend(values)
        out["delivery"].extend(flow.delivery)
        for status, n in flow.statuses.items():
            out["statuses"][status] = out["statuses"].get(status, 0) + n
        out["samples"].extend(flow.samples)
        out["errors"] += flow.errors
        out["empties"] += flow.empties
        out["produced" if role.endswith("producer") else "consumed"] += flow.done
        out["end"] = max(out["end"], flow.end)
        out["timed_out"] |= flow.timed_out
    out["lat"] = {k: v.tobytes() for k, v in out["lat"].items()}
    out["delivery"] = out["delivery"].tobytes()
    results.put(out)


def percentile(sorted_values: array, q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def run_phase(phase: str, ports: list[int], ack: bool, args: argparse.Namespace,
              server_pids: list[int], count: int | None = None,
              size: int | None = None, batch: int | None = None) -> dict:
    """Run one phase with fresh client processes; its measurements.

    ``push``, ``get+ack``, ``e2e``: one message per request (on bare, no
    ack); ``batch push``, ``batch get+ack``: ``batch`` (default
    --batch-size) messages per request."""
    count = args.count if count is None else count
    batch = args.batch_size if batch is None else batch
    conc = max(2 if phase == "e2e" else 1, args.concurrency)
    procs = max(1, min(args.procs, conc))
    size = args.size_bytes if size is None else size
    roles: list[tuple[str, int]] = []
    if phase == "push":
        roles = [("producer", q) for q in split(count, conc)]
    elif phase == "get+ack":
        roles = [("consumer", q) for q in split(count, conc)]
    elif phase == "batch push":
        roles = [("batch-producer", q) for q in split(count, conc)]
    elif phase == "batch get+ack":
        roles = [("batch-consumer", q) for q in split(count, conc)]
    else:  # half producers, half consumers, alternating (so every process has both)
        producers = [("producer", q) for q in split(count, conc // 2)]
        consumers = [("consumer", q) for q in split(count, conc - conc // 2)]
        while producers or consumers:
            roles.extend(consumers[:1] + producers[:1])
            del consumers[:1], producers[:1]
    spec = {
        "ports": ports,
        "size": size,
        "ack": ack,
        "stamp": phase == "e2e" and size >= 24,
        "push_req": b"POST /push HTTP/1.1\r\nHost: bench\r\nContent-Length: %d\r\n\r\n%s"
                    % (size, b"m" * size),
        "get_req": b"GET /get?visibility=300 HTTP/1.1\r\nHost: bench\r\n\r\n",
        "batch": batch,
        "batch_req": batch_push_request(batch, size) if phase == "batch push" else b"",
        "timeout": args.phase_timeout,
    }
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(procs + 1)
    results = ctx.Queue()
    workers = []
    first = 0
    for p, n in enumerate(split(conc, procs)):  # contiguous blocks of flows
        flows = [(role, quota, i) for i, (role, quota) in enumerate(roles)
                 if first <= i < first + n]
        first += n
        worker = ctx.Process(target=client_process, args=(p, flows, spec, barrier, results),
                             daemon=True)
        worker.start()
        workers.append(worker)
    outs = []
    try:
        try:
            barrier.wait(timeout=60)
        except threading.BrokenBarrierError:
            pass
        start = time.perf_counter()
        cpu0 = sum(cpu_seconds(pid) for pid in server_pids)
        for _ in workers:
            outs.append(results.get(timeout=args.phase_timeout + 60))
        server_cpu = sum(cpu_seconds(pid) for pid in server_pids) - cpu0
    finally:
        for worker in workers:
            worker.join(5)
            if worker.is_alive():
                worker.terminate()  # by its PID
                worker.join(5)
    fatal = [o["fatal"] for o in outs if "fatal" in o]
    if fatal:
        raise RuntimeError(f"{phase}: client could not start: {fatal[0]}")
    end = max(o["end"] for o in outs)
    elapsed = max(end - start, 1e-9)
    by_kind = {k: array("d") for k in ("push", "get", "ack")}
    delivery = array("d")
    statuses: dict[int, int] = {}
    for o in outs:
        for kind, raw in o["lat"].items():
            by_kind[kind].frombytes(raw)
        delivery.frombytes(o["delivery"])
        for status, n in o["statuses"].items():
            statuses[status] = statuses.get(status, 0) + n
    lat = array("d", sorted(v for values in by_kind.values() for v in values))
    by_kind = {k: array("d", sorted(v)) for k, v in by_kind.items() if v}
    delivery = array("d", sorted(delivery))
    produced = sum(o["produced"] for o in outs)
    consumed = sum(o["consumed"] for o in outs)
    msgs = produced if phase.endswith("push") else consumed
    requests = sum(statuses.values())
    return {
        "phase": phase,
        "batch": batch if phase.startswith("batch") else 1,
        "messages": msgs,
        "produced": produced,
        "consumed": consumed,
        "seconds": elapsed,
        "msgs_per_s": msgs / elapsed,
        "requests": requests,
        "req_per_s": requests / elapsed,
        "p50_ms": percentile(lat, 0.50) * 1000,
        "p99_ms": percentile(lat, 0.99) * 1000,
        "max_ms": (lat[-1] * 1000) if lat else float("nan"),
        "by_request": {k: {"count": len(v), "p50_ms": percentile(v, 0.50) * 1000,
                           "p99_ms": percentile(v, 0.99) * 1000}
                       for k, v in by_kind.items()},
        "delivery_p50_ms": percentile(delivery, 0.50) * 1000 if delivery else None,
        "delivery_p99_ms": percentile(delivery, 0.99) * 1000 if delivery else None,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": sum(o["errors"] for o in outs),
        "empty_gets": sum(o["empties"] for o in outs),
        "timed_out": any(o["timed_out"] for o in outs),
        "server_cpu_pct": 100 * server_cpu / elapsed,
        "client_cpu_pct": 100 * sum(o["cpu"] for o in outs) / elapsed,
        "samples": [s for o in outs for s in o["samples"]][:12],
    }


# --------------------------------------------------------------------------
# the measurements

def servers_size(args: argparse.Namespace) -> int:
    """--size for the throughput targets: the whole push phase fits."""
    return max(args.count, args.batch_count) + 1000


class Bench:
    def __init__(self, args: argparse.Namespace, fleet: Fleet) -> None:
        self.args = args
        self.fleet = fleet
        self.results: list[dict] = []
        self.problems: list[str] = []
        self.recovery: dict | None = None
        self.rss: list[dict] = []
        self.interrupted = False
        self.remarks: list[str] = []

    def note(self, text: str) -> None:
        """A problem: an error, a wrong count, a hang, a traceback."""
        self.problems.append(text)
        print(f"  !! {text}", flush=True)

    def remark(self, text: str) -> None:
        """Worth knowing, not a fault (a phase cut short by the time budget)."""
        self.remarks.append(text)
        print(f"  -- {text}", flush=True)

    def start(self, servers: list[Server]) -> None:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready()

    def phases(self, target: str, servers: list[Server]) -> list[Server]:
        """push, get+ack, e2e on ``target``; the servers it ends with (a
        target whose queue is not empty after get+ack is restarted fresh
        before e2e)."""
        args = self.args
        dqid = target != "bare"
        if args.warmup:  # discarded: first connections, cold code paths
            ports, pids = [s.http_port for s in servers], [s.pid for s in servers]
            warm = run_phase("push", ports, dqid, args, pids, count=args.warmup)
            run_phase("get+ack", ports, dqid, args, pids, count=warm["produced"])
            if dqid:
                self.check_depth(target, "warm-up", servers, 0)
        pushed = args.count
        phases = PHASES + (BATCH_PHASES if dqid and args.batch_count else ())
        for n, phase in enumerate(phases):
            if phase == "get+ack" or phase == "batch get+ack":
                count = pushed
            else:
                count = args.batch_count if phase == "batch push" else args.count
            if count == 0:
                self.note(f"{target} {phase}: skipped, nothing was pushed")
                continue
            result = run_phase(phase, [s.http_port for s in servers], dqid, args,
                               [s.pid for s in servers], count=count)
            result["target"] = target
            self.results.append(result)
            print(f"  {target:<10} {phase:<13} {result['msgs_per_s']:9.0f} msgs/s "
                  f"p50 {result['p50_ms']:.2f} ms p99 {result['p99_ms']:.2f} ms "
                  f"({result['seconds']:.1f} s{', TIMED OUT' if result['timed_out'] else ''})",
                  flush=True)
            if result["errors"]:
                self.note(f"{target} {phase}: {result['errors']} unexpected answers/errors; "
                          f"statuses {result['statuses']}; samples:\n      "
                          + "\n      ".join(result["samples"]))
            if result["timed_out"]:
                cut = (f"{target} {phase}: stopped at --phase-timeout {args.phase_timeout:.0f} s "
                       f"with {result['messages']} of {count} messages done (its numbers "
                       f"cover those)")
                if result["messages"] < count / 10:
                    self.note(cut + "; that is under 10%: it looks hung")
                else:
                    self.remark(cut)
            for server in servers:
                if not server.alive():
                    raise RuntimeError(f"{server.name} died during {target} {phase}:\n"
                                       f"{server.log_tail()}")
            if phase.endswith("push"):
                pushed = result["produced"]
                expected = pushed
            elif phase.endswith("get+ack"):
                expected = pushed - result["consumed"]
            else:
                expected = result["produced"] - result["consumed"]
            if dqid:  # a phase cut short leaves in-flight leases: no exact check
                left = self.check_depth(target, phase, servers, expected,
                                        exact=not result["timed_out"])
            else:
                left = expected
            following = phases[n + 1] if n + 1 < len(phases) else None
            if left and following in ("e2e", "batch push"):
                self.note(f"{target}: {left} messages left after {phase}; restarting "
                          f"{target} fresh for {following}")
                for server in servers:
                    server.stop()
                servers = self.fleet.target(target, servers_size(args))
                self.start(servers)
        return servers

    def check_depth(self, target: str, phase: str, servers: list[Server],
                    expected: int, exact: bool = True) -> int:
        """Compare /stats depth (after a short settle) with what the phase
        should have left; the depth seen."""
        deadline = time.monotonic() + 5
        while True:
            stats = [s.stats() for s in servers]
            depth = sum(st["depth"] for st in stats)
            if depth == expected or not exact or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        redelivered = sum(st["counters"]["redelivered"] for st in stats)
        if depth != expected and exact:
            self.note(f"{target} after {phase}: /stats depth {depth} "
                      f"(per node {[st['depth'] for st in stats]}), expected {expected}")
        if redelivered:
            self.note(f"{target} after {phase}: {redelivered} redeliveries counted")
        return depth

    def recover(self) -> None:
        """Fresh 3-node cluster: push M to a, kill -9 a, time a replacement."""
        args = self.args
        m = args.recover_count
        cluster = LocalCluster(self.fleet, "recovery", m + 1000)
        nodes = list(cluster.nodes.values())
        self.start(nodes)
        a = cluster.nodes["a"]
        print(f"  recovery: pushing {m} messages to node a of a fresh 3-node cluster "
              f"(POST /push/batch of {RECOVERY_FILL_BATCH})", flush=True)
        result = run_phase("batch push", [a.http_port], True, args, [s.pid for s in nodes],
                           count=m, batch=RECOVERY_FILL_BATCH)
        if result["errors"] or result["produced"] != m:
            self.note(f"recovery fill: {result['produced']} of {m} pushed, "
                      f"{result['errors']} errors; samples: {result['samples']}")
        depth_before = a.stats()["depth"]
        held = {n: s.stats()["peers"]["a"]["held"] for n, s in cluster.nodes.items() if n != "a"}
        if depth_before != m or any(h != m for h in held.values()):
            self.note(f"recovery: before the kill a holds {depth_before}, its peers {held}, "
                      f"of {m} pushed")
        a.kill9()
        fresh = cluster.node("a")
        fresh.start()
        started = fresh.started_at
        t_ready = t_depth = None
        depth = None
        deadline = started + args.phase_timeout
        while time.monotonic() < deadline:
            if not fresh.alive():
                raise RuntimeError(f"replacement a exited:\n{fresh.log_tail()}")
            try:
                if t_ready is None:
                    status, _ = control(fresh.http_port, "GET", "/ready", timeout=2)
                    if status == 200:
                        t_ready = time.monotonic() - started
                if t_ready is not None:
                    depth = fresh.stats()["depth"]
                    if depth == depth_before:
                        t_depth = time.monotonic() - started
                        break
            except OSError:
                pass
            time.sleep(0.01)
        self.recovery = {
            "messages": m,
            "fill_msgs_per_s": result["msgs_per_s"],
            "depth_before_kill": depth_before,
            "held_by_peers": held,
            "seconds_to_ready": t_ready,
            "seconds_to_depth": t_depth,
            "depth_seen": depth,
        }
        if t_depth is None:
            self.note(f"recovery: replacement a reached ready after {t_ready} s, depth {depth}, "
                      f"not depth {depth_before} within {args.phase_timeout:.0f} s")
        for server in [fresh, *nodes]:
            server.stop()

    def rss_per_message(self, body_size: int) -> dict:
        args = self.args
        n = args.rss_count
        node = self.fleet.dqid(f"rss-{body_size}", f"rss{body_size}", n + 1000,
                               free_port(), free_port(), [])
        node.start()
        started = node.wait_ready()
        port = node.http_port
        # warm the code paths (single and batch push, get, ack) before measuring
        for i in range(50):
            control(port, "POST", "/push", b"w" * body_size)
        control(port, "POST", "/push/batch",
                json.dumps({"messages": [{"body": "w" * body_size}] * 50}).encode())
        while True:
            status, body = control(port, "GET", "/get?count=100")
            if status != 200:
                break
            ids = [m["id"] for m in json.loads(body)["messages"]]
            control(port, "POST", "/ack", json.dumps({"ids": ids}).encode())
        time.sleep(0.3)
        before = rss_bytes(node.pid)
        t0 = time.monotonic()
        if args.rss_fill == "single":
            result = run_phase("push", [port], True, args, [node.pid], count=n,
                               size=body_size)
            if result["errors"]:
                self.note(f"rss fill {body_size} B: {result['errors']} errors: "
                          f"{result['samples']}")
        else:
            batch = 1000
            pad = "x" * max(0, body_size - 8)
            for start in range(0, n, batch):
                entries = [{"body": f"{i:08d}{pad}"[:body_size]}
                           for i in range(start, min(n, start + batch))]
                status, body = control(port, "POST", "/push/batch",
                                       json.dumps({"messages": entries}).encode(), timeout=60)
                if status != 201:
                    self.note(f"rss fill {body_size} B: POST /push/batch -> {status}: "
                              f"{body[:300]!r}")
                    break
        fill_seconds = time.monotonic() - t0
        time.sleep(0.3)
        after = rss_bytes(node.pid)
        depth = node.stats()["depth"]
        node.stop()
        if depth != n:
            self.note(f"rss {body_size} B: depth {depth} after filling {n}")
        return {
            "body_bytes": body_size,
            "messages": depth,
            "rss_before": before,
            "rss_after": after,
            "bytes_per_message": (after - before) / max(depth, 1),
            "fill_seconds": fill_seconds,
            "startup_seconds": started,
        }


# --------------------------------------------------------------------------
# output

def fmt(value: Any, spec: str, width: int) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-".rjust(width)
    return format(value, spec).rjust(width)


def add_ratios(results: list[dict]) -> None:
    """``ratio_to_bare`` and (batch phases) ``ratio_to_single`` of every result."""
    def rate(target: str, phase: str) -> float | None:
        for r in results:
            if r["target"] == target and r["phase"] == phase and r["msgs_per_s"] > 0:
                return r["msgs_per_s"]
        return None

    for r in results:
        single = r["phase"].replace("batch ", "")
        base = rate("bare", single)
        r["ratio_to_bare"] = r["msgs_per_s"] / base if base else None
        own = rate(r["target"], single) if single != r["phase"] else None
        r["ratio_to_single"] = r["msgs_per_s"] / own if own else None


def targets(bench: Bench, args: argparse.Namespace) -> list[dict]:
    """The issue's targets: each with its measured value and whether it is met."""
    add_ratios(bench.results)
    found = {(r["target"], r["phase"]): r for r in bench.results}
    rows = []

    def row(name: str, value: float | None, limit: float, op: str, unit: str,
            how: str, failed: bool = False) -> None:
        """``failed``: measured, but no value came (recovery never finished)."""
        met = None if value is None else (value >= limit if op == ">=" else value < limit
                                          if op == "<" else value <= limit)
        if failed:
            met = False
        rows.append({"target": name, "value": value, "limit": limit, "op": op,
                     "unit": unit, "how": how, "met": met})

    def ratio(target: str, phase: str, key: str) -> float | None:
        r = found.get((target, phase))
        return None if r is None else r[key]

    where = (f"{args.concurrency} connections, {args.procs} client procs, "
             f"{args.size_bytes} B bodies")
    row("replicated push (3 nodes, min-copies 3) vs bare POST",
        ratio("cluster", "push", "ratio_to_bare"), 0.6, ">=", "x",
        f"cluster push msgs/s / bare push msgs/s; {where}")
    row("standalone push vs bare POST", ratio("standalone", "push", "ratio_to_bare"),
        0.8, ">=", "x", f"standalone push msgs/s / bare push msgs/s; {where}")
    row(f"replicated batch push ({args.batch_size}/request) vs replicated push",
        ratio("cluster", "batch push", "ratio_to_single"), 20, ">=", "x",
        "cluster batch push msgs/s / cluster push msgs/s")
    rss = next((r for r in bench.rss if r["body_bytes"] == 100), None)
    row("RSS overhead per queued 100 B message, standalone",
        None if rss is None else rss["bytes_per_message"] - rss["body_bytes"], 300, "<=", "B",
        f"RSS growth / {args.rss_count} messages, less the 100-byte body")
    rec = bench.recovery
    row(f"replacement recovers {rec['messages'] if rec else 100000} messages",
        None if rec is None else rec["seconds_to_depth"], 10, "<", "s",
        "replacement process start -> /stats depth == all (kill -9 of a, 3 nodes)",
        failed=rec is not None and rec["seconds_to_depth"] is None)
    return rows


def report(bench: Bench, args: argparse.Namespace, meta: dict) -> str:
    lines = []
    lines.append(f"dqid benchmark: count={args.count} size={args.size_bytes} B "
                 f"concurrency={args.concurrency} client procs={args.procs} "
                 f"batch={args.batch_size} batch count={args.batch_count}")
    lines.append(f"  {meta['cpus']} CPUs, Python {meta['python']}, Twisted {meta['twisted']}, "
                 f"{meta['platform']}; wall {meta['wall_seconds']:.0f} s")
    lines.append("")
    header_line = (f"{'target':<11}{'phase':<14}{'msgs/s':>9}{'req/s':>8}{'p50 ms':>9}"
                   f"{'p99 ms':>9}{'x bare':>8}{'x 1-msg':>8}{'srv cpu':>9}{'cli cpu':>9}"
                   f"{'errors':>7}")
    lines.append(header_line)
    lines.append("-" * len(header_line))
    add_ratios(bench.results)
    for r in bench.results:
        lines.append(
            f"{r['target']:<11}{r['phase']:<14}{fmt(r['msgs_per_s'], '.0f', 9)}"
            f"{fmt(r['req_per_s'], '.0f', 8)}{fmt(r['p50_ms'], '.2f', 9)}"
            f"{fmt(r['p99_ms'], '.2f', 9)}{fmt(r['ratio_to_bare'], '.2f', 8)}"
            f"{fmt(r['ratio_to_single'], '.1f', 8)}"
            f"{fmt(r['server_cpu_pct'], '.0f', 8)}%{fmt(r['client_cpu_pct'], '.0f', 8)}%"
            f"{fmt(r['errors'], 'd', 7)}{'  TIMEOUT' if r['timed_out'] else ''}")
    lines.append("")
    lines.append("msgs/s: messages pushed (push) or consumed (get+ack, e2e) per second; "
                 "get+ack = 2 requests per")
    lines.append(f"message on dqid, 1 on bare. batch: {args.batch_size} messages per POST "
                 f"/push/batch, GET /get?count=K and POST /ack")
    lines.append(f"(K = {min(args.batch_size, MAX_GET_COUNT)}); bare has no batch endpoints. "
                 "p50/p99: per successful request (a batch is one).")
    lines.append("x bare: msgs/s over bare's msgs/s in the same phase (batch phases: bare's "
                 "one-message push or get).")
    lines.append("x 1-msg: a batch phase's msgs/s over the same target's one-message push or "
                 "get+ack.")
    lines.append("srv cpu: CPU of the target's server process(es) over the phase (cluster: "
                 "sum of 3); cli cpu: all clients.")
    mixed = [r for r in bench.results if len(r["by_request"]) > 1]
    if mixed:
        lines.append("")
        lines.append("latency by request kind, p50 / p99 ms:")
        for r in mixed:
            kinds = "   ".join(f"{k} {v['p50_ms']:6.2f} / {v['p99_ms']:6.2f}"
                               for k, v in r["by_request"].items())
            lines.append(f"  {r['target']:<11}{r['phase']:<14}{kinds}")
    e2e = [r for r in bench.results if r["phase"] == "e2e" and r["delivery_p50_ms"] is not None]
    if e2e:
        lines.append("")
        lines.append("e2e delivery latency (push sent -> consumer holds the body) and "
                     "empty gets (204, consumer backs off):")
        for r in e2e:
            lines.append(f"  {r['target']:<11} p50 {r['delivery_p50_ms']:8.2f} ms   "
                         f"p99 {r['delivery_p99_ms']:8.2f} ms   empty gets {r['empty_gets']}")
    if bench.recovery:
        rec = bench.recovery
        lines.append("")
        lines.append(f"Recovery (3 nodes, min-copies 3): {rec['messages']} messages pushed to a "
                     f"(POST /push/batch of {RECOVERY_FILL_BATCH}, {rec['fill_msgs_per_s']:.0f} "
                     f"msgs/s), kill -9 a, start a fresh a:")
        lines.append(f"  held by peers before kill: {rec['held_by_peers']}")
        lines.append(f"  process start -> /ready 200:          {fmt(rec['seconds_to_ready'], '.2f', 7)} s")
        lines.append(f"  process start -> /stats depth == {rec['messages']:<6}{fmt(rec['seconds_to_depth'], '.2f', 7)} s")
        if bench.rss:
            lines.append(f"  (for scale: an empty standalone node, started alone, answers "
                         f"/ready {bench.rss[0]['startup_seconds']:.2f} s after its start)")
    if bench.rss:
        lines.append("")
        lines.append(f"RSS per queued message (standalone node, {args.rss_count} messages, "
                     f"filled by {'POST /push/batch of 1000' if args.rss_fill == 'batch' else 'POST /push'}):")
        for r in bench.rss:
            lines.append(f"  body {r['body_bytes']:>5} B: RSS {r['rss_before'] / 2**20:7.1f} -> "
                         f"{r['rss_after'] / 2**20:7.1f} MiB = {r['bytes_per_message']:7.0f} "
                         f"B/message ({r['bytes_per_message'] - r['body_bytes']:.0f} B over the body)")
    lines.append("")
    lines.append("Targets:")
    for t in targets(bench, args):
        if t["met"] is False and t["value"] is None:
            value, verdict = "never", "NOT met"
        elif t["value"] is None:
            value, verdict = "-", "not measured"
        else:
            value = f"{t['value']:.0f} B" if t["unit"] == "B" else f"{t['value']:.2f} {t['unit']}"
            verdict = "met" if t["met"] else "NOT met"
        goal = f"{t['op']} {t['limit']:g} {t['unit']}"
        lines.append(f"  {t['target']:<57}{goal:>8}   measured {value:>12}   {verdict}")
    if (args.rss_count, args.recover_count, args.concurrency, args.batch_size) != (
            100000, 100000, 16, 100):
        lines.append("  (the issue's targets are stated for 16 clients, 100-message batches, "
                     "100,000 messages for RSS and recovery;")
        lines.append("   this run used other settings, so these are indications only)")
    lines.append("")
    if bench.interrupted:
        lines.append("INTERRUPTED: the results above are partial.")
    if bench.remarks:
        lines.append("Notes:")
        for remark in bench.remarks:
            lines.append("  - " + remark)
    if bench.problems:
        lines.append(f"PROBLEMS ({len(bench.problems)}):")
        for p in bench.problems:
            lines.append("  - " + p)
    else:
        lines.append("No errors, unexpected answers, depth mismatches or tracebacks observed.")
    return "\n".join(lines)


# --------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=None,
                        help="messages per phase (default 20000, --quick 2000)")
    parser.add_argument("--size-bytes", type=int, default=100, help="message body size")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="client connections in all (e2e: half producers)")
    parser.add_argument("--procs", type=int, default=4, help="client processes")
    parser.add_argument("--batch-size", type=int, default=100,
                        help="messages per POST /push/batch and per GET /get?count=K "
                             f"(K at most {MAX_GET_COUNT}) in the batch phases")
    parser.add_argument("--batch-count", type=int, default=None,
                        help="messages per batch phase (default 100000, --quick 20000; "
                             "0: no batch phases)")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help="comma-separated subset of bare,standalone,cluster")
    parser.add_argument("--recover-count", type=int, default=None,
                        help="messages the replacement node recovers "
                             "(default 100000, --quick 20000; 0: skip)")
    parser.add_argument("--rss-count", type=int, default=None,
                        help="messages queued for the RSS measurement "
                             "(default 100000, --quick 20000; 0: skip)")
    parser.add_argument("--rss-fill", choices=("batch", "single"), default="batch",
                        help="fill the RSS node with /push/batch (fast) or single /push")
    parser.add_argument("--warmup", type=int, default=None,
                        help="messages pushed and taken per target before measuring "
                             "(default 500, --quick 200)")
    parser.add_argument("--phase-timeout", type=float, default=40.0,
                        help="seconds a phase may take before it is called hung")
    parser.add_argument("--quick", action="store_true",
                        help="small default counts, for a run well under 40 s")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--twistd", help="twistd to run dqid with (default: next to python)")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the server logs (always kept when there are problems)")
    args = parser.parse_args(argv)
    defaults = ((2000, 20000, 20000, 20000, 200) if args.quick
                else (20000, 100000, 100000, 100000, 500))
    for name, value in zip(("count", "batch_count", "recover_count", "rss_count", "warmup"),
                           defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        parser.error(f"--targets: unknown {bad}; choose from {','.join(TARGETS)}")
    args.targets = [t for t in TARGETS if t in targets]
    if min(args.recover_count, args.rss_count, args.warmup, args.batch_count) < 0:
        parser.error("--batch-count, --recover-count, --rss-count and --warmup must be >= 0")
    if not 1 <= args.batch_size <= MAX_PUSH_BATCH:
        parser.error(f"--batch-size must be 1 ... {MAX_PUSH_BATCH}")
    if args.count < 1 or args.size_bytes < 1 or args.concurrency < 1 or args.procs < 1:
        parser.error("--count, --size-bytes, --concurrency and --procs must be >= 1")
    return args


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--bare-server":
        bare_server(int(argv[1]))
        return 0
    args = parse_args(argv)

    def terminated(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, terminated)

    import twisted
    meta = {"cpus": os.cpu_count(), "python": platform.python_version(),
            "twisted": twisted.__version__, "platform": platform.platform(terse=True)}
    workdir = tempfile.mkdtemp(prefix="dqid-bench-")
    fleet = Fleet(args, workdir)
    bench = Bench(args, fleet)
    wall0 = time.monotonic()
    ok = False
    try:
        servers = {t: fleet.target(t, servers_size(args)) for t in args.targets}
        print(f"starting {sum(len(s) for s in servers.values())} server processes "
              f"(logs in {workdir})", flush=True)
        bench.start([s for group in servers.values() for s in group])
        for target in args.targets:
            servers[target] = bench.phases(target, servers[target])
            for server in servers[target]:
                server.stop()
        if args.recover_count:
            bench.recover()
        if args.rss_count:
            for body_size in (100, 1024):
                print(f"  rss: filling a fresh standalone node with {args.rss_count} "
                      f"messages of {body_size} B", flush=True)
                bench.rss.append(bench.rss_per_message(body_size))
        ok = True
    except KeyboardInterrupt:
        print("\ninterrupted; stopping servers", file=sys.stderr)
        bench.interrupted = True
    except Exception as error:
        bench.note(f"benchmark aborted: {type(error).__name__}: {error}")
    finally:
        fleet.stop_all()
    for found in fleet.problems_in_logs():
        bench.note(found)
    meta["wall_seconds"] = time.monotonic() - wall0
    text = report(bench, args, meta)
    print()
    print(text)
    if args.json:
        document = {
            "config": {k: v for k, v in vars(args).items() if k != "json"},
            "environment": meta,
            "results": [{k: v for k, v in r.items()} for r in bench.results],
            "recovery": bench.recovery,
            "rss": bench.rss,
            "targets": targets(bench, args),
            "problems": bench.problems,
            "notes": bench.remarks,
        }
        with open(args.json, "w") as f:
            json.dump(document, f, indent=2)
        print(f"\nJSON written to {args.json}")
    if bench.problems or args.keep_logs or not ok:
        print(f"server logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok and not bench.problems else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

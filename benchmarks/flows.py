"""What one client connection slot does: push, get+ack, and their batch forms.

A ``Flow`` runs in a thread of a client process, round-robin over the
target's HTTP ports on keep-alive raw connections, and keeps its own
latencies, status counts and samples of unexpected answers.
"""

from __future__ import annotations

import json
import time
from array import array
from dataclasses import dataclass

from benchmarks.rawhttp import RawConn, header

MAX_SAMPLES = 8  # unexpected answers kept per client process and phase
MAX_PUSH_BATCH = 1000  # dqid's limits: messages per POST /push/batch,
MAX_GET_COUNT = 100  # and per GET /get?count=K
KINDS = ("push", "get", "ack")  # the requests whose latencies are kept
GET_REQUEST = b"GET /get?visibility=300 HTTP/1.1\r\nHost: bench\r\n\r\n"
BACKOFF_MIN, BACKOFF_MAX = 0.002, 0.02  # a consumer's sleeps after empty gets


def push_request(size: int) -> bytes:
    """POST /push of one ``size``-byte body."""
    return (b"POST /push HTTP/1.1\r\nHost: bench\r\nContent-Length: %d\r\n\r\n%s"
            % (size, b"m" * size))


def batch_push_request(n: int, size: int) -> bytes:
    """POST /push/batch of ``n`` messages of ``size`` bytes (ASCII bodies)."""
    payload = json.dumps({"messages": [{"body": "m" * size}] * n}).encode()
    return (b"POST /push/batch HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))


@dataclass(frozen=True)
class LoadSpec:
    """What every flow of a phase sends, and for how long at most."""

    ports: list[int]
    size: int  # body bytes
    ack: bool  # ack what is taken (dqid; the bare server has no ack)
    stamp: bool  # producers write a timestamp into the body (e2e latency)
    batch: int  # messages per batch request
    batch_req: bytes  # a full POST /push/batch, built once
    timeout: float  # seconds the phase may take

    @property
    def push_req(self) -> bytes:
        return push_request(self.size)


class Flow:
    """One client connection slot (a thread): its requests, timings, errors."""

    def __init__(self, offset: int, spec: LoadSpec) -> None:
        self.conns = [RawConn(p) for p in spec.ports]
        self.turn = offset
        self.spec = spec
        self.lat = {kind: array("d") for kind in KINDS}
        self.delivery = array("d")
        self.statuses: dict[int, int] = {}
        self.samples: list[str] = []
        self.errors = 0
        self.empties = 0
        self.done = 0
        self.end = 0.0
        self.timed_out = False
        self.deadline = float("inf")
        self.backoff = BACKOFF_MIN  # seconds to sleep after the next empty get

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

    def take(self, data: bytes, what: str) -> tuple[int, bytes, bytes] | None:
        """One get; None after a connection failure or a 204 (which is no
        latency sample: the flow sleeps, twice as long after each)."""
        reply = self.call(data, what, "get")
        if reply is None or reply[0] != 204:
            return reply
        self.lat["get"].pop()
        self.empties += 1
        time.sleep(self.backoff)
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        return None

    def sample(self, text: str) -> None:
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(text)

    def over(self) -> bool:
        if self.errors > 1000 or time.perf_counter() > self.deadline:
            self.timed_out = True
            return True
        return False

    def ack(self, data: bytes, what: str, ok: int) -> tuple[int, bytes, bytes] | None:
        """Send an ack until it is answered (retried after a connection
        failure or 503); the answer if it was ``ok``."""
        while not self.over():
            reply = self.call(data, what, "ack")
            if reply is None:
                continue  # connection failed: retry (a repeat answers unknown)
            status, head, body = reply
            if status == ok:
                return reply
            self.unexpected(what, "ack", status, head, body)
            if status == 503:
                time.sleep(0.05)
                continue  # not ready: retry
            return None  # 404 or the like: delivered anyway
        return None

    # -- roles ---------------------------------------------------------------

    def produce(self, quota: int) -> None:
        spec = self.spec
        size = spec.size
        stamp = spec.stamp
        fixed = spec.push_req
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
        ack = self.spec.ack
        stamp = self.spec.stamp
        while self.done < quota and not self.over():
            reply = self.take(GET_REQUEST, "GET /get")
            if reply is None:
                continue
            status, head, body = reply
            if status != 200:
                self.unexpected("GET /get", "get", status, head, body)
                time.sleep(0.01)
                continue
            self.backoff = BACKOFF_MIN
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
                data = b"POST /ack/%s HTTP/1.1\r\nHost: bench\r\nContent-Length: 0\r\n\r\n" % mid
                self.ack(data, "POST /ack/" + mid.decode("latin-1"), 204)
            self.done += 1
        self.end = time.perf_counter()

    def produce_batch(self, quota: int) -> None:
        """POST /push/batch of ``batch`` messages (fewer for the last one)."""
        batch = self.spec.batch
        while self.done < quota and not self.over():
            n = min(batch, quota - self.done)
            data = self.spec.batch_req if n == batch else batch_push_request(n, self.spec.size)
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
        """GET /get?count=K, then POST /ack {"ids": [...]} of what came;
        every id must come back acked, none unknown."""
        batch = min(self.spec.batch, MAX_GET_COUNT)
        while self.done < quota and not self.over():
            k = min(batch, quota - self.done)
            data = (b"GET /get?count=%d&visibility=300 HTTP/1.1\r\nHost: bench\r\n\r\n" % k)
            reply = self.take(data, f"GET /get?count={k}")
            if reply is None:
                continue
            status, head, body = reply
            try:
                ids = [m["id"] for m in json.loads(body)["messages"]] if status == 200 else None
            except (ValueError, KeyError, TypeError):
                ids = None
            if not ids or len(ids) > k:
                self.unexpected(f"GET /get?count={k}", "get", status, head, body)
                time.sleep(0.01)
                continue
            self.backoff = BACKOFF_MIN
            payload = json.dumps({"ids": ids}).encode()
            data = (b"POST /ack HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
            what = f"POST /ack of {len(ids)} ids"
            acked = self.ack(data, what, 200)
            if acked is not None:
                status, head, body = acked
                try:
                    unknown = json.loads(body)["unknown"]
                except (ValueError, KeyError, TypeError):
                    unknown = None
                if unknown != []:
                    self.unexpected(what, "ack", status, head, body)
            self.done += len(ids)
        self.end = time.perf_counter()

"""A seeded producer/consumer workload against dqid nodes, recorded for the
queue checker.  Bounded in messages and in time; stops by itself.

Producers push bodies carrying a unique token (with an Idempotency-Key when
asked) and record each outcome.  Consumers take, sometimes "crash" (keep the
lease and never ack), and otherwise ack.  Requests go to the given ports in
turn, like a round-robin load balancer.
"""

from __future__ import annotations

import http.client
import itertools
import json
import random
import socket
import threading
import time
from dataclasses import dataclass, field

from .checker import QueueChecker


@dataclass
class WorkloadConfig:
    seed: int = 1
    messages: int = 200
    producers: int = 2
    consumers: int = 2
    crash_rate: float = 0.05  # share of deliveries a worker never acks
    visibility: float = 3.0
    request_timeout: float = 8.0
    idempotency_keys: bool = True
    push_retries: int = 3
    push_interval: float = 0.0  # pause between one producer's pushes
    poison_rate: float = 0.0  # share of messages every worker nacks (never acks)
    max_seconds: float = 60.0
    batch_size: int = 1  # above 1: POST /push/batch of that many, no keys, no retries
    take_count: int = 1  # above 1: GET /get?count=K, and one POST /ack with what is done


@dataclass
class Workload:
    ports: list[int]
    config: WorkloadConfig = field(default_factory=WorkloadConfig)
    checker: QueueChecker = field(default_factory=QueueChecker)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._counter = 0
        self._tokens = iter(range(self.config.messages))
        self._producing = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.errors: list[str] = []
        self.push_timeouts = 0  # pushes with no answer (retried if keyed)
        self.batches_created = 0  # batch pushes answered 201
        # Tokens whose ack was answered done: 204, or listed as acked by a
        # batch ack's 200.
        self.answered_204: set[str] = set()
        self.held_tokens: list[str] = []  # found held at the end (settle_held)
        # Set while a fault may undo withdrawals: a 503 then counts as
        # indeterminate (see refusals_unsure).
        self._refusals_unsure = threading.Event()

    # -- running -------------------------------------------------------------

    def start(self) -> "Workload":
        self._deadline = time.monotonic() + self.config.max_seconds
        self._producing = self.config.producers
        for index in range(self.config.producers):
            self._spawn(self._produce, index)
        for index in range(self.config.consumers):
            self._spawn(self._consume, 1000 + index)
        return self

    def _spawn(self, target, index: int) -> None:
        rng = random.Random(self.config.seed * 7919 + index)
        thread = threading.Thread(target=self._guard, args=(target, rng), daemon=True)
        self._threads.append(thread)
        thread.start()

    def _guard(self, target, rng: random.Random) -> None:
        try:
            target(rng)
        except Exception as error:  # recorded; the test asserts none happened
            with self._lock:
                self.errors.append(f"{type(error).__name__}: {error}")

    def producers_done(self) -> bool:
        with self._lock:
            return self._producing == 0

    def wait_produced(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.config.max_seconds)
        while not self.producers_done() and time.monotonic() < deadline:
            time.sleep(0.05)

    def refusals_unsure(self, unsure: bool) -> None:
        """From now on (until called with False), a push refused with 503
        is indeterminate, not refused: for a fault that can undo its
        withdrawal (every node with the tombstone lost at once while the
        one with the copy is cut off: the README's "not promised")."""
        if unsure:
            self._refusals_unsure.set()
        else:
            self._refusals_unsure.clear()

    def _refused(self) -> str:
        return "indeterminate" if self._refusals_unsure.is_set() else "refused"

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.config.request_timeout + 5)

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self._deadline

    def _port(self) -> int:
        with self._lock:  # the test may swap a port (a replacement node)
            self._counter += 1
            return self.ports[self._counter % len(self.ports)]

    def _request(self, method: str, path: str, body: bytes | None = None,
                 headers: dict | None = None, port: int | None = None,
                 timeout: float | None = None):
        """(status, headers, body) or None when the answer is unknown."""
        conn = http.client.HTTPConnection("127.0.0.1", port or self._port(),
                                          timeout=timeout or self.config.request_timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        except (OSError, http.client.HTTPException, socket.timeout):
            return None
        finally:
            conn.close()

    # -- producers -----------------------------------------------------------

    def _produce(self, rng: random.Random) -> None:
        try:
            while self._running():
                if self.config.batch_size > 1:
                    with self._lock:
                        numbers = list(itertools.islice(self._tokens, self.config.batch_size))
                    if not numbers:
                        return
                    self._push_batch([f"t{self.config.seed}-{n}" for n in numbers])
                    continue
                with self._lock:
                    number = next(self._tokens, None)
                if number is None:
                    return
                poison = rng.random() < self.config.poison_rate
                prefix = "poison-" if poison else "t"
                self._push_one(f"{prefix}{self.config.seed}-{number}", rng)
                if self.config.push_interval:
                    time.sleep(self.config.push_interval)
        finally:
            with self._lock:
                self._producing -= 1

    def _push_one(self, token: str, rng: random.Random) -> None:
        headers = {"Content-Type": "text/plain"}
        if self.config.idempotency_keys:
            headers["Idempotency-Key"] = token
        for attempt in range(1 + self.config.push_retries):
            self.checker.attempt(token)
            reply = self._request("POST", "/push", token.encode(), headers)
            if reply is None or reply[0] >= 500 and reply[0] != 503:
                # No answer, or the proxy's 502/504: it may be queued.
                self.checker.pushed(token, "indeterminate")
                with self._lock:
                    self.push_timeouts += 1
            elif reply[0] in (200, 201):
                self.checker.pushed(token, "ok", json.loads(reply[2])["id"])
                return
            else:
                self.checker.pushed(token, self._refused())
            if not self.config.idempotency_keys:
                return  # without a key a retry could queue it twice
            time.sleep(0.05 + rng.random() * 0.2)

    def _push_batch(self, tokens: list[str]) -> None:
        """One POST /push/batch, all or nothing; never retried (no key)."""
        for token in tokens:
            self.checker.attempt(token)
        body = json.dumps({"messages": [{"body": t, "content_type": "text/plain"}
                                        for t in tokens]}).encode()
        reply = self._request("POST", "/push/batch", body,
                              {"Content-Type": "application/json"})
        if reply is None or reply[0] >= 500 and reply[0] != 503:
            outcomes = ["indeterminate"] * len(tokens)
            ids: list[str | None] = [None] * len(tokens)
            with self._lock:
                self.push_timeouts += 1
        elif reply[0] == 201:
            ids = json.loads(reply[2])["ids"]
            outcomes = ["ok"] * len(tokens)
            with self._lock:
                self.batches_created += 1
        else:
            outcomes, ids = [self._refused()] * len(tokens), [None] * len(tokens)
        for token, outcome, message_id in zip(tokens, outcomes, ids):
            if message_id is None:
                self.checker.pushed(token, outcome)
            else:
                self.checker.pushed(token, outcome, message_id)

    # -- consumers -----------------------------------------------------------

    def _consume(self, rng: random.Random) -> None:
        count = self.config.take_count
        while self._running():
            reply = self._request(
                "GET", f"/get?wait=1&visibility={self.config.visibility}"
                       + (f"&count={count}" if count > 1 else ""),
                timeout=self.config.request_timeout + 1.0,  # the long poll's wait
            )
            if reply is None or reply[0] != 200:
                if reply is not None and reply[0] == 204 and self.producers_done():
                    time.sleep(0.1)
                continue
            if count > 1:
                taken = [(m["id"], m["body"], m["receipt"])
                         for m in json.loads(reply[2])["messages"]]
            else:
                headers = {k.lower(): v for k, v in reply[1].items()}
                taken = [(headers["dqid-id"], reply[2].decode(), headers["dqid-receipt"])]
            done: list[tuple[str, str]] = []
            for message_id, token, receipt in taken:
                self.checker.delivered(token, message_id)
                if rng.random() < self.config.crash_rate:
                    continue  # a worker that took the lease and died
                if token.startswith("poison-"):  # it fails every time: give it back
                    self._request("POST", f"/nack/{message_id}?receipt={receipt}")
                    continue
                done.append((message_id, token))
            if count > 1:
                self._ack_batch(done)
            elif done:
                self._ack(*done[0])

    def _ack(self, message_id: str, token: str) -> None:
        """POST /ack/ID, tried again while its answer is unknown."""
        for _ in range(5):
            ack = self._request("POST", f"/ack/{message_id}")
            if ack is not None and ack[0] in (204, 404):
                self.checker.acked(token, message_id)
                if ack[0] == 204:
                    with self._lock:
                        self.answered_204.add(token)
                break
            time.sleep(0.2)

    def _ack_batch(self, done: list[tuple[str, str]]) -> None:
        """One POST /ack with the ids of ``done``, tried again while its
        answer is unknown; each id listed as acked counts as a 204."""
        if not done:
            return
        body = json.dumps({"ids": [message_id for message_id, _ in done]}).encode()
        for _ in range(5):
            reply = self._request("POST", "/ack", body, {"Content-Type": "application/json"})
            if reply is not None and reply[0] == 200:
                acked = set(json.loads(reply[2])["acked"])
                for message_id, token in done:
                    self.checker.acked(token, message_id)
                    if message_id in acked:
                        with self._lock:
                            self.answered_204.add(token)
                return
            time.sleep(0.2)

    # -- the end -------------------------------------------------------------

    def settle_held(self, max_seconds: float = 30.0) -> list[str]:
        """What a person does with poison: find every held message (GET
        /held on any node lists the cluster's), record its token as held,
        and ack it.  The tokens, once no node holds any held message."""
        found: list[str] = []
        deadline = time.monotonic() + max_seconds
        while time.monotonic() < deadline:
            reply = self._request("GET", "/held?count=1000")
            if reply is None or reply[0] != 200:
                time.sleep(0.2)
                continue
            held = json.loads(reply[2])["messages"]
            if not held:
                self.held_tokens = found
                return found
            for entry in held:
                peeked = self._request("GET", f"/messages/{entry['id']}")
                if peeked is None or peeked[0] != 200:
                    continue
                token = peeked[2].decode()
                self.checker.held(token)
                found.append(token)
                self._request("POST", f"/ack/{entry['id']}")
        raise AssertionError(f"held messages left after {max_seconds}s")

    def drain(self, quiet_seconds: float = 2.0, max_seconds: float = 60.0) -> None:
        """After producing: consume until the cluster stays empty for
        ``quiet_seconds`` (leases of crashed workers included)."""
        self.wait_produced()
        deadline = time.monotonic() + max_seconds
        quiet_since = None
        while time.monotonic() < deadline:
            depths = []
            for port in self.ports:
                reply = self._request("GET", "/stats", port=port)
                if reply is not None and reply[0] == 200:
                    depths.append(json.loads(reply[2])["depth"])
            if depths and len(depths) == len(self.ports) and not any(depths):
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= quiet_seconds:
                    break
            else:
                quiet_since = None
            time.sleep(0.2)
        self.stop()

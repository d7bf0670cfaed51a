"""dqid behind HAProxy and nginx, with the configs from etc/ (DESIGN.md,
promise 5: any request may land on any node).

The proxies run with etc/haproxy.cfg and etc/nginx.conf as committed,
rendered for the test's ports (tests/proxies.py).  The workload and
dead-node tests put them in front of three real nodes and talk only to the
proxy; the retry tests put them in front of stand-in nodes that drop
requests, to count how often a request is sent.  Both configs add
``X-Served-By: HOST:PORT`` (the node that answered), which is how the tests
see where requests landed.
"""

from __future__ import annotations

import http.client as httplib
import http.server
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

from .cluster import LocalCluster
from .conftest import require_tool
from .procs import Reply, free_port
from .procs import http as http_request

pytestmark = pytest.mark.process

PROXIES = ["haproxy", "nginx"]

MESSAGES = 300
PRODUCERS = 3
CONSUMERS = 3
WORKLOAD_SECONDS = 40.0


class KeepAliveClient:
    """One keep-alive HTTP/1.1 connection to the proxy, as a worker holds it."""

    def __init__(self, port: int, timeout: float = 15.0) -> None:
        self.connects = 0
        client = self

        class Connection(httplib.HTTPConnection):
            def connect(self) -> None:
                client.connects += 1
                super().connect()

        self.conn = Connection("127.0.0.1", port, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Reply:
        self.conn.request(method, path, body=body, headers=headers or {})
        response = self.conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()},
                     response.read())

    def close(self) -> None:
        self.conn.close()


def served_by(reply: Reply) -> str:
    """The node (host:port) that answered; nginx lists every node it tried."""
    value = reply.headers.get("x-served-by", "")
    assert value, f"no X-Served-By in {reply}"
    return value.split(",")[-1].strip()


def owner(message_id: str) -> str:
    return message_id.split(".")[0]  # NODE.EPOCH.SEQ


def start(kind: str, pool, proxies, *args: str) -> tuple[LocalCluster, object, dict[str, str]]:
    """A 3-node cluster, the proxy ``kind`` in front; {host:port: node id}."""
    binary = require_tool(kind)
    cluster = LocalCluster(pool, ("a", "b", "c"), *args).start()
    node_ports = [cluster[n].http_port for n in cluster.ids]
    proxy = proxies.start(kind, free_port(), node_ports, binary)
    addresses = {f"127.0.0.1:{cluster[n].http_port}": n for n in cluster.ids}
    return cluster, proxy, addresses


@dataclass
class Workload:
    port: int
    errors: list[str] = field(default_factory=list)
    pushed: dict[str, bytes] = field(default_factory=dict)   # id -> body
    push_node: dict[str, str] = field(default_factory=dict)  # id -> served by
    deliveries: list[tuple[str, bytes, str, str]] = field(default_factory=list)
    acks: list[tuple[str, str]] = field(default_factory=list)  # (id, served by)
    connects: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def error(self, text: str) -> None:
        with self.lock:
            self.errors.append(text)
        self.stop.set()

    def produce(self, worker: int, count: int) -> None:
        client = KeepAliveClient(self.port)
        try:
            for i in range(count):
                if self.stop.is_set():
                    return
                body = f"work {worker}-{i}".encode()
                reply = client.request("POST", "/push", body, {"Content-Type": "text/plain"})
                if reply.status != 201:
                    return self.error(f"push {worker}-{i}: {reply}")
                message_id = reply.json()["id"]
                with self.lock:
                    self.pushed[message_id] = body
                    self.push_node[message_id] = served_by(reply)
        except Exception as error:  # noqa: BLE001 - reported by the test
            self.error(f"producer {worker}: {error!r}")
        finally:
            self.connects.append(client.connects)
            client.close()

    def consume(self, worker: int) -> None:
        client = KeepAliveClient(self.port)
        try:
            while not self.stop.is_set():
                reply = client.request("GET", "/get?visibility=30&wait=1")
                if reply.status == 204:
                    continue
                if reply.status != 200:
                    return self.error(f"consumer {worker} get: {reply}")
                message_id = reply.headers["dqid-id"]
                with self.lock:
                    self.deliveries.append((message_id, reply.body, served_by(reply),
                                            reply.headers["dqid-deliveries"]))
                acked = client.request("POST", f"/ack/{message_id}")
                if acked.status != 204:
                    return self.error(f"consumer {worker} ack {message_id}: {acked}")
                with self.lock:
                    self.acks.append((message_id, served_by(acked)))
        except Exception as error:  # noqa: BLE001 - reported by the test
            self.error(f"consumer {worker}: {error!r}")
        finally:
            self.connects.append(client.connects)
            client.close()

    def all_acked(self) -> bool:
        with self.lock:
            return len(self.pushed) == MESSAGES and \
                set(self.pushed) <= {message_id for message_id, _ in self.acks}

    def run(self) -> float:
        started = time.monotonic()
        per_producer = MESSAGES // PRODUCERS
        producers = [threading.Thread(target=self.produce, args=(w, per_producer), daemon=True)
                     for w in range(PRODUCERS)]
        consumers = [threading.Thread(target=self.consume, args=(w,), daemon=True)
                     for w in range(CONSUMERS)]
        for thread in consumers + producers:
            thread.start()
        deadline = started + WORKLOAD_SECONDS
        while time.monotonic() < deadline and not self.stop.is_set() and not self.all_acked():
            time.sleep(0.05)
        self.stop.set()
        for thread in producers + consumers:
            thread.join(max(0.1, deadline + 5 - time.monotonic()))
        assert not any(t.is_alive() for t in producers + consumers), "workers did not stop"
        return time.monotonic() - started


@pytest.mark.parametrize("kind", PROXIES)
def test_producers_and_consumers_through_the_proxy(kind, pool, proxies) -> None:
    cluster, proxy, addresses = start(kind, pool, proxies)

    work = Workload(proxy.port)
    elapsed = work.run()
    assert not work.errors, "\n".join(work.errors) + "\n" + proxy.log_tail()
    assert work.all_acked(), (
        f"{len(work.pushed)} pushed, {len({i for i, _ in work.acks})} acked "
        f"in {elapsed:.1f}s\n{proxy.log_tail()}"
    )

    # Every push was answered 201 and named its owner: the node that served it.
    assert len(work.pushed) == MESSAGES
    for message_id, node in work.push_node.items():
        assert owner(message_id) == addresses[node], (message_id, node)
    owners = Counter(owner(i) for i in work.pushed)
    assert set(owners) == set(cluster.ids), owners  # round-robin over all three

    # Every message delivered exactly once (a 30 s lease never expired here),
    # with the body it was pushed with, and acked with 204.
    delivered = Counter(message_id for message_id, *_ in work.deliveries)
    assert set(delivered) == set(work.pushed)
    assert max(delivered.values()) == 1, [i for i, n in delivered.items() if n > 1]
    for message_id, body, _, deliveries in work.deliveries:
        assert body == work.pushed[message_id]
        assert deliveries == "1", (message_id, deliveries)
    acked = Counter(message_id for message_id, _ in work.acks)
    assert acked == Counter(set(work.pushed))

    # Requests landed on every node, and acks were often served by a node
    # that does not own the message (forwarded to the owner).
    assert {addresses[node] for _, node in work.acks} == set(cluster.ids)
    foreign_acks = sum(owner(i) != addresses[node] for i, node in work.acks)
    assert foreign_acks > 0, "every ack landed on its owner"
    assert {addresses[node] for _, _, node, _ in work.deliveries} == set(cluster.ids)

    # Keep-alive through the proxy: each worker used one connection.
    assert max(work.connects) == 1, work.connects

    # Nothing left anywhere: queues empty, no replica held, counters add up.
    def settled() -> bool:
        stats = [cluster.stats(n) for n in cluster.ids]
        return all(s["depth"] == 0 for s in stats) and all(
            peer["held"] == 0 for s in stats for peer in s["peers"].values()
        )

    cluster.wait_until(settled, 10, "empty queues and replicas on every node")
    totals: Counter = Counter()
    for node_id in cluster.ids:
        counters = cluster.stats(node_id)["counters"]
        totals.update({k: counters[k] for k in ("pushed", "delivered", "redelivered", "acked")})
        assert counters["pushed"] == owners[node_id], (node_id, counters)
    assert totals == Counter(pushed=MESSAGES, delivered=MESSAGES, acked=MESSAGES), totals


@pytest.mark.parametrize("kind", PROXIES)
def test_a_dead_node_is_taken_out(kind, pool, proxies) -> None:
    # --min-copies=2: two nodes of three can still accept pushes (with the
    # default, all three, a dead node makes every push 503 not_replicated).
    cluster, proxy, addresses = start(kind, pool, proxies, "--min-copies=2")
    client = KeepAliveClient(proxy.port)

    def round_trip() -> list[Reply]:
        """A push, a get and its ack; the replies, all expected to succeed."""
        replies = [client.request("POST", "/push", b"x")]
        got = client.request("GET", "/get?visibility=30&wait=2")
        replies.append(got)
        if got.status == 200:
            replies.append(client.request("POST", f"/ack/{got.headers['dqid-id']}"))
        return replies

    def ok(reply: Reply) -> bool:
        return reply.status in (200, 201, 204)

    for _ in range(6):  # all three nodes serve
        assert all(ok(r) for r in round_trip())

    dead = "c"
    dead_address = f"127.0.0.1:{cluster[dead].http_port}"
    cluster[dead].kill()

    # Within a bounded time the proxy stops sending work to the dead node:
    # then 30 rounds in a row succeed, each served by a live node.
    wanted, streak, failures = 30, 0, []
    deadline = time.monotonic() + 20
    while streak < wanted:
        assert time.monotonic() < deadline, (
            f"no {wanted} good rounds in a row; failures: {failures[-10:]}\n{proxy.log_tail()}"
        )
        try:
            replies = round_trip()
        except (OSError, httplib.HTTPException) as error:  # the proxy hung up
            failures.append(repr(error))
            streak = 0
            client.close()  # the next request opens a new connection
            continue
        if all(ok(r) for r in replies):
            assert all(served_by(r) != dead_address for r in replies)
            streak += 1
        else:
            failures.append([(r.status, r.headers.get("x-served-by"), r.body[:80])
                             for r in replies])
            streak = 0
            time.sleep(0.1)
    client.close()

    if kind == "haproxy":
        # The active health check marked it DOWN (not just retries).
        server = f"dqid/n{cluster.ids.index(dead) + 1}"
        cluster.wait_until(lambda: f"Server {server} is DOWN" in proxy.log_text(), 10,
                           f"haproxy marking {server} DOWN")
    else:
        # nginx's passive check: the failed connection took the node out.
        assert "upstream server temporarily disabled" in proxy.log_text()
        assert dead_address in proxy.log_text()


class FakeNode:
    """A stand-in node that answers health checks but, for the paths in
    ``drop``, reads the whole request and closes the connection without an
    answer: the request reached a node, and the proxy cannot know what it
    did. It records every request it got."""

    def __init__(self, drop: set[str]) -> None:
        node = self
        self.drop = drop
        self.seen: list[tuple[str, str]] = []
        self.lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def handle_one(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                path = self.path.split("?")[0]
                with node.lock:
                    node.seen.append((self.command, path))
                if path in node.drop or "/" + path.split("/")[1] in node.drop:  # /ack/ID
                    self.close_connection = True
                    return
                body = b'{"status": "ready"}'
                status = 201 if path == "/push" else 200
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = handle_one

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        # A connection the proxy resets between select() and accept() would
        # block a blocking accept() for good, and shutdown() with it.
        self.server.socket.settimeout(1.0)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def requests(self, method: str, path: str) -> int:
        with self.lock:
            return self.seen.count((method, path))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_nodes():
    nodes = [FakeNode({"/push", "/get", "/ack", "/stats"}) for _ in range(3)]
    try:
        yield nodes
    finally:
        for node in nodes:
            node.close()


# (method, target, how many nodes the proxy may try). The GET /stats row is
# the control: nginx does resend an idempotent request whose answer it
# lost, so the counting would catch a resend of the others.
SENT_ONCE = [
    ("POST", "/push", {"haproxy": 1, "nginx": 1}),
    ("GET", "/get?visibility=30&wait=1", {"haproxy": 1, "nginx": 1}),
    ("POST", "/get?visibility=30", {"haproxy": 1, "nginx": 1}),
    ("POST", "/ack/a.1.1", {"haproxy": 1, "nginx": 1}),
    ("GET", "/stats", {"haproxy": 1, "nginx": 3}),
]


@pytest.mark.parametrize("kind", PROXIES)
def test_a_request_that_reached_a_node_is_never_resent(kind, proxies, fake_nodes) -> None:
    """POST /push, POST /ack/ID and GET or POST /get reach one node only,
    even when that node drops the connection without an answer: a push
    resent could be queued twice, a /get resent takes a second lease."""
    binary = require_tool(kind)
    for method, target, tries in SENT_ONCE:
        # A fresh proxy each time: nginx's passive health check would
        # otherwise keep the nodes that just failed out of the next round.
        proxy = proxies.start(kind, free_port(), [n.port for n in fake_nodes], binary)
        path = target.split("?")[0]
        before = sum(n.requests(method, path) for n in fake_nodes)
        reply = proxy.http(method, target, b"once" if method == "POST" else None)
        assert reply.status == 502, (method, target, reply, proxy.log_tail())
        reached = sum(n.requests(method, path) for n in fake_nodes) - before
        assert reached == tries[kind], f"{method} {target} reached {reached} nodes"
        proxy.stop()


@pytest.mark.parametrize("kind", PROXIES)
def test_a_request_that_never_reached_a_node_is_retried(kind, proxies) -> None:
    """A node that refuses connections (dead, restarting) costs no push:
    the proxy tries another node, as nothing was sent."""
    binary = require_tool(kind)
    live = [FakeNode(set()) for _ in range(2)]
    try:
        dead_port = free_port()  # nothing listens here
        proxy = proxies.start(kind, free_port(), [live[0].port, dead_port, live[1].port],
                              binary)
        for i in range(6):
            reply = proxy.http("POST", "/push", b"x")
            assert reply.status == 201, (i, reply, proxy.log_tail())
        assert sum(n.requests("POST", "/push") for n in live) == 6
    finally:
        for node in live:
            node.close()


def test_haproxy_keeps_serving_work_when_writes_stop(pool, proxies) -> None:
    """Default --min-copies: a dead node stops every push, but workers
    behind HAProxy still take and ack what is queued."""
    cluster, proxy, _ = start("haproxy", pool, proxies)
    queued = {}
    for i in range(6):
        reply = http_request(proxy.port, "POST", "/push", f"queued {i}".encode())
        assert reply.status == 201
        queued[reply.json()["id"]] = f"queued {i}".encode()
    cluster["c"].kill()
    # Writes stop: no node can make 3 copies (503 from a node, or from
    # HAProxy once it has no ready node left).
    cluster.wait_until(
        lambda: http_request(proxy.port, "POST", "/push", b"refused").status == 503,
        what="pushes refused",
    )
    survivors = {i: b for i, b in queued.items() if owner(i) != "c"}
    taken: dict[str, bytes] = {}
    deadline = time.monotonic() + 20
    while set(taken) != set(survivors):
        assert time.monotonic() < deadline, (taken, survivors, proxy.log_tail())
        got = http_request(proxy.port, "GET", "/get?visibility=60")
        if got.status == 200:
            taken[got.headers["dqid-id"]] = got.body
            ack = http_request(proxy.port, "POST", f"/ack/{got.headers['dqid-id']}")
            assert ack.status == 204
        else:
            time.sleep(0.1)
    assert taken == survivors


@pytest.mark.parametrize("kind", PROXIES)
def test_bearer_tokens_pass_through_the_proxy(kind, pool, proxies, tmp_path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# the workers' token\nworker-token-1\n")
    cluster, proxy, addresses = start(kind, pool, proxies, f"--http-token-file={tokens}")
    auth = {"Authorization": "Bearer worker-token-1"}

    # Health checks need no token, so the proxy sees every node up.
    refused = proxy.http("POST", "/push", b"no token")
    assert refused.status == 401, refused
    assert refused.json()["error"] == "unauthorized"
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert proxy.http("GET", "/stats", headers={"Authorization": "Bearer wrong"}).status == 401

    ids = set()
    for n in range(6):  # round-robin: every node sees the header
        pushed = proxy.http("POST", "/push", b"job %d" % n, headers=auth)
        assert pushed.status == 201, pushed
        ids.add(pushed.json()["id"])
    assert {owner(i) for i in ids} == set(cluster.ids)
    taken = set()
    for _ in range(6):
        got = proxy.http("GET", "/get?visibility=30", headers=auth)
        assert got.status == 200, got
        taken.add(got.headers["dqid-id"])
        assert proxy.http("POST", f"/ack/{got.headers['dqid-id']}", headers=auth).status == 204
    assert taken == ids


@pytest.mark.parametrize("kind", PROXIES)
def test_receipts_and_delays_pass_through_the_proxy(kind, pool, proxies) -> None:
    cluster, proxy, _ = start(kind, pool, proxies, "--max-deliveries=1")
    delayed = proxy.http("POST", "/push?delay=1", b"later")
    assert delayed.status == 201, delayed
    assert proxy.http("GET", "/get").status == 204  # not before its delay
    time.sleep(1.2)
    got = proxy.http("GET", "/get?visibility=30")
    assert (got.status, got.body) == (200, b"later")
    message_id, receipt = got.headers["dqid-id"], got.headers["dqid-receipt"]
    assert proxy.http("POST", f"/nack/{message_id}?receipt=wrong").status == 409
    assert proxy.http("POST", f"/nack/{message_id}?receipt={receipt}").status == 204
    # --max-deliveries=1: held now, seen and kicked through the proxy.
    held = proxy.http("GET", "/held").json()["messages"]
    assert [m["id"] for m in held] == [message_id]
    assert proxy.http("GET", f"/messages/{message_id}").headers["dqid-state"] == "held"
    assert proxy.http("POST", f"/kick/{message_id}").status == 204
    again = proxy.http("GET", "/get")
    assert again.headers["dqid-id"] == message_id and again.headers["dqid-deliveries"] == "2"
    assert proxy.http("POST", f"/ack/{message_id}").status == 204


def test_the_cluster_view_through_haproxy_shows_every_node(pool, proxies) -> None:
    """GET /cluster: whichever node HAProxy picks, the answer lists all
    three with their stats; a killed node is listed as down."""
    cluster, proxy, addresses = start("haproxy", pool, proxies)
    for i in range(6):
        assert proxy.http("POST", "/push", f"job {i}".encode()).status == 201
    answered_by = set()
    for _ in range(6):
        reply = proxy.http("GET", "/cluster")
        assert reply.status == 200, reply
        document = reply.json()
        assert document["node"] == addresses[served_by(reply)]
        answered_by.add(document["node"])
        nodes = document["nodes"]
        assert sorted(nodes) == ["a", "b", "c"]
        assert all(entry["up"] for entry in nodes.values()), nodes
        assert sum(entry["stats"]["depth"] for entry in nodes.values()) == 6
        assert {entry["stats"]["node"] for entry in nodes.values()} == {"a", "b", "c"}
    assert len(answered_by) > 1  # the same picture from more than one node

    cluster["c"].kill()

    def c_is_down() -> bool:
        reply = proxy.http("GET", "/cluster")
        if reply.status != 200:  # HAProxy had only c to try
            return False
        nodes = reply.json()["nodes"]
        return not nodes["c"]["up"] and nodes["a"]["up"] and nodes["b"]["up"]

    cluster.wait_until(c_is_down, what="c listed as down")
    reply = proxy.http("GET", "/cluster")
    assert reply.json()["nodes"]["c"]["error"] in ("not linked", "no answer within 1 s")

"""dqid.client and dqid.worker with real treq against real dqid processes.

(a) one standalone node: the client's calls, a bearer token, a push whose
answer a proxy drops (queued once), a worker run, and an asyncio program
(the asyncio reactor cannot share this pytest process with the default one,
so that program runs in a subprocess); (b) a 3-node cluster where a node is
killed with kill -9 mid-run and replaced while producers push and workers
work: every job is handled, no delivery is acked twice, nothing stays
queued.  Everything is bounded in time and stops by itself; processes are
killed by PID (tests/conftest.py's pool).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher

from dqid.client import Client, Delivery, LeaseLost, Retry, Unauthorized
from dqid.worker import Worker

from .cluster import LocalCluster
from .procs import DqidProcess

pytestmark = pytest.mark.process

REPO = Path(__file__).resolve().parents[1]
TOKEN = "client-test-token-0123456789"


async def pause(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await pause(0.05)


def url_of(process: DqidProcess) -> str:
    return f"http://127.0.0.1:{process.http_port}"


@pytest.fixture
def solo(pool, tmp_path: Path) -> DqidProcess:
    """A standalone node that wants ``TOKEN``."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# for the client tests\n{TOKEN}\n")
    tokens.chmod(0o600)
    node = pool.node("solo", "--size=300", f"--http-token-file={tokens}").start()
    node.wait_for("/ready")
    return node


# -- (a) one real node --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_client_against_a_real_node(solo):
    client = Client(url_of(solo), token=TOKEN)
    try:
        message_id = await client.push(b"real work", content_type="text/x-job")
        delivery = await client.get(visibility=5)
        assert (delivery.id, delivery.body, delivery.deliveries, delivery.content_type) == (
            message_id, b"real work", 1, "text/x-job")
        await client.touch(delivery, 10)
        await client.nack(delivery)
        again = await client.get()
        assert (again.id, again.deliveries) == (message_id, 2)
        assert await client.ack(again) is True
        assert await client.ack(again) is False  # gone: counts as done

        ids = await client.push_batch([b"b1", "b2", b"\xff"])
        taken = await client.get_many(10)
        assert [d.body for d in taken] == [b"b1", b"b2", b"\xff"]
        assert [await client.ack(d) for d in taken] == [True] * 3
        assert [d.id for d in taken] == ids

        polling = client.get(wait=10)
        await pause(0.2)
        assert not polling.called
        started = time.monotonic()
        woken_id = await client.push(b"wake up")
        woken = await polling
        assert woken.id == woken_id and time.monotonic() - started < 5
        await client.ack(woken)
        assert (await client.stats())["depth"] == 0
    finally:
        await client.close()

    stranger = Client(url_of(solo), token="wrong", retry=Retry(attempts=1))
    try:
        with pytest.raises(Unauthorized) as refused:
            await stranger.stats()
        assert refused.value.status == 401
    finally:
        await stranger.close()


@pytest_twisted.ensureDeferred
async def test_receipts_delays_and_peek_against_a_real_node(solo):
    client = Client(url_of(solo), token=TOKEN)
    try:
        message_id = await client.push(b"later", delay=1)
        assert await client.get() is None
        assert (await client.peek(message_id)).state == "delayed"
        delivery = await client.get(wait=5)
        assert delivery.id == message_id and delivery.receipt
        await client.nack(delivery, delay=0.5)
        again = await client.get(wait=5)
        assert again.receipt != delivery.receipt
        with pytest.raises(LeaseLost):
            await client.touch(delivery, 5)
        assert await client.ack(again) is True
        assert await client.peek(message_id) is None
    finally:
        await client.close()


class _Upstream(Protocol):
    def __init__(self, downstream: "_Downstream") -> None:
        self.downstream = downstream

    def dataReceived(self, data: bytes) -> None:
        self.downstream.answer(data)

    def connectionLost(self, reason: Any) -> None:
        self.downstream.transport.loseConnection()


class _Downstream(Protocol):
    """One client connection: requests go to the node; the answer to a
    push chosen for dropping is thrown away and the client cut off."""

    def __init__(self, proxy: "LosingProxy") -> None:
        self.proxy = proxy
        self.upstream: _Upstream | None = None
        self.waiting: list[bytes] = []
        self.dropping = False

    def connectionMade(self) -> None:
        self.proxy.open.add(self)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy.target)
        connectProtocol(endpoint, _Upstream(self)).addCallbacks(
            self._connected, lambda _: self.transport.abortConnection())

    def _connected(self, upstream: _Upstream) -> None:
        self.upstream = upstream
        for data in self.waiting:
            upstream.transport.write(data)
        self.waiting = []

    def dataReceived(self, data: bytes) -> None:
        if data.startswith(b"POST /push ") and self.proxy.drops_left > 0:
            self.proxy.drops_left -= 1
            self.dropping = True
        if self.upstream is None:
            self.waiting.append(data)
        else:
            self.upstream.transport.write(data)

    def answer(self, data: bytes) -> None:
        if self.dropping:  # the node answered; the client never hears it
            self.proxy.dropped += 1
            self.transport.abortConnection()
            return
        self.transport.write(data)

    def connectionLost(self, reason: Any) -> None:
        self.proxy.open.discard(self)
        if self.upstream is not None:
            self.upstream.transport.loseConnection()


class LosingProxy(Factory):
    """A TCP proxy on 127.0.0.1 in front of ``target`` that loses the
    answers of the first ``drops`` pushes."""

    def __init__(self, target: int, drops: int) -> None:
        self.target = target
        self.drops_left = drops
        self.dropped = 0
        self.open: set[_Downstream] = set()
        self.port = reactor.listenTCP(0, self, interface="127.0.0.1")

    def buildProtocol(self, addr: Any) -> _Downstream:
        return _Downstream(self)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"

    async def close(self) -> None:
        for connection in list(self.open):
            connection.transport.abortConnection()
        await self.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_push_whose_answer_was_lost_is_queued_once(solo):
    proxy = LosingProxy(solo.http_port, drops=2)
    client = Client(proxy.url, token=TOKEN, retry=Retry(first_delay=0.05))
    try:
        message_id = await client.push(b"charge order 17")
        assert proxy.dropped == 2  # two answers lost, the third try got one
        stats = await client.stats()
        assert (stats["depth"], stats["counters"]["pushed"]) == (1, 1)
        delivery = await client.get()
        assert (delivery.id, delivery.body) == (message_id, b"charge order 17")
        assert await client.ack(delivery) is True
    finally:
        await client.close()
        await proxy.close()


class Jobs:
    """A handler that records every delivery and fails the first delivery of
    every ``fail_every``-th job."""

    def __init__(self, delay: float = 0.0, fail_every: int = 0) -> None:
        self.delay = delay
        self.fail_every = fail_every
        self.deliveries: list[Delivery] = []

    async def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        if self.delay:
            await pause(self.delay)
        number = int(delivery.body.split(b"-")[1])
        if self.fail_every and number % self.fail_every == 0 and delivery.deliveries == 1:
            raise RuntimeError(f"job {number} fails on its first delivery")

    def bodies(self) -> set[bytes]:
        return {d.body for d in self.deliveries}


class AckLog(Client):
    """A Client that keeps every ack the worker asks for and its answer."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.acks: list[Delivery] = []  # kept alive, so id() names one delivery
        self.removed: list[str] = []  # ids whose ack answered 204

    def ack(self, delivery_or_id: Any) -> Deferred[bool]:
        self.acks.append(delivery_or_id)

        def answered(removed: bool) -> bool:
            if removed:
                self.removed.append(delivery_or_id.id)
            return removed

        return super().ack(delivery_or_id).addCallback(answered)


@pytest_twisted.ensureDeferred
async def test_a_worker_finishes_every_job_of_a_real_node(solo):
    client = AckLog(url_of(solo), token=TOKEN)
    jobs = Jobs(delay=0.005, fail_every=7)
    worker = Worker(client, jobs, concurrency=4, visibility=10, backoff=(0.1,))
    try:
        bodies = [b"job-%d" % i for i in range(60)]
        await client.push_batch(bodies)
        worker.start()

        async def finished() -> bool:
            return jobs.bodies() == set(bodies) and (await client.stats())["depth"] == 0

        await eventually(finished, 30, "every job to be handled and acked")
    finally:
        await worker.stop()
        await client.close()
    assert len(client.acks) == len({id(d) for d in client.acks})
    assert sorted(client.removed) == sorted({d.id for d in jobs.deliveries})
    assert worker.counts.failed == worker.counts.nacked == len(range(0, 60, 7))


ASYNCIO_PROGRAM = r'''
import asyncio, json, sys
from twisted.internet import asyncioreactor
asyncioreactor.install()
from twisted.internet.defer import Deferred
from twisted.internet.task import react
from dqid.client import Client
from dqid.worker import Worker

URL, TOKEN = sys.argv[1], sys.argv[2]

async def main():
    from twisted.internet import reactor as installed
    loop = asyncio.get_running_loop()
    client = Client(URL, token=TOKEN)
    pushed = [await client.push(f"job-{i}".encode()).asFuture(loop) for i in range(5)]
    handled = []

    async def handle(delivery):
        await asyncio.sleep(0.01)  # asyncio code inside the handler
        handled.append(delivery.body.decode())

    worker = Worker(client, handle, concurrency=2, wait=1)
    worker.start()
    for _ in range(500):
        if len(handled) == 5:
            break
        await asyncio.sleep(0.01)
    await worker.stop().asFuture(loop)
    stats = await client.stats().asFuture(loop)
    await client.close().asFuture(loop)
    print(json.dumps({"pushed": len(set(pushed)), "handled": sorted(handled),
                      "acked": worker.counts.acked, "depth": stats["depth"],
                      "reactor": type(installed).__name__}))

react(lambda reactor: Deferred.fromFuture(asyncio.ensure_future(main())))
'''


def test_an_asyncio_program_uses_the_client_and_a_worker(solo, tmp_path: Path):
    program = tmp_path / "asyncio_client.py"
    program.write_text(ASYNCIO_PROGRAM)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(program), url_of(solo), TOKEN],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {
        "pushed": 5, "handled": [f"job-{i}" for i in range(5)], "acked": 5, "depth": 0,
        "reactor": "AsyncioSelectorReactor",
    }


# -- (b) a 3-node cluster with a node killed and replaced mid-run ---------------


@pytest_twisted.ensureDeferred
async def test_workers_finish_every_job_while_a_node_is_killed_and_replaced(pool):
    cluster = LocalCluster(pool).start()
    patient = Retry(attempts=1000, total=90, max_delay=1)
    clients = {n: AckLog(url_of(cluster[n]), retry=patient, timeout=10) for n in cluster.ids}
    jobs = Jobs(delay=0.01, fail_every=10)
    workers = [Worker(c, jobs, concurrency=2, visibility=5, backoff=(0.2, 0.5))
               for c in clients.values()]
    total = 200
    bodies = [b"job-%d" % i for i in range(total)]
    pushed: dict[bytes, str] = {}
    retried_pushes: list[str] = []  # the client's log of each retry of a push

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "dqid.client" and event.get("path") == "/push":
            retried_pushes.append(event["problem"].split(":")[0])

    globalLogPublisher.addObserver(observe)
    started = time.monotonic()
    try:
        for worker in workers:
            worker.start()

        async def push(index: int) -> None:
            client = list(clients.values())[index % len(clients)]
            pushed[bodies[index]] = await client.push(bodies[index])
            await pause(0.01)  # spread the pushes over the kill

        pushing = DeferredSemaphore(2)
        producers = DeferredList(
            [pushing.run(lambda i=i: Deferred.fromCoroutine(push(i))) for i in range(total)],
            fireOnOneErrback=True, consumeErrors=True)

        async def under_way() -> bool:
            return len(pushed) >= total // 3 and len(jobs.bodies()) >= total // 6

        await eventually(under_way, 30, "a third of the jobs to be pushed")
        cluster.replace("b", wait="")  # kill -9, then a fresh "b" starts
        killed_at = (len(pushed), len(jobs.bodies()))
        await producers
        assert set(pushed) == set(bodies)

        async def finished() -> bool:
            if jobs.bodies() != set(bodies):
                return False
            try:
                depths = [(await c.stats())["depth"] for c in clients.values()]
            except Exception:
                return False
            return depths == [0, 0, 0]

        await eventually(finished, 90, "every job to be handled and every queue empty")
    finally:
        globalLogPublisher.removeObserver(observe)
        for worker in workers:
            await worker.stop()
        for client in clients.values():
            await client.close()
    acks = [d for c in clients.values() for d in c.acks]
    removed = [i for c in clients.values() for i in c.removed]
    print(f"\n{total} jobs, b killed after {killed_at[0]} pushed, {killed_at[1]} handled; "
          f"{len(jobs.deliveries)} deliveries, {len(acks)} acks "
          f"({len(removed)} answered 204, for {len(set(removed))} ids), "
          f"{len(retried_pushes)} push retries {sorted(retried_pushes)}, "
          f"{sum(w.counts.poll_errors for w in workers)} poll errors, "
          f"{time.monotonic() - started:.1f} s")
    assert len(acks) == len({id(d) for d in acks})  # no delivery acked twice
    assert set(removed) == set(pushed.values())  # every job's ack removed it
    assert killed_at[0] < total  # the kill came while jobs were still pushed
    assert retried_pushes  # pushes met the dead node and were retried
    assert len(set(pushed.values())) == total  # each push queued under one id

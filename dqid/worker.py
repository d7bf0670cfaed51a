"""A worker loop over :class:`dqid.client.Client`: long-poll, run a
handler, keep the lease alive while it runs, ack or nack.

Each of ``concurrency`` slots long-polls ``GET /get?wait=20``, runs
``handler(delivery)`` and, while it runs, touches the lease every
``touch_every`` seconds (default ``visibility / 3``).  A handler that
returns (or whose Deferred, coroutine or future succeeds) gets its delivery
acked -- once; one that raises gets it nacked with a delay that grows with
the message's delivery count (``backoff``), so a failing job does not spin.
Errors from the server or the network (a node being replaced answers 503 or
nothing) never end the loop: the slot sleeps ``error_backoff`` and polls
again.  :meth:`Worker.stop` stops polling (an open long poll is cancelled;
a message it was just being handed comes back when its lease runs out) and
fires once every running handler finished and was acked or nacked.

Handlers may be plain functions, return a Deferred, or be coroutine
functions.  Under Twisted's asyncio reactor (an asyncio loop runs when the
worker starts, or ``loop=`` is given) coroutines run as asyncio Tasks, so
they may await asyncio code; otherwise as Twisted coroutines
(``Deferred.fromCoroutine``).  txaio's framework-specific ``as_future``
does that dispatch.

Twisted::

    from twisted.internet.defer import Deferred
    from twisted.internet.task import react
    from dqid.client import Client
    from dqid.worker import Worker

    async def handle(delivery):
        print("working on", delivery.id, delivery.body)

    async def main(reactor):
        worker = Worker(Client("http://127.0.0.1:8080"), handle, concurrency=4)
        worker.start()
        reactor.addSystemEventTrigger("before", "shutdown", worker.stop)
        await Deferred()  # run until the process is stopped

    react(lambda reactor: Deferred.fromCoroutine(main(reactor)))

asyncio::

    import asyncio
    from twisted.internet import asyncioreactor
    asyncioreactor.install()
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react
    from dqid.client import Client
    from dqid.worker import Worker

    async def handle(delivery):
        await asyncio.sleep(0.1)  # asyncio code: this runs as an asyncio Task

    async def main():
        loop = asyncio.get_running_loop()
        worker = Worker(Client("http://127.0.0.1:8080"), handle, concurrency=4)
        worker.start()
        await asyncio.sleep(60)
        await worker.stop().asFuture(loop)

    react(lambda reactor: Deferred.fromFuture(asyncio.ensure_future(main())))
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import txaio.aio
import txaio.tx
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from .client import Client, Delivery, LeaseLost, NotLeased, UnknownMessage

# Seconds a failed job waits before its next delivery, by delivery count.
BACKOFF = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0)
# Seconds a slot sleeps after a failed poll, by failures in a row.
ERROR_BACKOFF = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
LONG_POLL = 20.0


@dataclass
class WorkerCounts:
    """What a worker did so far."""

    handled: int = 0  # handler runs finished, either way
    acked: int = 0  # acks answered 204
    acked_gone: int = 0  # acks answered 404: the message was not queued any more
    nacked: int = 0
    failed: int = 0  # handler runs that raised
    poll_errors: int = 0
    lost_leases: int = 0  # touches or nacks told the lease was over


def _pick(sequence: Sequence[float], number: int) -> float:
    """The ``number``-th value (from 1), the last one for any number past it."""
    return sequence[min(max(number, 1), len(sequence)) - 1]


class Worker:
    """``concurrency`` slots taking work from ``client`` for ``handler``."""

    log = Logger()

    def __init__(self, client: Client, handler: Callable[[Delivery], Any], *,
                 concurrency: int = 1, visibility: float = 30.0,
                 touch_every: float | None = None, backoff: Sequence[float] = BACKOFF,
                 error_backoff: Sequence[float] = ERROR_BACKOFF, wait: float = LONG_POLL,
                 reactor: Any = None, loop: asyncio.AbstractEventLoop | None = None
                 ) -> None:
        if concurrency < 1 or visibility <= 0 or not backoff or not error_backoff or (
                touch_every is not None and touch_every <= 0):
            raise ValueError("concurrency >= 1, visibility > 0, touch_every > 0, "
                             "back-offs not empty")
        if reactor is None:
            from twisted.internet import reactor as global_reactor
            reactor = global_reactor
        self.client = client
        self.handler = handler
        self.concurrency = concurrency
        self.visibility = visibility
        self.touch_every = touch_every if touch_every is not None else visibility / 3
        self.backoff = tuple(backoff)
        self.error_backoff = tuple(error_backoff)
        self.wait = wait
        self.counts = WorkerCounts()
        self._reactor = reactor
        self._loop = loop
        self._stopping = False
        self._slots: list[Deferred[None]] = []
        self._interruptible: set[Deferred[Any]] = set()  # polls and sleeps

    # -- life ------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Start the slots; the Deferred fires when they all ended (after stop)."""
        if self._slots:
            raise RuntimeError("this worker was started already")
        if self._loop is None:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                pass  # the default reactor: Twisted coroutines
        for slot in range(self.concurrency):
            self._slots.append(Deferred.fromCoroutine(self._run_slot(slot)))
        return self._ended()

    def stop(self) -> Deferred[None]:
        """Take no new work; fires when the running jobs were acked or nacked."""
        self._stopping = True
        for waiting in list(self._interruptible):
            waiting.cancel()
        return self._ended()

    def _ended(self) -> Deferred[None]:
        return DeferredList(list(self._slots), consumeErrors=True).addCallback(
            lambda _: None)

    # -- one slot ----------------------------------------------------------------

    async def _run_slot(self, slot: int) -> None:
        failures = 0
        while not self._stopping:
            try:
                delivery = await self._interruptibly(
                    self.client.get(visibility=self.visibility, wait=self.wait))
            except CancelledError:
                continue  # stop() cancelled the poll
            except Exception as problem:
                failures += 1
                self.counts.poll_errors += 1
                pause = _pick(self.error_backoff, failures)
                self.log.warn("worker slot {slot}: get failed ({problem}); again in {pause}s",
                              slot=slot, problem=str(problem), pause=pause)
                try:
                    await self._interruptibly(deferLater(self._reactor, pause))
                except CancelledError:
                    pass
                continue
            failures = 0
            if delivery is not None:
                try:
                    await self._work(delivery)
                except Exception:  # a bug here must not end the slot
                    self.log.failure("worker slot {slot} failed on {id}", slot=slot,
                                     id=delivery.id)

    async def _interruptibly(self, waiting: Deferred[Any]) -> Any:
        self._interruptible.add(waiting)
        try:
            return await waiting
        finally:
            self._interruptible.discard(waiting)

    # -- one job -------------------------------------------------------------------

    async def _work(self, delivery: Delivery) -> None:
        toucher = _Toucher(self, delivery)
        toucher.start()
        try:
            await self._call_handler(delivery)
        except Exception:
            self.counts.failed += 1
            self.log.failure("handler failed on {id} (delivery {deliveries})",
                             id=delivery.id, deliveries=delivery.deliveries)
            succeeded = False
        else:
            succeeded = True
        finally:
            self.counts.handled += 1
            await toucher.stop()
        if succeeded:
            await self._ack(delivery)
        else:
            await self._nack(delivery, _pick(self.backoff, delivery.deliveries))

    def _call_handler(self, delivery: Delivery) -> Deferred[Any]:
        if self._loop is None:
            return txaio.tx.with_config().as_future(self.handler, delivery)

        def call(delivery: Delivery) -> Any:  # a Deferred becomes an asyncio future
            result = self.handler(delivery)
            return result.asFuture(self._loop) if isinstance(result, Deferred) else result

        future = txaio.aio.with_config(loop=self._loop).as_future(call, delivery)
        return Deferred.fromFuture(future)

    async def _ack(self, delivery: Delivery) -> None:
        try:
            removed = await self.client.ack(delivery)
        except Exception as problem:
            self.log.warn("ack of {id} failed ({problem}); it comes back when its lease"
                          " runs out", id=delivery.id, problem=str(problem))
            return
        if removed:
            self.counts.acked += 1
        else:
            self.counts.acked_gone += 1

    async def _nack(self, delivery: Delivery, delay: float) -> None:
        try:
            await self.client.nack(delivery, delay=delay)
        except (LeaseLost, NotLeased, UnknownMessage):
            self.counts.lost_leases += 1  # it comes back (or was acked) anyway
            return
        except Exception as problem:
            self.log.warn("nack of {id} failed ({problem}); it comes back when its lease"
                          " runs out", id=delivery.id, problem=str(problem))
            return
        self.counts.nacked += 1


class _Toucher:
    """Touches one delivery's lease every ``touch_every`` s until stopped
    or told the lease is over."""

    def __init__(self, worker: Worker, delivery: Delivery) -> None:
        self.worker = worker
        self.delivery = delivery
        self.lost = False
        self._call = LoopingCall(self._touch)
        self._call.clock = worker._reactor
        self._touching: Deferred[None] | None = None

    def start(self) -> None:
        self._call.start(self.worker.touch_every, now=False)

    async def stop(self) -> None:
        if self._call.running:
            self._call.stop()
        if self._touching is not None:  # let a touch in flight end first
            await self._touching

    def _touch(self) -> Deferred[None] | None:
        if self.lost:
            return None
        self._touching = Deferred.fromCoroutine(self._touch_once())
        return self._touching

    async def _touch_once(self) -> None:
        worker, delivery = self.worker, self.delivery
        try:
            await worker.client.touch(delivery, worker.visibility)
        except (LeaseLost, NotLeased, UnknownMessage) as problem:
            self.lost = True
            worker.counts.lost_leases += 1
            worker.log.info("lease of {id} is over ({problem}): no more touches",
                            id=delivery.id, problem=problem.code)
        except Exception as problem:
            worker.log.warn("touch of {id} failed ({problem})", id=delivery.id,
                            problem=str(problem))
        finally:
            self._touching = None

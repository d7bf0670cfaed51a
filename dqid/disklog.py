"""Group commit of journal entries, for the reactor.

:meth:`DiskLog.write` returns a Deferred that fires once its entries are on
disk (written and fsynced).  Every write asked for in one reactor turn goes
into one group: one ``write`` and one fsync, done by a single writer thread
so the reactor never waits on the disk.  While that thread is busy, new
writes gather for the next group, so the busier the node, the more entries
one fsync carries.

A failed write or fsync fails the Deferred of every write in its group (so
nothing of it may be acknowledged); after a failed fsync the
:class:`~dqid.datadir.DataDir` refuses every later write too.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from .datadir import DataDir
from .journal import Entry


class DiskLogStopped(Exception):
    """The disk log was stopped: nothing more is written."""


@dataclass
class _Job:
    """Work for the writer thread, in order: one group of writes, or a
    compaction (which waits for every write asked for before it)."""

    compaction: bool
    entries: list[Entry] = field(default_factory=list)
    waiters: list[Deferred] = field(default_factory=list)


class DiskLog(Service):
    """The node's journal writer: start it with the node, stop it after."""

    log = Logger()

    def __init__(self, datadir: DataDir, reactor: Any) -> None:
        self.datadir = datadir
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="dqid-disklog")
        self._jobs: deque[_Job] = deque()
        self._in_flight: _Job | None = None
        self._scheduled: Any = None  # the DelayedCall that starts the next job
        self._stopping = False
        self._idle_waiters: list[Deferred] = []
        self.groups = 0  # groups committed (one fsync each)
        self.entries = 0  # entries committed

    # -- the service ---------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._pool.start()
        self._schedule()

    def stopService(self) -> Deferred:
        """Refuse new writes, finish those asked for, stop the thread."""
        super().stopService()
        self._stopping = True
        if not self._pool.started:  # never started: nothing will write them
            if self._scheduled is not None:
                self._scheduled.cancel()
                self._scheduled = None
            jobs, self._jobs = list(self._jobs), deque()
            for job in jobs:
                for waiter in job.waiters:
                    waiter.errback(DiskLogStopped("the disk log stopped before it started"))
        done = self._idle()
        done.addCallback(lambda _: self._pool.stop())
        return done

    # -- asking ------------------------------------------------------------------

    def write(self, entries: Iterable[Entry]) -> Deferred[None]:
        """Fires once ``entries`` (and every write asked for before) are on
        disk; fails if the write or its fsync failed."""
        if self._stopping:
            return fail(DiskLogStopped("the disk log is stopped"))
        jobs = self._jobs
        if not jobs or jobs[-1].compaction:
            jobs.append(_Job(compaction=False))
        job = jobs[-1]
        job.entries.extend(entries)
        waiter: Deferred[None] = Deferred()
        job.waiters.append(waiter)
        self._schedule()
        return waiter

    def compact(self, live_entries: list[Entry]) -> Deferred[int]:
        """Snapshot ``live_entries`` (the live state now, covering every
        write asked for so far: see :meth:`DataDir.compact`) after the writes
        asked for before; fires with the snapshot's size."""
        if self._stopping:
            return fail(DiskLogStopped("the disk log is stopped"))
        waiter: Deferred[int] = Deferred()
        self._jobs.append(_Job(compaction=True, entries=live_entries, waiters=[waiter]))
        self._schedule()
        return waiter

    @property
    def compacting(self) -> bool:
        """A compaction is asked for and not done yet."""
        jobs = [self._in_flight, *self._jobs]
        return any(job is not None and job.compaction for job in jobs)

    # -- the writer ----------------------------------------------------------------

    def _schedule(self) -> None:
        """Start the next job after this reactor turn (so that the turn's
        writes go as one), unless one is running or already scheduled."""
        if self._scheduled is None and self._in_flight is None and self._jobs:
            self._scheduled = self._reactor.callLater(0, self._run_next)

    def _run_next(self) -> None:
        self._scheduled = None
        if self._in_flight is not None or not self._jobs or not self._pool.started:
            return
        job = self._in_flight = self._jobs.popleft()
        work = self.datadir.compact if job.compaction else self.datadir.append
        done = deferToThreadPool(self._reactor, self._pool, work, job.entries)
        done.addBoth(self._finished, job)

    def _finished(self, result: Any, job: _Job) -> None:
        self._in_flight = None
        if isinstance(result, Failure):
            self.log.failure("journal {what} failed in {path}; {count} waiting writes fail",
                             result, what="compaction" if job.compaction else "write",
                             path=self.datadir.path, count=len(job.waiters))
            for waiter in job.waiters:
                waiter.errback(result)
        else:
            if not job.compaction:
                self.groups += 1
                self.entries += len(job.entries)
                result = None
            for waiter in job.waiters:
                waiter.callback(result)
        if self._jobs:  # gathered while this one ran: no need to wait a turn
            self._run_next()
        elif self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _idle(self) -> Deferred[None]:
        if self._in_flight is None and not self._jobs:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

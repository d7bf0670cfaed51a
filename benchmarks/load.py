"""One load phase: client processes, each with one thread per flow, all
started together; their tallies merged into the phase's measurements.

``run_phase`` forks ``--procs`` client processes holding ``--concurrency``
flows in all, waits for them (each stops at ``--phase-timeout``) and
returns a JSON-ready dict: msgs/s, req/s, latencies, statuses, CPU (also
the servers' CPU milliseconds per message).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import signal
import threading
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

from benchmarks.flows import KINDS, Flow, LoadSpec, batch_push_request
from tests.procs import cpu_seconds

ROLES = {"push": "producer", "get+ack": "consumer",
         "batch push": "batch-producer", "batch get+ack": "batch-consumer"}
START_TIMEOUT = 60.0  # seconds the client processes may take to connect


@dataclass
class ClientTally:
    """What one client process measured (sent back through a queue)."""

    index: int
    cpu: float = 0.0
    lat: dict[str, array] = field(default_factory=lambda: {k: array("d") for k in KINDS})
    delivery: array = field(default_factory=lambda: array("d"))
    statuses: dict[int, int] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)
    errors: int = 0
    empties: int = 0
    produced: int = 0
    consumed: int = 0
    end: float = 0.0
    timed_out: bool = False
    fatal: str | None = None

    def add(self, flow: Flow, role: str) -> None:
        for kind, values in flow.lat.items():
            self.lat[kind].extend(values)
        self.delivery.extend(flow.delivery)
        for status, n in flow.statuses.items():
            self.statuses[status] = self.statuses.get(status, 0) + n
        self.samples.extend(flow.samples)
        self.errors += flow.errors
        self.empties += flow.empties
        if role.endswith("producer"):
            self.produced += flow.done
        else:
            self.consumed += flow.done
        self.end = max(self.end, flow.end)
        self.timed_out |= flow.timed_out


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def percentile(sorted_values: array, q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def client_process(index: int, flows_spec: list[tuple[str, int, int]], spec: LoadSpec,
                   barrier: Any, results: Any) -> None:
    """Runs in a client process: one thread per flow, all started together."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us by PID
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    flows = []
    try:
        for role, quota, offset in flows_spec:
            flow = Flow(offset, spec)
            flow.connect()
            flows.append((flow, role, quota))
    except OSError as error:
        barrier.abort()
        results.put(ClientTally(index, fatal=f"connect failed: {error}"))
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
        barrier.wait(timeout=START_TIMEOUT)
    except threading.BrokenBarrierError:
        results.put(ClientTally(index, fatal="the start barrier broke"))
        for flow, _, _ in flows:
            flow.deadline = 0.0
        go.set()
        return
    cpu0 = time.process_time()
    deadline = time.perf_counter() + spec.timeout
    for flow, _, _ in flows:
        flow.deadline = deadline
    go.set()
    for thread in threads:
        thread.join()
    tally = ClientTally(index, cpu=time.process_time() - cpu0)
    for flow, role, _ in flows:
        flow.close()
        tally.add(flow, role)
    results.put(tally)


def phase_roles(phase: str, count: int, conc: int) -> list[tuple[str, int]]:
    """(role, quota) of each flow.  e2e: half producers, half consumers,
    alternating (so every client process has both)."""
    if phase in ROLES:
        return [(ROLES[phase], q) for q in split(count, conc)]
    producers = [("producer", q) for q in split(count, conc // 2)]
    consumers = [("consumer", q) for q in split(count, conc - conc // 2)]
    roles: list[tuple[str, int]] = []
    while producers or consumers:
        roles.extend(consumers[:1] + producers[:1])
        del consumers[:1], producers[:1]
    return roles


def run_clients(roles: list[tuple[str, int]], procs: int, spec: LoadSpec,
                server_pids: list[int], wait: float) -> tuple[list[ClientTally], float, float]:
    """Fork the client processes (contiguous blocks of flows) and collect
    their tallies; also the start time and the servers' CPU seconds."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(procs + 1)
    results = ctx.Queue()
    workers = []
    first = 0
    for p, n in enumerate(split(len(roles), procs)):
        flows = [(role, quota, i) for i, (role, quota) in enumerate(roles)
                 if first <= i < first + n]
        first += n
        worker = ctx.Process(target=client_process, args=(p, flows, spec, barrier, results),
                             daemon=True)
        worker.start()
        workers.append(worker)
    tallies: list[ClientTally] = []
    try:
        try:
            barrier.wait(timeout=START_TIMEOUT)
        except threading.BrokenBarrierError:
            pass
        start = time.perf_counter()
        cpu0 = sum(cpu_seconds(pid) for pid in server_pids)
        for _ in workers:
            tallies.append(results.get(timeout=wait))
        server_cpu = sum(cpu_seconds(pid) for pid in server_pids) - cpu0
    finally:
        for worker in workers:
            worker.join(5)
            if worker.is_alive():
                worker.terminate()  # by its PID
                worker.join(5)
    return tallies, start, server_cpu


def run_phase(phase: str, ports: list[int], ack: bool, args: argparse.Namespace,
              server_pids: list[int], count: int | None = None,
              size: int | None = None, batch: int | None = None) -> dict:
    """Run one phase with fresh client processes; its measurements.

    ``push``, ``get+ack``, ``e2e``: one message per request (on bare, no
    ack); ``batch push``, ``batch get+ack``: ``batch`` (default
    --batch-size) messages per request."""
    count = args.count if count is None else count
    batch = args.batch_size if batch is None else batch
    size = args.size_bytes if size is None else size
    conc = max(2 if phase == "e2e" else 1, args.concurrency)
    spec = LoadSpec(
        ports=ports, size=size, ack=ack, stamp=phase == "e2e" and size >= 24, batch=batch,
        batch_req=batch_push_request(batch, size) if phase == "batch push" else b"",
        timeout=args.phase_timeout,
    )
    tallies, start, server_cpu = run_clients(
        phase_roles(phase, count, conc), max(1, min(args.procs, conc)), spec, server_pids,
        args.phase_timeout + 60)
    fatal = [t.fatal for t in tallies if t.fatal]
    if fatal:
        raise RuntimeError(f"{phase}: client could not start: {fatal[0]}")
    return summarise(phase, batch, tallies, start, server_cpu)


def summarise(phase: str, batch: int, tallies: list[ClientTally], start: float,
              server_cpu: float) -> dict:
    """The phase's measurements from the client processes' tallies."""
    elapsed = max(max(t.end for t in tallies) - start, 1e-9)
    by_kind = {k: array("d") for k in KINDS}
    delivery = array("d")
    statuses: dict[int, int] = {}
    for tally in tallies:
        for kind, values in tally.lat.items():
            by_kind[kind].extend(values)
        delivery.extend(tally.delivery)
        for status, n in tally.statuses.items():
            statuses[status] = statuses.get(status, 0) + n
    lat = array("d", sorted(v for values in by_kind.values() for v in values))
    by_kind = {k: array("d", sorted(v)) for k, v in by_kind.items() if v}
    delivery = array("d", sorted(delivery))
    produced = sum(t.produced for t in tallies)
    consumed = sum(t.consumed for t in tallies)
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
        "errors": sum(t.errors for t in tallies),
        "empty_gets": sum(t.empties for t in tallies),
        "timed_out": any(t.timed_out for t in tallies),
        "server_cpu_pct": 100 * server_cpu / elapsed,
        "server_cpu_seconds": server_cpu,
        # the servers' CPU (cluster: sum of its nodes) per message counted in msgs_per_s
        "server_cpu_ms_per_msg": server_cpu * 1000 / msgs if msgs else None,
        "client_cpu_pct": 100 * sum(t.cpu for t in tallies) / elapsed,
        "samples": [s for t in tallies for s in t.samples][:12],
    }

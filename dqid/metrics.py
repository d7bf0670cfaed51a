"""Prometheus metrics of one node (``GET /metrics``, DESIGN.md "Operations").

Nothing here keeps a second copy of the node's counters: a collector reads
``node.stats()`` each time Prometheus scrapes, so ``/metrics`` and
``/stats`` cannot disagree.  What only the HTTP layer sees is kept here, in
one place each: the time to answer a push (histogram ``dqid_push_seconds``,
a few integers per bucket, rendered at scrape time like the rest) and the
pushes answered 503 ``not_replicated``.

Each node has its own :class:`~prometheus_client.CollectorRegistry` (never
the library's global one), so nodes in one process (tests) stay apart.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Iterator, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily, Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE", "NodeMetrics", "PUSH_BUCKETS", "Timings"]

# The Prometheus text format, as prometheus-client writes it.
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds from a push request to its answer: a standalone push takes well
# under a millisecond, a replicated one a few, a push whose copies cannot be
# made up to the replication timeout (5 s).
PUSH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0)

# Gauges read from /stats: (metric name, /stats key, help).
_GAUGES = (
    ("dqid_depth", "depth", "Messages in this node's queue (pending + ready + leased "
     "+ delayed + held): what counts against --size"),
    ("dqid_ready", "ready", "Messages that may be delivered now"),
    ("dqid_leased", "leased", "Messages leased to a worker"),
    ("dqid_held", "held", "Messages held after --max-deliveries (kick or ack them)"),
    ("dqid_delayed", "delayed", "Messages not to be delivered before their due time"),
    ("dqid_pending", "pending", "Pushes not yet accepted (being replicated)"),
    ("dqid_size", "size", "Capacity of this node's queue (--size)"),
    ("dqid_min_copies", "min_copies", "Copies a push needs before it is accepted"),
    ("dqid_waiting_gets", "waiting_gets", "Long polls waiting for work"),
)

# Counters read from /stats "counters": (metric name without _total, key, help).
_COUNTERS = (
    ("dqid_pushed", "pushed", "Messages accepted into this node's queue"),
    ("dqid_delivered", "delivered", "Deliveries of this node's messages (every one)"),
    ("dqid_redelivered", "redelivered", "Deliveries after a message's first"),
    ("dqid_acked", "acked", "Messages of this node's queue acked"),
    ("dqid_nacked", "nacked", "Leases ended by a nack"),
    ("dqid_expired", "expired", "Leases that ran out without an ack"),
    ("dqid_rejected_full", "rejected_full", "Messages refused because the queue was full"),
)


class Timings:
    """A histogram's counts: per bucket (upper bounds ``buckets``, then
    +Inf), their sum; observed in O(log buckets), no lock (one thread)."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        cumulative, total = [], 0
        for bound, count in zip((*map(str, self.buckets), "+Inf"), self.counts):
            total += count
            cumulative.append((bound, total))
        return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=self.sum)


class StatsSource(Protocol):
    """What the collector reads: the node."""

    def stats(self) -> dict[str, Any]:
        """What ``/stats`` shows."""


class NodeCollector:
    """A prometheus-client collector that reads the node at scrape time."""

    def __init__(self, node: StatsSource, metrics: "NodeMetrics") -> None:
        self.node = node
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # names are not checked against other collectors

    def collect(self) -> Iterator[Metric]:
        stats = self.node.stats()
        info = InfoMetricFamily("dqid", "This node's id and dqid version")
        info.add_metric([], {"node": str(stats["node"]), "version": str(stats["version"])})
        yield info
        for name, key, doc in _GAUGES:
            yield GaugeMetricFamily(name, doc, value=stats[key])
        yield GaugeMetricFamily(
            "dqid_oldest_ready_age_seconds",
            "Seconds since the message next in line was enqueued (0 when none is ready)",
            value=stats["oldest_ready_age"] or 0)
        yield GaugeMetricFamily(
            "dqid_ready_to_serve", "1 when this node takes writes (GET /ready is 200)",
            value=1 if stats["ready_to_serve"] else 0)
        counters = stats["counters"]
        for name, key, doc in _COUNTERS:
            yield CounterMetricFamily(name, doc, value=counters[key])
        yield CounterMetricFamily(
            "dqid_not_replicated", "Pushes answered 503 not_replicated (too few copies in time)",
            value=self.metrics.not_replicated)
        connected = GaugeMetricFamily(
            "dqid_peer_connected", "1 while the peer is linked and answers heartbeats",
            labels=["peer"])
        held = GaugeMetricFamily(
            "dqid_peer_held", "Messages of the peer's queue that this node holds a copy of",
            labels=["peer"])
        for peer, peer_stats in sorted(stats["peers"].items()):
            connected.add_metric([peer], 1 if peer_stats["connected"] else 0)
            held.add_metric([peer], peer_stats.get("held", 0))
        yield connected
        yield held
        yield self.metrics.push_seconds.family(
            "dqid_push_seconds",
            "Seconds from a push request (POST /push, POST /push/batch) to its answer")


class NodeMetrics:
    """One node's metrics registry: what ``GET /metrics`` renders."""

    def __init__(self, node: StatsSource) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.not_replicated = 0
        self.push_seconds = Timings(PUSH_BUCKETS)
        self.registry.register(NodeCollector(node, self))

    def observe_push(self, seconds: float) -> None:
        self.push_seconds.observe(max(0.0, seconds))

    def count_not_replicated(self) -> None:
        self.not_replicated += 1

    def render(self) -> bytes:
        """The Prometheus text format of every metric, read now."""
        return generate_latest(self.registry)

"""What a queue costs: how long a killed cluster node's replacement takes
to recover its queue, the RSS a standalone node spends per message, and
the RSS a cluster peer spends per replica copy it holds."""

from __future__ import annotations

import argparse
import json
import time

from benchmarks.findings import Findings
from benchmarks.load import run_phase
from benchmarks.servers import Fleet, stats
from dqid.timings import DEFAULT_TIMINGS
from tests.procs import DqidProcess, rss_bytes

RECOVERY_FILL_BATCH = 1000  # messages per POST /push/batch filling the recovery cluster
RSS_FILL_BATCH = 1000  # messages per POST /push/batch filling the RSS nodes
REPLICA_RSS_BODY = 100  # body bytes of the messages whose replica copies are measured
SETTLE = 0.3  # seconds a node is left alone before its RSS is read
# Long enough for every node to pull each peer's whole state again
# (anti-entropy) after a fill: what copies cost from then on.
ANTI_ENTROPY_WAIT = DEFAULT_TIMINGS.anti_entropy_interval + 5.0


def recover(findings: Findings, fleet: Fleet, args: argparse.Namespace) -> dict:
    """Fresh 3-node cluster: push M to a, kill -9 a, time a replacement
    from its process start to /ready and to /stats depth == M."""
    m = args.recover_count
    cluster = fleet.cluster("recovery", m + 1000)
    cluster.start(60)
    nodes = list(cluster.nodes.values())
    a = cluster["a"]
    print(f"  recovery: pushing {m} messages to node a of a fresh 3-node cluster "
          f"(POST /push/batch of {RECOVERY_FILL_BATCH})", flush=True)
    result = run_phase("batch push", [a.http_port], True, args, [s.pid for s in nodes],
                       count=m, batch=RECOVERY_FILL_BATCH)
    if result["errors"] or result["produced"] != m:
        findings.note(f"recovery fill: {result['produced']} of {m} pushed, "
                      f"{result['errors']} errors; samples: {result['samples']}")
    depth_before = stats(a)["depth"]
    held = cluster.held_everywhere("a")
    if depth_before != m or any(h != m for h in held.values()):
        findings.note(f"recovery: before the kill a holds {depth_before}, its peers {held}, "
                      f"of {m} pushed")
    fresh = cluster.replace("a", wait="")  # kill -9, then the same id and ports
    started = fresh.started_at
    t_ready = t_depth = None
    depth = None
    deadline = started + args.phase_timeout
    while time.monotonic() < deadline:
        if not fresh.alive():
            raise RuntimeError(f"replacement a exited:\n{fresh.log_tail()}")
        try:
            if t_ready is None and fresh.http("GET", "/ready", timeout=2).status == 200:
                t_ready = time.monotonic() - started
            if t_ready is not None:
                depth = stats(fresh)["depth"]
                if depth == depth_before:
                    t_depth = time.monotonic() - started
                    break
        except OSError:
            pass
        time.sleep(0.01)
    if t_depth is None:
        findings.note(f"recovery: replacement a reached ready after {t_ready} s, depth {depth}, "
                      f"not depth {depth_before} within {args.phase_timeout:.0f} s")
    for node in cluster.nodes.values():
        node.stop()
    return {
        "messages": m,
        "fill_msgs_per_s": result["msgs_per_s"],
        "depth_before_kill": depth_before,
        "held_by_peers": held,
        "seconds_to_ready": t_ready,
        "seconds_to_depth": t_depth,
        "depth_seen": depth,
    }


def recover_from_disk(findings: Findings, fleet: Fleet, args: argparse.Namespace) -> dict:
    """A standalone node with --data-dir: push M, kill -9, start it again
    on the same directory; time from process start to /ready and to
    /stats depth == M (the replay of the log)."""
    m = args.recover_count
    node = fleet.standalone("disk", m + 1000, label="recovery-disk", disk=True)
    node.start()
    node.wait_for("/ready", 30, interval=0.01)
    print(f"  recovery from disk: pushing {m} messages to a standalone node with "
          f"--data-dir (POST /push/batch of {RECOVERY_FILL_BATCH})", flush=True)
    result = run_phase("batch push", [node.http_port], True, args, [node.pid],
                       count=m, batch=RECOVERY_FILL_BATCH)
    depth_before = stats(node)["depth"]
    node.kill()
    again = fleet.standalone("disk", m + 1000, label="recovery-disk-again", disk=False)
    again.args.append(f"--data-dir={node.workdir / 'disk-data'}")
    again.start()
    started = again.started_at
    t_ready = t_depth = depth = None
    deadline = started + args.phase_timeout
    while time.monotonic() < deadline:
        try:
            if t_ready is None and again.http("GET", "/ready", timeout=2).status == 200:
                t_ready = time.monotonic() - started
                depth = stats(again)["depth"]
                if depth == depth_before:
                    t_depth = t_ready
                    break
        except OSError:
            pass
        time.sleep(0.01)
    if t_depth is None:
        findings.note(f"recovery from disk: ready after {t_ready} s with depth {depth}, "
                      f"not {depth_before}")
    again.stop()
    return {"messages": m, "fill_msgs_per_s": result["msgs_per_s"],
            "depth_before_kill": depth_before, "seconds_to_ready": t_ready,
            "seconds_to_depth": t_depth, "depth_seen": depth}


def warm_up(node: DqidProcess, body_size: int) -> None:
    """Warm a node's code paths (single and batch push, get, ack) before
    its RSS is measured; it is empty again afterwards."""
    for _ in range(50):
        node.http("POST", "/push", b"w" * body_size)
    node.http("POST", "/push/batch",
              json.dumps({"messages": [{"body": "w" * body_size}] * 50}).encode())
    while (taken := node.http("GET", "/get?count=100")).status == 200:
        ids = [m["id"] for m in taken.json()["messages"]]
        node.http("POST", "/ack", json.dumps({"ids": ids}).encode())


def fill_by_batches(findings: Findings, node: DqidProcess, n: int, body_size: int,
                    what: str) -> None:
    """Push ``n`` numbered bodies of ``body_size`` bytes to ``node`` by
    POST /push/batch of RSS_FILL_BATCH; a refused batch is a problem and
    ends the fill."""
    pad = "x" * max(0, body_size - 8)
    for start in range(0, n, RSS_FILL_BATCH):
        entries = [{"body": f"{i:08d}{pad}"[:body_size]}
                   for i in range(start, min(n, start + RSS_FILL_BATCH))]
        reply = node.http("POST", "/push/batch",
                          json.dumps({"messages": entries}).encode(), timeout=60)
        if reply.status != 201:
            findings.note(f"{what}: POST /push/batch -> {reply.status}: "
                          f"{reply.body[:300]!r}")
            break


def fill(findings: Findings, args: argparse.Namespace, node: DqidProcess, n: int,
         body_size: int, what: str) -> None:
    """Push ``n`` bodies of ``body_size`` bytes to ``node`` as ``--rss-fill``
    says: POST /push/batch of RSS_FILL_BATCH, or single POST /push."""
    if args.rss_fill == "batch":
        fill_by_batches(findings, node, n, body_size, what)
        return
    result = run_phase("push", [node.http_port], True, args, [node.pid], count=n,
                       size=body_size)
    if result["errors"]:
        findings.note(f"{what}: {result['errors']} errors: {result['samples']}")


def rss_per_message(findings: Findings, fleet: Fleet, args: argparse.Namespace,
                    body_size: int) -> dict:
    """RSS growth of a fresh, warmed-up standalone node filled with
    ``--rss-count`` messages of ``body_size`` bytes, per message."""
    n = args.rss_count
    node = fleet.standalone(f"rss{body_size}", n + 1000, label=f"rss-{body_size}")
    node.start()
    node.wait_for("/ready", 60, interval=0.01)
    started = time.monotonic() - node.started_at
    warm_up(node, body_size)
    time.sleep(SETTLE)
    before = rss_bytes(node.pid)
    t0 = time.monotonic()
    fill(findings, args, node, n, body_size, f"rss fill {body_size} B")
    fill_seconds = time.monotonic() - t0
    time.sleep(SETTLE)
    after = rss_bytes(node.pid)
    depth = stats(node)["depth"]
    node.stop()
    if depth != n:
        findings.note(f"rss {body_size} B: depth {depth} after filling {n}")
    return {
        "body_bytes": body_size,
        "messages": depth,
        "rss_before": before,
        "rss_after": after,
        "bytes_per_message": (after - before) / max(depth, 1),
        "fill_seconds": fill_seconds,
        "startup_seconds": started,
    }


def rss_per_replica_copy(findings: Findings, fleet: Fleet, args: argparse.Namespace,
                         body_size: int = REPLICA_RSS_BODY) -> dict:
    """RSS growth of peers b and c of a fresh 3-node cluster (min-copies 3)
    while they hold copies of ``--rss-count`` messages pushed to a (by
    POST /push/batch of RSS_FILL_BATCH, or single pushes with ``--rss-fill
    single``), per copy: the mean over b and c, once every node has pulled
    the others' state again (anti-entropy), and right after the fill."""
    n = args.rss_count
    cluster = fleet.cluster("rss-replica", n + 1000)
    try:
        cluster.start(60)
        a = cluster["a"]
        peers = {p: cluster[p] for p in cluster.ids if p != "a"}
        warm_up(a, body_size)  # the copies of the warm-up messages come and go on b and c
        try:
            cluster.wait_until(lambda: not any(cluster.held_everywhere("a").values()),
                               args.phase_timeout, what="b and c to drop the warm-up copies")
        except AssertionError as error:
            findings.note(f"rss per replica copy: {error}: {cluster.held_everywhere('a')}")
        time.sleep(SETTLE)
        before = {p: rss_bytes(node.pid) for p, node in peers.items()}
        a_before = rss_bytes(a.pid)
        t0 = time.monotonic()
        fill(findings, args, a, n, body_size, "rss per replica copy, fill of a")
        fill_seconds = time.monotonic() - t0
        held: dict[str, int] = {}

        def all_held() -> bool:
            held.update(cluster.held_everywhere("a"))
            return all(h >= n for h in held.values())

        try:
            cluster.wait_until(all_held, args.phase_timeout,
                               what=f"b and c to hold a's {n} messages")
        except AssertionError as error:
            findings.note(f"rss per replica copy: {error}: they hold {held}")
        time.sleep(SETTLE)
        filled = {p: rss_bytes(node.pid) for p, node in peers.items()}
        time.sleep(ANTI_ENTROPY_WAIT)
        after = {p: rss_bytes(node.pid) for p, node in peers.items()}
        a_after = rss_bytes(a.pid)
        depth = stats(a)["depth"]
        held = cluster.held_everywhere("a")
    finally:
        for node in cluster.nodes.values():
            node.stop()
    if depth != n:
        findings.note(f"rss per replica copy: a's depth {depth} after filling {n}")
    per_peer = {p: (after[p] - before[p]) / max(held[p], 1) for p in peers}
    when_filled = {p: (filled[p] - before[p]) / max(held[p], 1) for p in peers}
    return {
        "body_bytes": body_size,
        "messages": n,
        "held": held,
        "rss_before": before,
        "rss_after": after,
        "anti_entropy_wait": ANTI_ENTROPY_WAIT,
        # Right after the fill, before the peers pulled each other's state.
        "bytes_per_copy_when_filled": sum(when_filled.values()) / len(when_filled),
        "bytes_per_copy_by_peer": per_peer,
        "bytes_per_copy": sum(per_peer.values()) / len(per_peer),
        "owner_rss_before": a_before,
        "owner_rss_after": a_after,
        "owner_bytes_per_message": (a_after - a_before) / max(depth, 1),
        "fill_seconds": fill_seconds,
    }

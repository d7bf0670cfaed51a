#!/usr/bin/env python3
"""Benchmark dqid against a bare twisted.web server, in one run.

Starts, on 127.0.0.1 with free ports, as separate processes:

* ``bare``       a tiny twisted.web Resource server (POST /push appends to a
                 deque, GET /get pops): the ceiling of the framework;
* ``standalone`` one dqid node;
* ``cluster``    three dqid nodes with --min-copies=3 (requests go
                 round-robin over the three HTTP ports, like a balancer);
* ``standalone-disk``, ``cluster-disk``  the same with --data-dir on every
                 node (``--peer-tls``: cluster peers over mutual TLS).

For every target it runs three phases of ``--count`` messages: push, get+ack
(get only on the bare server) and end-to-end (producers and consumers at
once).  The dqid targets then run two batch phases of ``--batch-count``
messages: batch push (POST /push/batch of ``--batch-size``) and batch
get+ack (GET /get?count=K, then POST /ack with the K ids).  Load comes from
``--procs`` client processes holding ``--concurrency`` keep-alive HTTP/1.1
connections in all (raw sockets, one thread each).  Each phase also gets
the servers' CPU per message (``cpu ms/msg``: the CPU seconds of the
target's server processes over the phase, summed over a cluster's three
nodes, x 1000 / the messages its msgs/s counts), so that a replicated
message's cost can be set against a standalone one's.

Then it measures how long a replacement cluster node takes to recover a
queue of ``--recover-count`` messages, the RSS a standalone node spends per
queued message, and the RSS a cluster peer spends per replica copy (peers
b and c of a fresh 3-node cluster while they hold ``--rss-count`` messages
of 100 B pushed to a), and checks the issues' targets (met / NOT met):
among them, a cluster e2e message at most twice a standalone one's CPU, and
the cluster's e2e, batch push and batch get+ack rates at least 0.7 x the
standalone's (also with --data-dir, when those targets ran).

Every process it starts is stopped by its PID (SIGTERM, then SIGKILL), also
on errors and Ctrl-C.  The modules beside this file do the work (see
README.md); the processes come from the test helpers in ``tests/``.

    venv/bin/python benchmarks/bench.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/, tests/

from benchmarks.findings import Findings  # noqa: E402
from benchmarks.flows import MAX_GET_COUNT, MAX_PUSH_BATCH  # noqa: E402
from benchmarks.footprint import (  # noqa: E402
    REPLICA_RSS_BODY, recover, recover_from_disk, rss_per_message, rss_per_replica_copy)
from benchmarks.phases import run_target, servers_size  # noqa: E402
from benchmarks.report import report, targets  # noqa: E402
from benchmarks.servers import TARGETS, Fleet, start_all  # noqa: E402
from tests.procs import TWISTD  # noqa: E402

QUICK = (2000, 20000, 20000, 20000, 200)  # count, batch, recover, rss, warm-up
FULL = (20000, 100000, 100000, 100000, 500)
RSS_BODY_SIZES = (100, 1024)


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
                        help="comma-separated subset of bare,standalone,cluster,standalone-disk,cluster-disk")
    parser.add_argument("--recover-count", type=int, default=None,
                        help="messages the replacement node recovers "
                             "(default 100000, --quick 20000; 0: skip)")
    parser.add_argument("--rss-count", type=int, default=None,
                        help="messages queued for the RSS measurements, standalone "
                             "per message and cluster peers per replica copy "
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
    parser.add_argument("--peer-tls", action="store_true",
                        help="cluster nodes talk over mutual TLS (a throw-away CA)")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the server logs (always kept when there are problems)")
    args = parser.parse_args(argv)
    for name, value in zip(("count", "batch_count", "recover_count", "rss_count", "warmup"),
                           QUICK if args.quick else FULL):
        if getattr(args, name) is None:
            setattr(args, name, value)
    chosen = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in chosen if t not in TARGETS]
    if bad or not chosen:
        parser.error(f"--targets: unknown {bad}; choose from {','.join(TARGETS)}")
    args.targets = [t for t in TARGETS if t in chosen]
    if min(args.recover_count, args.rss_count, args.warmup, args.batch_count) < 0:
        parser.error("--batch-count, --recover-count, --rss-count and --warmup must be >= 0")
    if not 1 <= args.batch_size <= MAX_PUSH_BATCH:
        parser.error(f"--batch-size must be 1 ... {MAX_PUSH_BATCH}")
    if args.count < 1 or args.size_bytes < 1 or args.concurrency < 1 or args.procs < 1:
        parser.error("--count, --size-bytes, --concurrency and --procs must be >= 1")
    return args


def measure(findings: Findings, fleet: Fleet, args: argparse.Namespace) -> None:
    """Every target's phases, then recovery and RSS (standalone per
    message, cluster peers per replica copy)."""
    servers = {t: fleet.target(t, servers_size(args)) for t in args.targets}
    print(f"starting {sum(len(s) for s in servers.values())} server processes "
          f"(logs in {fleet.workdir})", flush=True)
    start_all([s for group in servers.values() for s in group])
    for target in args.targets:
        for server in run_target(findings, fleet, args, target, servers[target]):
            server.stop()
    if args.recover_count:
        findings.recovery = recover(findings, fleet, args)
        if "standalone-disk" in args.targets or "cluster-disk" in args.targets:
            findings.disk_recovery = recover_from_disk(findings, fleet, args)
    if args.rss_count:
        for body_size in RSS_BODY_SIZES:
            print(f"  rss: filling a fresh standalone node with {args.rss_count} "
                  f"messages of {body_size} B", flush=True)
            findings.rss.append(rss_per_message(findings, fleet, args, body_size))
        print(f"  rss: pushing {args.rss_count} messages of {REPLICA_RSS_BODY} B to node a "
              f"of a fresh 3-node cluster; peers b and c hold the copies", flush=True)
        findings.replica_rss = rss_per_replica_copy(findings, fleet, args)


def write_json(path: str, findings: Findings, args: argparse.Namespace, meta: dict) -> None:
    document = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "environment": meta,
        "results": findings.results,
        "recovery": findings.recovery,
        "rss": findings.rss,
        "replica_rss": findings.replica_rss,
        "targets": targets(findings, args),
        "problems": findings.problems,
        "notes": findings.remarks,
    }
    with open(path, "w") as out:
        json.dump(document, out, indent=2)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--bare-server":  # the bare server alone, in front
        from benchmarks.bare import serve
        serve(int(argv[1]))
        return 0
    args = parse_args(argv)

    def terminated(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, terminated)

    import twisted
    meta = {"cpus": os.cpu_count(), "python": platform.python_version(),
            "twisted": twisted.__version__, "platform": platform.platform(terse=True)}
    meta["peers"] = "mutual TLS" if args.peer_tls else "plain TCP"
    fleet = Fleet(Path(tempfile.mkdtemp(prefix="dqid-bench-")), args.twistd or TWISTD,
                  peer_tls=args.peer_tls)
    findings = Findings()
    wall0 = time.monotonic()
    ok = False
    try:
        measure(findings, fleet, args)
        ok = True
    except KeyboardInterrupt:
        print("\ninterrupted; stopping servers", file=sys.stderr)
        findings.interrupted = True
    except Exception as error:
        findings.note(f"benchmark aborted: {type(error).__name__}: {error}")
    finally:
        fleet.stop_all()
    for found in fleet.problems_in_logs():
        findings.note(found)
    meta["wall_seconds"] = time.monotonic() - wall0
    print()
    print(report(findings, args, meta))
    if args.json:
        write_json(args.json, findings, args, meta)
        print(f"\nJSON written to {args.json}")
    if findings.problems or args.keep_logs or not ok:
        print(f"server logs kept in {fleet.workdir}")
    else:
        shutil.rmtree(fleet.workdir, ignore_errors=True)
    return 0 if ok and not findings.problems else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

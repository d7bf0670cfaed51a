"""The throughput phases of one target, with the checks after each:
warm-up, push, get+ack, e2e and (dqid only) batch push, batch get+ack."""

from __future__ import annotations

import argparse
import time

from benchmarks.findings import Findings
from benchmarks.load import run_phase
from benchmarks.servers import Fleet, start_all, stats
from tests.procs import DqidProcess

PHASES = ("push", "get+ack", "e2e")
BATCH_PHASES = ("batch push", "batch get+ack")  # dqid only: bare has no batch endpoints


def servers_size(args: argparse.Namespace) -> int:
    """--size for the throughput targets: the whole push phase fits."""
    return max(args.count, args.batch_count) + 1000


def check_depth(findings: Findings, target: str, phase: str, servers: list[DqidProcess],
                expected: int, exact: bool = True) -> int:
    """Compare /stats depth (after a short settle) with what the phase
    should have left; the depth seen."""
    deadline = time.monotonic() + 5
    while True:
        seen = [stats(s) for s in servers]
        depth = sum(st["depth"] for st in seen)
        if depth == expected or not exact or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    redelivered = sum(st["counters"]["redelivered"] for st in seen)
    if depth != expected and exact:
        findings.note(f"{target} after {phase}: /stats depth {depth} "
                      f"(per node {[st['depth'] for st in seen]}), expected {expected}")
    if redelivered:
        findings.note(f"{target} after {phase}: {redelivered} redeliveries counted")
    return depth


def print_result(result: dict) -> None:
    print(f"  {result['target']:<10} {result['phase']:<13} {result['msgs_per_s']:9.0f} msgs/s "
          f"p50 {result['p50_ms']:.2f} ms p99 {result['p99_ms']:.2f} ms "
          f"({result['seconds']:.1f} s{', TIMED OUT' if result['timed_out'] else ''})",
          flush=True)


def judge(findings: Findings, args: argparse.Namespace, result: dict, count: int) -> None:
    """Unexpected answers are problems; a phase cut short by the time
    budget is a note, or a problem (a hang) under 10% done."""
    name = f"{result['target']} {result['phase']}"
    if result["errors"]:
        findings.note(f"{name}: {result['errors']} unexpected answers/errors; "
                      f"statuses {result['statuses']}; samples:\n      "
                      + "\n      ".join(result["samples"]))
    if result["timed_out"]:
        cut = (f"{name}: stopped at --phase-timeout {args.phase_timeout:.0f} s "
               f"with {result['messages']} of {count} messages done (its numbers cover those)")
        if result["messages"] < count / 10:
            findings.note(cut + "; that is under 10%: it looks hung")
        else:
            findings.remark(cut)


def run_target(findings: Findings, fleet: Fleet, args: argparse.Namespace, target: str,
               servers: list[DqidProcess]) -> list[DqidProcess]:
    """Every phase on ``target``; the servers it ends with (a target whose
    queue is not empty after get+ack is restarted fresh before e2e)."""
    dqid = target != "bare"
    if args.warmup:  # discarded: first connections, cold code paths
        ports, pids = [s.http_port for s in servers], [s.pid for s in servers]
        warm = run_phase("push", ports, dqid, args, pids, count=args.warmup)
        run_phase("get+ack", ports, dqid, args, pids, count=warm["produced"])
        if dqid:
            check_depth(findings, target, "warm-up", servers, 0)
    pushed = args.count
    phases = PHASES + (BATCH_PHASES if dqid and args.batch_count else ())
    for n, phase in enumerate(phases):
        if phase == "get+ack" or phase == "batch get+ack":
            count = pushed
        else:
            count = args.batch_count if phase == "batch push" else args.count
        if count == 0:
            findings.note(f"{target} {phase}: skipped, nothing was pushed")
            continue
        result = run_phase(phase, [s.http_port for s in servers], dqid, args,
                           [s.pid for s in servers], count=count)
        result["target"] = target
        findings.results.append(result)
        print_result(result)
        judge(findings, args, result, count)
        for server in servers:
            if not server.alive():
                raise RuntimeError(f"{server.node_id} died during {target} {phase}:\n"
                                   f"{server.log_tail()}")
        if phase.endswith("push"):
            pushed = result["produced"]
            expected = pushed
        elif phase.endswith("get+ack"):
            expected = pushed - result["consumed"]
        else:
            expected = result["produced"] - result["consumed"]
        if dqid:  # a phase cut short leaves in-flight leases: no exact check
            left = check_depth(findings, target, phase, servers, expected,
                               exact=not result["timed_out"])
        else:
            left = expected
        following = phases[n + 1] if n + 1 < len(phases) else None
        if left and following in ("e2e", "batch push"):
            findings.note(f"{target}: {left} messages left after {phase}; restarting "
                          f"{target} fresh for {following}")
            for server in servers:
                server.stop()
            servers = fleet.target(target, servers_size(args))
            start_all(servers)
    return servers

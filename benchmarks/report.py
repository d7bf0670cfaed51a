"""The report: ratios to bare, the issues' targets (met / NOT met, among
them a cluster's cost per message against a standalone node's) and the
text table with its notes, from what a run found."""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks.findings import Findings
from benchmarks.flows import MAX_GET_COUNT
from benchmarks.footprint import RECOVERY_FILL_BATCH, RSS_FILL_BATCH

STATED_FOR = (100000, 100000, 16, 100)  # rss count, recover count, concurrency, batch size


def fmt(value: Any, spec: str, width: int) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-".rjust(width)
    return format(value, spec).rjust(width)


def add_ratios(results: list[dict]) -> None:
    """``ratio_to_bare`` and (batch phases) ``ratio_to_single`` of every result."""
    def rate(target: str, phase: str) -> float | None:
        for r in results:
            if r["target"] == target and r["phase"] == phase and r["msgs_per_s"] > 0:
                return r["msgs_per_s"]
        return None

    for r in results:
        single = r["phase"].replace("batch ", "")
        base = rate("bare", single)
        r["ratio_to_bare"] = r["msgs_per_s"] / base if base else None
        own = rate(r["target"], single) if single != r["phase"] else None
        r["ratio_to_single"] = r["msgs_per_s"] / own if own else None


def targets(findings: Findings, args: argparse.Namespace) -> list[dict]:
    """The issue's targets: each with its measured value and whether it is met."""
    add_ratios(findings.results)
    found = {(r["target"], r["phase"]): r for r in findings.results}
    rows = []

    def row(name: str, value: float | None, limit: float, op: str, unit: str,
            how: str, failed: bool = False) -> None:
        """``failed``: measured, but no value came (recovery never finished)."""
        met = None if value is None else (value >= limit if op == ">=" else value < limit
                                          if op == "<" else value <= limit)
        if failed:
            met = False
        rows.append({"target": name, "value": value, "limit": limit, "op": op,
                     "unit": unit, "how": how, "met": met})

    def ratio(target: str, phase: str, key: str) -> float | None:
        r = found.get((target, phase))
        return None if r is None else r[key]

    def versus(target: str, base: str, phase: str, key: str = "msgs_per_s") -> float | None:
        """``target``'s ``key`` over ``base``'s in ``phase``; None unless both ran."""
        mine, theirs = found.get((target, phase)), found.get((base, phase))
        if mine is None or theirs is None or mine[key] is None or not theirs[key]:
            return None
        return mine[key] / theirs[key]

    def cluster_vs_standalone(suffix: str, disk: str) -> None:
        """Issue 13: a replicated message costs at most twice a standalone
        one; ``disk`` "" (in memory) or "-disk" (--data-dir targets)."""
        cluster, standalone = f"cluster{disk}", f"standalone{disk}"
        peers = f"cluster peers over {'mutual TLS' if args.peer_tls else 'plain TCP'}"
        cpu_label = ("CPU per e2e message, cluster (sum of 3 nodes) vs standalone" if not disk
                     else "CPU per e2e message with --data-dir, cluster (3 nodes) vs standalone")
        row(cpu_label, versus(cluster, standalone, "e2e", "server_cpu_ms_per_msg"), 2, "<=",
            "x", f"{cluster} e2e server CPU ms per message (sum of its 3 processes) / "
                 f"{standalone} e2e server CPU ms per message; {peers}")
        for phase in ("e2e", "batch push", "batch get+ack"):
            row(f"cluster {phase} vs standalone {phase}{suffix}",
                versus(cluster, standalone, phase), 0.7, ">=", "x",
                f"{cluster} {phase} msgs/s / {standalone} {phase} msgs/s; {peers}")

    where = (f"{args.concurrency} connections, {args.procs} client procs, "
             f"{args.size_bytes} B bodies")
    row("replicated push (3 nodes, min-copies 3) vs bare POST",
        ratio("cluster", "push", "ratio_to_bare"), 0.6, ">=", "x",
        f"cluster push msgs/s / bare push msgs/s; {where}")
    row("standalone push vs bare POST", ratio("standalone", "push", "ratio_to_bare"),
        0.8, ">=", "x", f"standalone push msgs/s / bare push msgs/s; {where}")
    row(f"replicated batch push ({args.batch_size}/request) vs replicated push",
        ratio("cluster", "batch push", "ratio_to_single"), 20, ">=", "x",
        "cluster batch push msgs/s / cluster push msgs/s")
    cluster_vs_standalone("", "")
    rss = next((r for r in findings.rss if r["body_bytes"] == 100), None)
    row("RSS overhead per queued 100 B message, standalone",
        None if rss is None else rss["bytes_per_message"] - rss["body_bytes"], 300, "<=", "B",
        f"RSS growth / {args.rss_count} messages, less the 100-byte body")
    copies = findings.replica_rss
    row("RSS overhead per replica copy, 100 B bodies",
        None if copies is None else copies["bytes_per_copy"] - copies["body_bytes"], 300,
        "<=", "B", f"RSS growth of peers b and c (3 nodes, min-copies 3) while each holds "
                   f"a's {args.rss_count} messages, per message, mean of b and c, less the "
                   f"100-byte body")
    for phase in ("push", "e2e"):
        disk_ratio = None
        with_disk, without = found.get(("cluster-disk", phase)), found.get(("cluster", phase))
        if with_disk and without and without["msgs_per_s"]:
            disk_ratio = with_disk["msgs_per_s"] / without["msgs_per_s"]
        row(f"cluster {phase} with --data-dir vs in memory", disk_ratio, 0.8, ">=", "x",
            f"cluster-disk {phase} msgs/s / cluster {phase} msgs/s")
    cluster_vs_standalone(", with --data-dir", "-disk")
    disk = findings.disk_recovery
    row(f"restart replays {disk['messages'] if disk else 100000} messages from disk",
        None if disk is None else disk["seconds_to_depth"], 5, "<", "s",
        "standalone --data-dir, kill -9, process start -> /ready with every message",
        failed=disk is not None and disk["seconds_to_depth"] is None)
    rec = findings.recovery
    row(f"replacement recovers {rec['messages'] if rec else 100000} messages",
        None if rec is None else rec["seconds_to_depth"], 10, "<", "s",
        "replacement process start -> /stats depth == all (kill -9 of a, 3 nodes)",
        failed=rec is not None and rec["seconds_to_depth"] is None)
    return rows


def table(results: list[dict]) -> list[str]:
    header_line = (f"{'target':<16}{'phase':<14}{'msgs/s':>9}{'req/s':>8}{'p50 ms':>9}"
                   f"{'p99 ms':>9}{'x bare':>8}{'x 1-msg':>8}{'srv cpu':>9}{'cpu ms/msg':>11}"
                   f"{'cli cpu':>9}{'errors':>7}")
    lines = [header_line, "-" * len(header_line)]
    add_ratios(results)
    for r in results:
        lines.append(
            f"{r['target']:<16}{r['phase']:<14}{fmt(r['msgs_per_s'], '.0f', 9)}"
            f"{fmt(r['req_per_s'], '.0f', 8)}{fmt(r['p50_ms'], '.2f', 9)}"
            f"{fmt(r['p99_ms'], '.2f', 9)}{fmt(r['ratio_to_bare'], '.2f', 8)}"
            f"{fmt(r['ratio_to_single'], '.1f', 8)}"
            f"{fmt(r['server_cpu_pct'], '.0f', 8)}%{fmt(r['server_cpu_ms_per_msg'], '.3f', 11)}"
            f"{fmt(r['client_cpu_pct'], '.0f', 8)}%"
            f"{fmt(r['errors'], 'd', 7)}{'  TIMEOUT' if r['timed_out'] else ''}")
    return lines


def legend(args: argparse.Namespace) -> list[str]:
    return [
        "msgs/s: messages pushed (push) or consumed (get+ack, e2e) per second; "
        "get+ack = 2 requests per",
        f"message on dqid, 1 on bare. batch: {args.batch_size} messages per POST "
        f"/push/batch, GET /get?count=K and POST /ack",
        f"(K = {min(args.batch_size, MAX_GET_COUNT)}); bare has no batch endpoints. "
        "p50/p99: per successful request (a batch is one).",
        "x bare: msgs/s over bare's msgs/s in the same phase (batch phases: bare's "
        "one-message push or get).",
        "x 1-msg: a batch phase's msgs/s over the same target's one-message push or get+ack.",
        "srv cpu: CPU of the target's server process(es) over the phase (cluster: "
        "sum of 3); cli cpu: all clients.",
        "cpu ms/msg: the server process(es)' CPU ms over the phase (cluster: sum of 3) "
        "per message counted in msgs/s.",
    ]


def latencies(results: list[dict]) -> list[str]:
    lines = []
    mixed = [r for r in results if len(r["by_request"]) > 1]
    if mixed:
        lines += ["", "latency by request kind, p50 / p99 ms:"]
        for r in mixed:
            kinds = "   ".join(f"{k} {v['p50_ms']:6.2f} / {v['p99_ms']:6.2f}"
                               for k, v in r["by_request"].items())
            lines.append(f"  {r['target']:<16}{r['phase']:<14}{kinds}")
    e2e = [r for r in results if r["phase"] == "e2e" and r["delivery_p50_ms"] is not None]
    if e2e:
        lines += ["", "e2e delivery latency (push sent -> consumer holds the body) and "
                      "empty gets (204, consumer backs off):"]
        for r in e2e:
            lines.append(f"  {r['target']:<16} p50 {r['delivery_p50_ms']:8.2f} ms   "
                         f"p99 {r['delivery_p99_ms']:8.2f} ms   empty gets {r['empty_gets']}")
    return lines


def footprint(findings: Findings, args: argparse.Namespace) -> list[str]:
    lines = []
    rec = findings.recovery
    if rec:
        lines += [
            "",
            f"Recovery (3 nodes, min-copies 3): {rec['messages']} messages pushed to a "
            f"(POST /push/batch of {RECOVERY_FILL_BATCH}, {rec['fill_msgs_per_s']:.0f} "
            f"msgs/s), kill -9 a, start a fresh a:",
            f"  held by peers before kill: {rec['held_by_peers']}",
            f"  process start -> /ready 200:          {fmt(rec['seconds_to_ready'], '.2f', 7)} s",
            f"  process start -> /stats depth == {rec['messages']:<6}"
            f"{fmt(rec['seconds_to_depth'], '.2f', 7)} s",
        ]
        if findings.rss:
            lines.append(f"  (for scale: an empty standalone node, started alone, answers "
                         f"/ready {findings.rss[0]['startup_seconds']:.2f} s after its start)")
    disk = findings.disk_recovery
    if disk:
        lines += [
            "",
            f"Recovery from disk (standalone, --data-dir): {disk['messages']} messages pushed "
            f"({disk['fill_msgs_per_s']:.0f} msgs/s), kill -9, the same directory again:",
            f"  process start -> /ready 200 with depth {disk['messages']}: "
            f"{fmt(disk['seconds_to_depth'], '.2f', 7)} s",
        ]
    fill = f"POST /push/batch of {RSS_FILL_BATCH}" if args.rss_fill == "batch" else "POST /push"
    if findings.rss:
        lines += ["", f"RSS per queued message (standalone node, {args.rss_count} messages, "
                      f"filled by {fill}):"]
        for r in findings.rss:
            lines.append(f"  body {r['body_bytes']:>5} B: RSS {r['rss_before'] / 2**20:7.1f} -> "
                         f"{r['rss_after'] / 2**20:7.1f} MiB = {r['bytes_per_message']:7.0f} "
                         f"B/message ({r['bytes_per_message'] - r['body_bytes']:.0f} B over "
                         f"the body)")
    copies = findings.replica_rss
    if copies:
        if not findings.rss:
            lines.append("")
        per_peer = "; ".join(
            f"{p}: RSS {copies['rss_before'][p] / 2**20:.1f} -> "
            f"{copies['rss_after'][p] / 2**20:.1f} MiB = {per:.0f} B/copy"
            for p, per in copies["bytes_per_copy_by_peer"].items())
        lines += [
            f"RSS per replica copy (peers b and c holding a's {copies['messages']} messages of "
            f"{copies['body_bytes']} B, pushed by {fill}), {copies['anti_entropy_wait']:.0f} s "
            f"after the fill (an anti-entropy pass): {copies['bytes_per_copy']:.0f} B/copy "
            f"({copies['bytes_per_copy'] - copies['body_bytes']:.0f} B over the body); "
            f"right after the fill {copies['bytes_per_copy_when_filled']:.0f} B/copy",
            f"  {per_peer}; owner a: {copies['owner_bytes_per_message']:.0f} B/message",
        ]
    return lines


def verdicts(findings: Findings, args: argparse.Namespace) -> list[str]:
    lines = ["", "Targets:"]
    rows = targets(findings, args)
    width = max([57] + [len(t["target"]) + 2 for t in rows])
    for t in rows:
        if t["met"] is False and t["value"] is None:
            value, verdict = "never", "NOT met"
        elif t["value"] is None:
            value, verdict = "-", "not measured"
        else:
            value = f"{t['value']:.0f} B" if t["unit"] == "B" else f"{t['value']:.2f} {t['unit']}"
            verdict = "met" if t["met"] else "NOT met"
        goal = f"{t['op']} {t['limit']:g} {t['unit']}"
        lines.append(f"  {t['target']:<{width}}{goal:>8}   measured {value:>12}   {verdict}")
    if (args.rss_count, args.recover_count, args.concurrency, args.batch_size) != STATED_FOR:
        lines.append("  (the issue's targets are stated for 16 clients, 100-message batches, "
                     "100,000 messages for RSS and recovery;")
        lines.append("   this run used other settings, so these are indications only)")
    return lines


def closing(findings: Findings) -> list[str]:
    lines = [""]
    if findings.interrupted:
        lines.append("INTERRUPTED: the results above are partial.")
    if findings.remarks:
        lines.append("Notes:")
        lines += ["  - " + remark for remark in findings.remarks]
    if findings.problems:
        lines.append(f"PROBLEMS ({len(findings.problems)}):")
        lines += ["  - " + p for p in findings.problems]
    else:
        lines.append("No errors, unexpected answers, depth mismatches or tracebacks observed.")
    return lines


def report(findings: Findings, args: argparse.Namespace, meta: dict) -> str:
    lines = [
        f"dqid benchmark: count={args.count} size={args.size_bytes} B "
        f"concurrency={args.concurrency} client procs={args.procs} "
        f"batch={args.batch_size} batch count={args.batch_count}",
        f"  {meta['cpus']} CPUs, Python {meta['python']}, Twisted {meta['twisted']}, "
        f"{meta['platform']}; wall {meta['wall_seconds']:.0f} s",
        f"  cluster peers: {meta.get('peers', 'plain TCP')}",
        "",
    ]
    lines += table(findings.results) + [""] + legend(args) + latencies(findings.results)
    lines += footprint(findings, args) + verdicts(findings, args) + closing(findings)
    return "\n".join(lines)

"""What one periodic anti-entropy pull costs: a node pulling a peer that
holds the same messages, with and without the summary of what it has seen
(protocol 5), in one process, over the tests' in-memory AMP links.

Three nodes; each owns ``--messages`` / 3 messages of 100 bytes, pushed in
batches of 1,000 (so the copies are kept as runs), and 1 % of them are
leased (their state is no longer fresh, so the owner still sends them).
Then node c pulls node a once as anti-entropy does, ``--rounds`` times
each way, alternating; the report gives the CPU seconds of the whole pull
(both sides: summary, paging, encoding, decoding, merging) and the records
it carried.

    venv/bin/python benchmarks/anti_entropy.py [--messages N] [--rounds R]
"""

from __future__ import annotations

import argparse
import time

from dqid import amp_commands as cmd
from dqid.node import PushItem
from tests.amp_harness import Net
from tests.helpers import successResultOf

BATCH = 1000


def fill(net: Net, messages: int) -> None:
    for member in net.members.values():
        for start in range(0, messages // 3, BATCH):
            pushed = member.node.push_many([PushItem(b"x" * 100)] * BATCH)
            net.settle()
            successResultOf(pushed)
        member.node.get(count=messages // 300, visibility=3600.0)  # local: at once
    net.advance(1.0)  # the leases' states reach the copies


def one_pull(net: Net, summary: bool) -> tuple[float, int]:
    """CPU seconds of one periodic pull of a by c, and the records it carried."""
    c = net["c"]
    transfer = c.cluster.transfer
    peer = transfer.links.peers["a"]
    carried = []
    merge = c.cluster.holdings.merge_records

    def counting(records, source=None):
        records = list(records)
        carried.append(len(records))
        return merge(records, source)

    c.cluster.holdings.merge_records = counting
    saved = cmd.SEEN_SUMMARIES
    if not summary:
        cmd.SEEN_SUMMARIES = cmd.PROTOCOL_MAX + 1  # as a protocol 4 peer is pulled
    try:
        started = time.process_time()
        transfer.start_sync(peer, again=True)
        net.settle()
        spent = time.process_time() - started
    finally:
        cmd.SEEN_SUMMARIES = saved
        del c.cluster.holdings.merge_records
    assert not transfer.state["a"].syncing
    return spent, sum(carried)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=90000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    net = Net(["a", "b", "c"], 3, size=args.messages + 1000)
    net.start_all()
    fill(net, args.messages)
    held = net["c"].cluster.store.held("a") + net["c"].cluster.store.held("b")
    results: dict[bool, list[tuple[float, int]]] = {True: [], False: []}
    for _ in range(args.rounds):
        for summary in (False, True):
            results[summary].append(one_pull(net, summary))
    print(f"anti-entropy: c pulls a; each node owns {args.messages // 3} messages of 100 B "
          f"(1 % leased); c holds {held} copies")
    for summary, label in ((False, "whole state (protocol 4)"), (True, "with summary (protocol 5)")):
        best = min(spent for spent, _ in results[summary])
        records = results[summary][0][1]
        print(f"  {label:28} {best * 1000:8.1f} ms CPU  {records:7d} records carried")
    ratio = min(s for s, _ in results[False]) / max(min(s for s, _ in results[True]), 1e-9)
    print(f"  a pull with the summary costs 1/{ratio:.0f} of a whole one")
    net.close()


if __name__ == "__main__":
    main()

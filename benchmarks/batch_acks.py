"""What a batch of acks costs: one ``POST /ack`` worth of ids acked on a
node that holds copies of them, against the same acks on a standalone
node, in one process, over the tests' in-memory AMP links (no HTTP, no
sockets: the Python work of the ack path alone).

Each round pushes ``--batch`` messages of 100 bytes to node a (one batch,
so the copies on b and c are kept as a packed run), takes them on a, and
acks them on b, as a load balancer sends a worker's ack to any node: b
checks each id, drops its copies, sends the tombstones to a and c, and a
takes the messages out of its queue and confirms.  The standalone node
does the same push, take and ack alone.  The time of the ack and of
everything it sets off (until the links are quiet) is taken per round;
the report gives microseconds per id at the 20th percentile of the
rounds, in ``--repeats`` alternating passes, and their ratio.

    venv/bin/python benchmarks/batch_acks.py [--rounds R] [--batch N] [--repeats K]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/

from dqid.node import PushItem  # noqa: E402
from tests.amp_harness import Net  # noqa: E402
from tests.helpers import successResultOf  # noqa: E402


def settled(net: Net, result):
    """The value of a call that may answer at once or with a Deferred."""
    net.settle()
    return successResultOf(result) if hasattr(result, "addCallback") else result


def ack_rounds(net: Net, owner: str, acker: str, rounds: int, batch: int) -> float:
    """Microseconds per id of ``rounds`` batch acks on ``acker`` of
    ``owner``'s messages (the 20th percentile of the rounds)."""
    spent = []
    for _ in range(rounds):
        settled(net, net[owner].node.push_many([PushItem(b"x" * 100)] * batch))
        ids = [m.id for m in settled(net, net[owner].node.get(count=batch, visibility=60.0))]
        started = time.perf_counter()
        acked = net[acker].node.ack_many(ids)
        net.settle()
        spent.append(time.perf_counter() - started)
        if successResultOf(acked) != [True] * batch:
            raise RuntimeError("a batch of acks was not all acked")
    spent.sort()
    return spent[len(spent) // 5] / batch * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cluster = Net(["a", "b", "c"], 3, size=args.batch * 10)
    cluster.start_all()
    cluster.advance(1.0)
    standalone = Net(["s"], 1, size=args.batch * 10)
    standalone.start_all()
    print(f"batch acks: {args.batch} ids per batch, {args.rounds} rounds per pass; "
          f"us per id (20th percentile of the rounds)")
    for _ in range(args.repeats):
        replica = ack_rounds(cluster, "a", "b", args.rounds, args.batch)
        alone = ack_rounds(standalone, "s", "s", args.rounds, args.batch)
        print(f"  on a replica (3 nodes) {replica:6.2f}   standalone {alone:6.2f}   "
              f"ratio {replica / alone:5.2f}", flush=True)
    cluster.close()
    standalone.close()


if __name__ == "__main__":
    main()

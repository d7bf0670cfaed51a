"""What a batch push costs to encode (owner) and to check (replica), per
record: a packed run (protocol 4) against records (protocol 3), measured
in one process, best of several rounds.

    venv/bin/python benchmarks/encodings.py [--records N] [--size BYTES]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

from dqid.batch_encoding import packed_run
from dqid.ids import format_id
from dqid.queue import WorkQueue
from dqid.wire import decode_run, encode_records, scan_run


def best_us_per_record(work: Callable[[], object], records: int, rounds: int) -> float:
    """The fastest of ``rounds`` timings of ``work``, in µs per record."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best / records * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1000, help="records per batch")
    parser.add_argument("--size", type=int, default=100, help="body bytes")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    queue = WorkQueue(args.records)
    messages = [queue.reserve(format_id("n1", 123456, seq), b"x" * args.size)
                for seq in range(5000, 5000 + args.records)]
    packed = packed_run(messages)
    records = encode_records(messages)
    assert packed is not None and scan_run(records) is not None
    n, rounds = args.records, args.rounds
    rows = [
        ("owner: encode", best_us_per_record(lambda: encode_records(messages), n, rounds),
         best_us_per_record(lambda: packed_run(messages), n, rounds)),
        ("replica: check and keep", best_us_per_record(lambda: scan_run(records), n, rounds),
         best_us_per_record(lambda: decode_run(packed), n, rounds)),
    ]
    print(f"{n} records of {args.size} B, best of {rounds} rounds, µs per record")
    print(f"{'':26}{'records (v3)':>14}{'packed (v4)':>14}{'ratio':>8}")
    for name, old, new in rows:
        print(f"{name:26}{old:14.3f}{new:14.3f}{old / new:7.1f}x")
    print(f"bytes per record on the wire: {len(records) / n:.1f} (records), "
          f"{len(packed) / n:.1f} (packed)")


if __name__ == "__main__":
    main()

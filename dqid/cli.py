"""The ``dqid`` console script: ``twistd -n dqid`` without a pidfile."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from twisted.scripts import twistd

    args = sys.argv[1:] if argv is None else argv
    sys.argv = ["dqid", "--nodaemon", "--pidfile=", "dqid", *args]
    twistd.run()


if __name__ == "__main__":
    main()

"""Errors of the queue service that both the node and the cluster raise,
and the web layer translates (so neither has to import the other)."""

from __future__ import annotations


class NotReady(Exception):
    """The node cannot take writes now (starting, recovering, fenced,
    stopping, or too few holders reachable)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotReplicated(Exception):
    """Not enough copies of a push could be made in time."""

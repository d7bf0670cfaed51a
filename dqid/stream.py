"""Numbers and acknowledgements of the replication stream (pure).

An owner sends what a turn changed to each peer as one ``Stream`` box that
needs no answer; a box that carries records (or acks the peer must
confirm) gets the next number of its link (1, 2, ...).  The peer says
``Copied(upto)`` once it holds everything numbered up to ``upto`` on that
link (on disk, with ``--data-dir``): a cumulative acknowledgement, never for
a number before the ones below it are settled.  A link that goes down
settles nothing more: what waited on it counts as not held (a new link
numbers from 1 again).

Boxes without a number (an owner's own tombstones, states) are not
acknowledged one by one, but a link keeps its order: a ``Copied`` for a
number given after such a box shows that the box arrived too.  What a box
carried that must reach the peer (tombstones: a withdrawn push must stay
withdrawn) is kept until then, and handed back if the link is lost first,
to go again on another link.

:class:`Unanswered` is the owner's side of one link (with
:class:`Unconfirmed`), :class:`Acknowledger` the peer's.  None knows a
reactor: times are passed in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .wire import WireError

T = TypeVar("T")


@dataclass(eq=False)
class Unanswered(Generic[T]):
    """The numbered boxes sent on one link (the sender keeps one per link)
    and not acknowledged yet, oldest first; each carries what settles when
    it is (``item``)."""

    numbered: int = 0  # the last number given on this link
    numbered_at: float = float("-inf")  # when it was given (or the link came)
    _waiting: deque[tuple[int, float, T]] = field(default_factory=deque)

    def __len__(self) -> int:
        return len(self._waiting)

    def send(self, item: T, now: float) -> int:
        """Number the next box, which settles ``item``."""
        self.numbered += 1
        self.numbered_at = now
        self._waiting.append((self.numbered, now, item))
        return self.numbered

    def acknowledged(self, upto: int) -> list[T]:
        """The items of every box numbered up to ``upto`` still waiting
        (none for a number already settled or never given)."""
        settled = []
        waiting = self._waiting
        while waiting and waiting[0][0] <= upto:
            settled.append(waiting.popleft()[2])
        return settled

    def oldest_sent(self) -> float | None:
        return self._waiting[0][1] if self._waiting else None

    def drop_all(self) -> list[T]:
        """Every waiting item (the link failed or stalled); numbering goes
        on, so a late acknowledgement settles nothing twice."""
        items = [item for _, _, item in self._waiting]
        self._waiting.clear()
        return items


@dataclass(eq=False)
class Unconfirmed(Generic[T]):
    """What boxes sent on one link carried that must reach the peer, kept
    until the link acknowledges a number given with or after their box."""

    _kept: deque[tuple[int, T]] = field(default_factory=deque)

    def __len__(self) -> int:
        return len(self._kept)

    def keep(self, item: T, confirmed_by: int) -> None:
        """``item`` went in a box that an acknowledgement of
        ``confirmed_by`` (or above) shows arrived: its own number, or for a
        box without one, the next number the link gives."""
        self._kept.append((confirmed_by, item))

    def acknowledged(self, upto: int) -> None:
        """The peer acknowledged every number up to ``upto``."""
        kept = self._kept
        while kept and kept[0][0] <= upto:
            kept.popleft()

    def take_all(self) -> list[T]:
        """Every item not shown to have arrived (the link is lost)."""
        items = [item for _, item in self._kept]
        self._kept.clear()
        return items


@dataclass(eq=False, slots=True)
class Received:
    """One numbered box a peer received: settled once its records are held
    (or refused)."""

    number: int
    settled: bool = False
    holder: bool = False  # counts as a copy (the peer serves)
    refused: str | None = None  # an error code: the records were not taken


@dataclass(eq=False)
class Acknowledger:
    """The peer's side of one link: numbers received, and the cumulative
    acknowledgements that may be said now."""

    received: int = 0  # the last number received
    _open: deque[Received] = field(default_factory=deque)

    def receive(self, number: int) -> Received:
        """A box numbered ``number`` arrived: it must follow the last one."""
        if number <= self.received:
            raise WireError(f"stream number {number} after {self.received}")
        self.received = number
        entry = Received(number)
        self._open.append(entry)
        return entry

    @staticmethod
    def settle(entry: Received, holder: bool, refused: str | None = None) -> None:
        entry.settled = True
        entry.holder = holder and refused is None
        entry.refused = refused

    def due(self) -> list[tuple[int, bool, str | None]]:
        """The acknowledgements to say now, in order, as ``(upto, holder,
        refused)``: one per run of settled boxes alike, stopping at the
        first box not settled."""
        said: list[tuple[int, bool, str | None]] = []
        opened = self._open
        while opened and opened[0].settled:
            entry = opened.popleft()
            if said and said[-1][1:] == (entry.holder, entry.refused):
                said[-1] = (entry.number, entry.holder, entry.refused)
            else:
                said.append((entry.number, entry.holder, entry.refused))
        return said

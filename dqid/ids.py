"""Node ids and message ids.

A message id is ``NODE.EPOCH.SEQ`` with EPOCH and SEQ in base 36.  It names
its owner node, and the epoch (bumped by every start of that node id) makes
sure no id is ever minted twice, not even by a replacement node.  Every
character is URL-safe, so an id goes into a path as it is.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import NamedTuple, Sequence

NODE_ID_RE = re.compile(r"\A[A-Za-z0-9_-]{1,64}\Z")
_B36_RE = re.compile(r"\A[0-9a-z]{1,13}\Z")
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def is_valid_node_id(node_id: str) -> bool:
    return NODE_ID_RE.match(node_id) is not None


def node_id_from_hostname(hostname: str) -> str:
    """The default node id: the host name cut to the allowed characters."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "-", hostname.split(".")[0])[:64]
    return cleaned.strip("-") or "dqid"


_PAIRS = [a + b for a in _DIGITS for b in _DIGITS]  # every two-digit group


def to_base36(number: int) -> str:
    if number < 36:
        if number < 0:
            raise ValueError("negative number")
        return _DIGITS[number]
    groups = []
    while number >= 1296:
        number, rest = divmod(number, 1296)
        groups.append(_PAIRS[rest])
    groups.append(_PAIRS[number] if number >= 36 else _DIGITS[number])
    return "".join(reversed(groups))


# to_base36(n) for every n below 36 ** 2.
_SMALL = list(_DIGITS) + _PAIRS[36:]


def consecutive_ids(prefix: str, first: int, count: int) -> list[str]:
    """``prefix + to_base36(seq)`` for the ``count`` seqs from ``first``,
    a block of 1296 at a time (the last two digits from a table)."""
    ids: list[str] = []
    seq, end = first, first + count
    while seq < end:
        high, low = divmod(seq, 1296)
        stop = min(end, (high + 1) * 1296)
        if high:
            head = prefix + to_base36(high)
            ids += [head + pair for pair in _PAIRS[low:stop - high * 1296]]
        else:
            ids += [prefix + digits for digits in _SMALL[low:stop]]
        seq = stop
    return ids


class MessageId(NamedTuple):
    node: str
    epoch: int
    seq: int

    def __str__(self) -> str:
        return f"{self.node}.{to_base36(self.epoch)}.{to_base36(self.seq)}"


def format_id(node: str, epoch: int, seq: int) -> str:
    return f"{node}.{to_base36(epoch)}.{to_base36(seq)}"


def id_prefix(node: str, epoch: int) -> str:
    """``NODE.EPOCH.``: what every id ``node`` mints in ``epoch`` starts
    with (an id is its prefix and its seq in base 36)."""
    return f"{node}.{to_base36(epoch)}."


# NODE.EPOCH.SEQ, EPOCH and SEQ with one spelling each: no leading zeros, so
# copies of an id never diverge.
_ID_RE = re.compile(
    r"\A([A-Za-z0-9_-]{1,64})\.(0|[1-9a-z][0-9a-z]{0,12})\.(0|[1-9a-z][0-9a-z]{0,12})\Z"
)


@lru_cache(maxsize=4096)
def parse_id(text: str) -> MessageId:
    """Split a message id; ValueError if it is not one dqid could mint.

    Cached (recent ids): one ack or state change reads its id in several
    layers, one after the other, and a Stream box's states (a few batches'
    worth) are read before they are applied."""
    match = _ID_RE.match(text)
    if match is None:
        raise ValueError(f"not a dqid message id: {text!r}")
    node, epoch, seq = match.groups()
    return MessageId(node, int(epoch, 36), int(seq, 36))


# An id cut at its last dot: NODE.EPOCH, and SEQ (as in _ID_RE).
_HEAD_RE = re.compile(r"\A([A-Za-z0-9_-]{1,64})\.(0|[1-9a-z][0-9a-z]{0,12})\Z")
_SEQ_RE = re.compile(r"\A(?:0|[1-9a-z][0-9a-z]{0,12})\Z")


def parse_ids(texts: Sequence[str]) -> list[MessageId | None]:
    """:func:`parse_id` for a batch (an ack's ids), None for a text that is
    not an id.  The ids of one owner and epoch share their ``NODE.EPOCH``
    head, which is read once."""
    heads: dict[str, tuple[str, int] | None] = {}
    parsed: list[MessageId | None] = []
    for text in texts:
        head_text, _, seq = text.rpartition(".")
        if head_text in heads:
            head = heads[head_text]
        else:
            match = _HEAD_RE.match(head_text)
            head = heads[head_text] = (
                None if match is None else (match[1], int(match[2], 36)))
        if head is None or _SEQ_RE.match(seq) is None:
            parsed.append(None)
        else:
            parsed.append(MessageId(head[0], head[1], int(seq, 36)))
    return parsed

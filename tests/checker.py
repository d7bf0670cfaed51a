"""A total-queue checker in the manner of Jepsen's, for fault-injection runs.

The harness records what producers and workers saw; ``report()`` then says
what the queue did with every token.  Pure bookkeeping: no I/O, and safe to
call from several threads.

Each push carries a unique token in its body.  A producer calls
``attempt(token)`` before sending and ``pushed(token, outcome, id)`` after;
a retry with the same Idempotency-Key is another attempt of the same token,
and the token's outcome is the best one seen: ok > indeterminate > refused.
An attempt whose answer was never recorded counts as indeterminate.  Workers
call ``delivered`` for every delivery (redeliveries too) and ``acked`` for
every ack.  Message ids are taken for the harness's convenience; the
verdict is by token, since a redelivery or a retry keeps the token.

A token whose message ends *held* (poison, set aside after
``--max-deliveries``) is recorded with ``held``: it counts as neither lost
nor delivered, since the queue kept it for a person to decide.

Verdict (``Report.ok()``): no token acknowledged (ok) to a producer is lost,
nothing that was never attempted comes out, and nothing whose only answers
were definite refusals comes out.  Duplicates are allowed (at-least-once)
and are only counted, as are recovered indeterminate pushes and deliveries
that were never acked.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

OUTCOMES = ("refused", "indeterminate", "ok")  # worst to best
_RANK = {outcome: rank for rank, outcome in enumerate(OUTCOMES)}


@dataclass
class Report:
    attempted: int = 0          # distinct tokens attempted
    acknowledged: int = 0       # best outcome "ok"
    refused: int = 0            # best outcome "refused"
    indeterminate: int = 0      # best outcome "indeterminate" (or none recorded)
    delivered_unique: int = 0   # distinct tokens delivered at least once
    deliveries: int = 0         # every delivery, redeliveries included
    lost: int = 0               # acknowledged but never delivered
    unexpected: int = 0         # delivered but never attempted
    refused_delivered: int = 0  # delivered though every answer was a refusal
    duplicated: int = 0         # tokens delivered more than once
    queued_twice: int = 0       # tokens delivered under two or more ids
    recovered: int = 0          # indeterminate and delivered
    not_acked: int = 0          # delivered but never acked
    held: int = 0               # ended held: neither lost nor delivered
    lost_tokens: list[str] = field(default_factory=list)
    unexpected_tokens: list[str] = field(default_factory=list)
    refused_delivered_tokens: list[str] = field(default_factory=list)
    queued_twice_tokens: list[str] = field(default_factory=list)  # "token: id id ..."
    lost_answers: list[str] = field(default_factory=list)  # "token: the ids answered"

    def ok(self) -> bool:
        return self.lost == 0 and self.unexpected == 0 and self.refused_delivered == 0

    def summary(self) -> str:
        figures = " ".join(
            f"{name}={getattr(self, name)}"
            for name in (
                "attempted", "acknowledged", "refused", "indeterminate",
                "delivered_unique", "deliveries", "lost", "unexpected",
                "refused_delivered", "duplicated", "queued_twice", "recovered",
                "not_acked", "held",
            )
        )
        examples = ""
        for name in ("lost", "unexpected", "refused_delivered"):
            tokens = getattr(self, f"{name}_tokens")
            if tokens:
                more = f",+{len(tokens) - 5}" if len(tokens) > 5 else ""
                examples += f" {name}_tokens={','.join(tokens[:5])}{more}"
        return figures + examples

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok()}


class QueueChecker:
    """Records a history of pushes and deliveries; ``report()`` judges it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outcome: dict[str, str | None] = {}  # attempted token -> best outcome
        self._deliveries: Counter[str] = Counter()
        self._ids: dict[str, set[str]] = {}
        self._answered: dict[str, set[str]] = {}  # the ids pushes were answered with
        self._acked: set[str] = set()
        self._held: set[str] = set()

    def attempt(self, token: str) -> None:
        """A push of the body carrying ``token`` is about to be sent."""
        with self._lock:
            self._outcome.setdefault(token, None)

    def pushed(self, token: str, outcome: str, message_id: str | None = None) -> None:
        """The answer to one attempt: "ok" (201/200 with an id), "refused"
        (a definite refusal was answered) or "indeterminate" (timeout,
        connection error, 5xx from a proxy: may or may not be queued)."""
        if outcome not in _RANK:
            raise ValueError(f"outcome must be one of {OUTCOMES}, not {outcome!r}")
        with self._lock:
            if token not in self._outcome:
                raise ValueError(f"pushed() before attempt() for token {token!r}")
            best = self._outcome[token]
            if best is None or _RANK[outcome] > _RANK[best]:
                self._outcome[token] = outcome
            if message_id is not None:
                self._answered.setdefault(token, set()).add(message_id)

    def delivered(self, token: str, message_id: str) -> None:
        """A worker got the message carrying ``token`` (every delivery)."""
        with self._lock:
            self._deliveries[token] += 1
            self._ids.setdefault(token, set()).add(message_id)

    def acked(self, token: str, message_id: str) -> None:
        """A worker acked the message carrying ``token``."""
        with self._lock:
            self._acked.add(token)

    def outcomes(self) -> dict[str, str]:
        """Each attempted token's best outcome so far."""
        with self._lock:
            return {t: o or "indeterminate" for t, o in self._outcome.items()}

    def deliveries_by_token(self) -> dict[str, int]:
        """How often each token was delivered so far."""
        with self._lock:
            return dict(self._deliveries)

    def held(self, token: str) -> None:
        """The message carrying ``token`` was found held at the end."""
        with self._lock:
            self._held.add(token)

    def report(self) -> Report:
        with self._lock:
            outcome = {t: o or "indeterminate" for t, o in self._outcome.items()}
            held = set(self._held)
            deliveries = {t: n for t, n in self._deliveries.items() if t not in held}
            acked = set(self._acked)
            ids = {t: sorted(i) for t, i in self._ids.items()}
        best = Counter(outcome.values())
        report = Report(
            attempted=len(outcome),
            acknowledged=best["ok"],
            refused=best["refused"],
            indeterminate=best["indeterminate"],
            delivered_unique=len(deliveries),
            deliveries=sum(deliveries.values()),
            duplicated=sum(1 for n in deliveries.values() if n > 1),
            queued_twice_tokens=[f"{t}: {' '.join(i)}" for t, i in sorted(ids.items())
                                 if len(i) > 1],
            recovered=sum(1 for t in deliveries if outcome.get(t) == "indeterminate"),
            not_acked=sum(1 for t in deliveries if t not in acked),
            held=len(held),
            lost_tokens=sorted(t for t, o in outcome.items()
                               if o == "ok" and t not in deliveries and t not in held),
            unexpected_tokens=sorted(t for t in {*deliveries, *held} if t not in outcome),
            refused_delivered_tokens=sorted(t for t in deliveries if outcome.get(t) == "refused"),
        )
        report.lost = len(report.lost_tokens)
        with self._lock:
            report.lost_answers = [f"{t}: {' '.join(sorted(self._answered.get(t, ())))}"
                                   for t in report.lost_tokens]
        report.unexpected = len(report.unexpected_tokens)
        report.refused_delivered = len(report.refused_delivered_tokens)
        report.queued_twice = len(report.queued_twice_tokens)
        return report

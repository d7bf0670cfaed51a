"""The total-queue checker: hand-written histories and random ones."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .checker import QueueChecker, Report


def push(checker: QueueChecker, token: str, *outcomes: str) -> None:
    for outcome in outcomes:
        checker.attempt(token)
        checker.pushed(token, outcome, f"id-{token}" if outcome == "ok" else None)


def deliver(checker: QueueChecker, token: str, times: int = 1, ack: bool = True) -> None:
    for _ in range(times):
        checker.delivered(token, f"id-{token}")
    if ack:
        checker.acked(token, f"id-{token}")


def test_empty_history() -> None:
    report = QueueChecker().report()
    assert report == Report()
    assert report.ok()


def test_clean_run() -> None:
    checker = QueueChecker()
    for token in "abc":
        push(checker, token, "ok")
        deliver(checker, token)
    report = checker.report()
    assert report.ok()
    assert (report.attempted, report.acknowledged, report.delivered_unique, report.deliveries) == (3, 3, 3, 3)
    assert (report.lost, report.duplicated, report.not_acked) == (0, 0, 0)


def test_acknowledged_but_never_delivered_is_lost() -> None:
    checker = QueueChecker()
    push(checker, "a", "ok")
    push(checker, "b", "ok")
    deliver(checker, "b")
    report = checker.report()
    assert not report.ok()
    assert report.lost == 1 and report.lost_tokens == ["a"]


def test_refused_or_indeterminate_and_not_delivered_is_fine() -> None:
    checker = QueueChecker()
    push(checker, "r", "refused")
    push(checker, "i", "indeterminate")
    report = checker.report()
    assert report.ok()
    assert (report.refused, report.indeterminate, report.lost) == (1, 1, 0)


def test_delivered_but_never_attempted_is_unexpected() -> None:
    checker = QueueChecker()
    deliver(checker, "ghost")
    report = checker.report()
    assert not report.ok()
    assert report.unexpected == 1 and report.unexpected_tokens == ["ghost"]
    assert report.delivered_unique == 1 and report.attempted == 0


def test_delivered_though_refused() -> None:
    checker = QueueChecker()
    push(checker, "r", "refused", "refused")
    deliver(checker, "r")
    report = checker.report()
    assert not report.ok()
    assert report.refused_delivered == 1 and report.refused_delivered_tokens == ["r"]
    assert report.unexpected == 0


def test_best_outcome_of_retries_wins() -> None:
    checker = QueueChecker()
    push(checker, "a", "indeterminate", "refused", "ok", "indeterminate")  # ok
    push(checker, "b", "refused", "indeterminate")  # indeterminate
    push(checker, "c", "refused", "refused")  # refused
    deliver(checker, "a")
    deliver(checker, "b")  # a retry that was refused, but an earlier try got in
    report = checker.report()
    assert report.ok()
    assert (report.attempted, report.acknowledged, report.indeterminate, report.refused) == (3, 1, 1, 1)
    assert report.recovered == 1 and report.refused_delivered == 0


def test_attempt_without_answer_counts_as_indeterminate() -> None:
    checker = QueueChecker()
    checker.attempt("a")
    checker.attempt("b")
    deliver(checker, "b")  # a delivery may even come before the 201
    report = checker.report()
    assert report.ok()
    assert (report.indeterminate, report.recovered, report.lost) == (2, 1, 0)


def test_duplicates_and_unacked_are_counted_not_failed() -> None:
    checker = QueueChecker()
    push(checker, "a", "ok")
    push(checker, "b", "ok")
    deliver(checker, "a", times=3)
    deliver(checker, "b", ack=False)
    report = checker.report()
    assert report.ok()
    assert (report.duplicated, report.deliveries, report.delivered_unique, report.not_acked) == (1, 4, 2, 1)


def test_bad_calls_are_refused() -> None:
    checker = QueueChecker()
    with pytest.raises(ValueError):
        checker.pushed("a", "ok", "id")  # no attempt first
    checker.attempt("a")
    with pytest.raises(ValueError):
        checker.pushed("a", "maybe")


def test_summary_and_as_dict() -> None:
    checker = QueueChecker()
    push(checker, "a", "ok")
    push(checker, "b", "indeterminate")
    deliver(checker, "b", times=2)
    report = checker.report()
    line = report.summary()
    assert "\n" not in line
    assert line.startswith("attempted=2 acknowledged=1 ")
    for figure in ("lost=1", "unexpected=0", "refused_delivered=0", "duplicated=1",
                   "recovered=1", "not_acked=0", "lost_tokens=a"):
        assert figure in line.split(), line
    data = report.as_dict()
    assert data["lost_tokens"] == ["a"] and data["ok"] is False
    json.dumps(data)


def test_summary_cuts_long_token_lists() -> None:
    checker = QueueChecker()
    for n in range(8):
        push(checker, f"t{n}", "ok")
    assert "lost_tokens=t0,t1,t2,t3,t4,+3" in checker.report().summary()


# ---------------------------------------------------------------------------
# Random histories from a model: each token's fate is drawn, the calls are
# interleaved at random, and the report must match what the model implies.


@dataclass
class Fate:
    token: str
    attempts: list[str | None]  # outcome per attempt; None = never answered
    deliveries: int
    acked: bool


OUTCOME = st.sampled_from(["ok", "refused", "indeterminate", None])


@st.composite
def fates(draw) -> list[Fate]:
    count = draw(st.integers(0, 25))
    return [
        Fate(
            token=f"tok-{n}",
            attempts=draw(st.lists(OUTCOME, max_size=4)),
            deliveries=draw(st.integers(0, 3)),
            acked=draw(st.booleans()),
        )
        for n in range(count)
    ]


def calls(fate: Fate) -> list[list[tuple]]:
    """Independent tracks of calls; each keeps its own order."""
    pushes = []
    for outcome in fate.attempts:
        pushes.append(("attempt", fate.token))
        if outcome is not None:
            message_id = f"id-{fate.token}" if outcome == "ok" else None
            pushes.append(("pushed", fate.token, outcome, message_id))
    worker = []
    for n in range(fate.deliveries):
        worker.append(("delivered", fate.token, f"id-{fate.token}"))
        if fate.acked and n == fate.deliveries - 1:
            worker.append(("acked", fate.token, f"id-{fate.token}"))
    return [pushes, worker]


def expected(fates: list[Fate]) -> dict:
    rank = {"refused": 0, "indeterminate": 1, "ok": 2}

    def best(fate: Fate) -> str:
        answered = [o for o in fate.attempts if o is not None]
        return max(answered, key=rank.__getitem__) if answered else "indeterminate"

    tried = [f for f in fates if f.attempts]
    seen = [f for f in fates if f.deliveries]
    return {
        "attempted": len(tried),
        "acknowledged": sum(best(f) == "ok" for f in tried),
        "refused": sum(best(f) == "refused" for f in tried),
        "indeterminate": sum(best(f) == "indeterminate" for f in tried),
        "delivered_unique": len(seen),
        "deliveries": sum(f.deliveries for f in fates),
        "lost_tokens": sorted(f.token for f in tried if best(f) == "ok" and not f.deliveries),
        "unexpected_tokens": sorted(f.token for f in seen if not f.attempts),
        "refused_delivered_tokens": sorted(f.token for f in seen if f.attempts and best(f) == "refused"),
        "duplicated": sum(f.deliveries > 1 for f in fates),
        "recovered": sum(1 for f in seen if f.attempts and best(f) == "indeterminate"),
        "not_acked": sum(1 for f in seen if not f.acked),
    }


@settings(max_examples=300, deadline=None)
@given(fates(), st.randoms(use_true_random=False))
def test_report_matches_the_model(fates: list[Fate], rnd: random.Random) -> None:
    tracks = [track for fate in fates for track in calls(fate) if track]
    checker = QueueChecker()
    while tracks:  # a random interleaving that keeps each track's order
        track = rnd.choice(tracks)
        name, *args = track.pop(0)
        getattr(checker, name)(*args)
        if not track:
            tracks.remove(track)

    report = checker.report()
    want = expected(fates)
    got = report.as_dict()
    assert {key: got[key] for key in want} == want
    assert report.lost == len(want["lost_tokens"])
    assert report.unexpected == len(want["unexpected_tokens"])
    assert report.refused_delivered == len(want["refused_delivered_tokens"])
    assert report.ok() == (not want["lost_tokens"] and not want["unexpected_tokens"]
                           and not want["refused_delivered_tokens"])
    assert report.attempted == report.acknowledged + report.refused + report.indeterminate


def test_a_token_delivered_under_two_ids_counts_as_queued_twice() -> None:
    checker = QueueChecker()
    checker.attempt("t")
    checker.pushed("t", "indeterminate")
    checker.attempt("t")
    checker.pushed("t", "ok", "a.1.1")
    checker.delivered("t", "a.1.1")
    checker.delivered("t", "b.1.1")  # the first attempt was queued too
    checker.delivered("t", "b.1.1")
    report = checker.report()
    assert (report.duplicated, report.queued_twice, report.lost) == (1, 1, 0)


def test_a_held_message_is_neither_lost_nor_delivered() -> None:
    checker = QueueChecker()
    push(checker, "poison", "ok")
    deliver(checker, "poison", times=2, ack=False)  # nacked twice, then held
    push(checker, "kept", "ok")  # held without a delivery seen (crashed workers)
    push(checker, "fine", "ok")
    deliver(checker, "fine")
    checker.held("poison")
    checker.held("kept")
    report = checker.report()
    assert report.ok(), report.summary()
    assert (report.held, report.lost, report.delivered_unique) == (2, 0, 1)
    assert "held=2" in report.summary().split()


def test_a_held_token_that_was_never_pushed_is_unexpected() -> None:
    checker = QueueChecker()
    checker.held("ghost")
    report = checker.report()
    assert report.unexpected_tokens == ["ghost"] and not report.ok()

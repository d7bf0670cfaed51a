"""Small helpers for driving Deferreds without a reactor (like trial's
``successResultOf``), shared by the unit tests."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure


def _outcome(d: Deferred) -> list[Any]:
    """What ``d`` fired with, in a list (empty if it has not fired).

    Like trial, this consumes the result: a Failure is reported here, not
    logged later as unhandled.
    """
    box: list[Any] = []
    d.addBoth(box.append)
    return box


def successResultOf(d: Deferred) -> Any:
    """The result of ``d``, which must have fired successfully already."""
    box = _outcome(d)
    if not box:
        raise AssertionError(f"{d!r} has not fired yet")
    result = box[0]
    if isinstance(result, Failure):
        raise AssertionError(
            f"{d!r} failed instead of succeeding:\n{result.getTraceback()}"
        )
    return result


def failureResultOf(d: Deferred, *types: type[BaseException]) -> Failure:
    """The Failure of ``d``, which must have failed already (with ``types``)."""
    box = _outcome(d)
    if not box:
        raise AssertionError(f"{d!r} has not fired yet")
    result = box[0]
    if not isinstance(result, Failure):
        raise AssertionError(f"{d!r} succeeded with {result!r} instead of failing")
    if types and not result.check(*types):
        raise AssertionError(
            f"{d!r} failed with {result.type!r}, not one of {types!r}:\n"
            f"{result.getTraceback()}"
        )
    return result


def assertNoResult(d: Deferred) -> None:
    """``d`` has not fired yet (and this check does not change that)."""
    box: list[Any] = []

    def keep(result: Any) -> Any:
        box.append(result)
        return result

    d.addBoth(keep)
    if box:
        result = box[0]
        if isinstance(result, Failure):
            d.addErrback(lambda f: None)
        raise AssertionError(f"{d!r} has already fired with {result!r}")

"""Trial's checks for Deferreds that need no reactor, for plain pytest tests.

``successResultOf``, ``failureResultOf`` and ``assertNoResult`` are the
methods of one :class:`twisted.trial.unittest.SynchronousTestCase`, used as
functions: a failed check raises trial's ``FailTest`` (an AssertionError),
which pytest reports like any failed assert.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

_trial = SynchronousTestCase()

successResultOf = _trial.successResultOf
failureResultOf = _trial.failureResultOf
assertNoResult = _trial.assertNoResult

__all__ = ["assertNoResult", "failureResultOf", "successResultOf"]

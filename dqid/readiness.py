"""Whether a node may take writes: one state, owned by the node.

Glossary (one word per idea):

* **serving** — the node's phase is ``SERVING``: it recovered (or never had
  to), is not fenced, counts as a holder of copies and delivers its queue.
* **ready** (readiness) — it may take writes now: serving, not stopping, and
  enough holders reachable for ``--min-copies``.  ``/ready`` shows it.
  (``ready`` as a *number* is the count of messages that may be delivered;
  the code calls that ``ready_count`` where both meet.)
* **reason** — why it is not ready, the text ``/ready`` and 503s carry.
"""

from __future__ import annotations

from enum import Enum
from typing import Callable


class Phase(Enum):
    RECOVERING = "recovering"  # merging its state from peers; holds nothing yet
    SERVING = "serving"
    FENCED = "fenced"  # a newer incarnation of its id serves; it serves nothing
    FAILED = "failed"  # its data directory failed: it takes no more writes


class Readiness:
    """The phase of a node, whether it is stopping, and the check of
    reachable holders that a cluster adds."""

    def __init__(self, phase: Phase = Phase.SERVING, detail: str = "") -> None:
        self.phase = phase
        self.detail = detail  # why, while RECOVERING or FENCED
        self.stopping = False
        # A cluster's check: why too few holders are reachable, or None.
        self.holders_check: Callable[[], str | None] | None = None

    @property
    def serving(self) -> bool:
        return self.phase is Phase.SERVING

    @property
    def fenced(self) -> bool:
        return self.phase is Phase.FENCED

    def set(self, phase: Phase, detail: str = "") -> None:
        self.phase = phase
        self.detail = detail

    def refusal(self) -> str | None:
        """Why the node's own state refuses writes (None: it does not)."""
        if self.stopping:
            return "shutting_down"
        if self.phase is not Phase.SERVING:
            return self.detail or self.phase.value
        return None

    def reason(self) -> str | None:
        """Why the node is not ready (None: it is)."""
        refusal = self.refusal()
        if refusal is not None or self.holders_check is None:
            return refusal
        return self.holders_check()

"""Everything one benchmark run found: phase results, recovery, RSS (per
queued message and per replica copy), and the problems and notes said
along the way (printed as they come)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Findings:
    results: list[dict] = field(default_factory=list)  # one per target and phase
    recovery: dict | None = None
    disk_recovery: dict | None = None  # a standalone node replaying its --data-dir
    rss: list[dict] = field(default_factory=list)  # one per body size
    replica_rss: dict | None = None  # peers b and c of a cluster holding a's messages
    problems: list[str] = field(default_factory=list)
    remarks: list[str] = field(default_factory=list)
    interrupted: bool = False

    def note(self, text: str) -> None:
        """A problem: an error, a wrong count, a hang, a traceback."""
        self.problems.append(text)
        print(f"  !! {text}", flush=True)

    def remark(self, text: str) -> None:
        """Worth knowing, not a fault (a phase cut short by the time budget)."""
        self.remarks.append(text)
        print(f"  -- {text}", flush=True)

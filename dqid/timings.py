"""Every timing constant of a node, in one record passed in.

Production uses :data:`DEFAULT_TIMINGS`; tests build a smaller one with
``dataclasses.replace`` instead of patching module globals.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Timings:
    # Links: a heartbeat each way this often; a peer silent this long is down.
    heartbeat_interval: float = 0.25
    dead_after: float = 1.0
    # Any call to a peer that has no timeout of its own.
    call_timeout: float = 5.0
    # A push whose copies are not made within this is withdrawn (503).
    replication_timeout: float = 5.0
    # Delivery counts, held states and due times go to the peers half this
    # to this long after they change (none for a message acked by then).
    states_linger: float = 0.05
    # Anti-entropy: each peer's whole state is pulled again this often.
    anti_entropy_interval: float = 10.0
    # A sync that failed is tried again after this.
    resync_delay: float = 1.0
    # A state-transfer session nobody pages through is dropped after this.
    sync_session_idle: float = 60.0
    # A recovering node waits up to this long for every peer to sync.
    recovery_grace: float = 2.0
    # A fenced node keeps its links this long to send its last tombstones.
    fence_linger: float = 0.5
    # Reconnecting to a peer: first delay, cap; dialling gives up after.
    reconnect_initial: float = 0.1
    reconnect_max: float = 2.0
    dial_timeout: float = 2.0
    # An Idempotency-Key is remembered this long after its message's ack.
    idempotency_window: float = 300.0
    # After SIGTERM, how long answered long polls get to flush.
    shutdown_grace: float = 0.2
    # GET /cluster: a peer that has not answered NodeStats by then is down.
    cluster_stats_timeout: float = 1.0


DEFAULT_TIMINGS = Timings()

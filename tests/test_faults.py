"""Fault scenarios: a real 3-node cluster under a producer/consumer workload,
real faults (kill -9, SIGSTOP, cut peer links, rolling restarts), and a
checker that counts every message (tests/checker.py).

Each scenario is seeded (``seed``, 1 in CI; ``--seeds N`` or ``--soak`` for
more), bounded in messages and time, and cleans up its processes by PID.
The checker's figures are printed at the end of the run (and as each
scenario ends with ``-s``).
"""

from __future__ import annotations

import itertools
import json
import random
import signal
import threading
import time

import pytest

from .checker import Report
from .cluster import LocalCluster
from .conftest import FAULT_FIGURES, require_tool
from .workload import Workload, WorkloadConfig

pytestmark = pytest.mark.process


def workload_for(cluster: LocalCluster, seed: int, soak: bool, **overrides) -> Workload:
    config = WorkloadConfig(**{"seed": seed, "messages": 600 if soak else 150,
                               "max_seconds": 120 if soak else 60, **overrides})
    return Workload(cluster.http_ports(), config)


def agree(cluster: LocalCluster) -> dict[str, dict[str, int]]:
    """For each owner: its depth, and what every other node holds of it."""
    stats = {n: cluster.stats(n) for n in cluster.ids}
    return {
        owner: {"depth": stats[owner]["depth"]}
        | {n: stats[n]["peers"][owner]["held"] for n in cluster.ids if n != owner}
        for owner in cluster.ids
    }


def all_agree(cluster: LocalCluster) -> bool:
    return all(len(set(held.values())) == 1 for held in agree(cluster).values())


def finish(name: str, cluster: LocalCluster, workload: Workload,
           poison: bool = False) -> Report:
    """Heal, wait for the copies to agree, drain, check, print the figures.
    With ``poison``, the held messages are settled (recorded and acked) as
    the poison workers drain."""
    workload.wait_produced()
    cluster.wait_until(lambda: all_agree(cluster), timeout=30,
                       what=f"nodes to agree on what they hold: {agree(cluster)}")
    if poison:
        cluster.wait_until(lambda: poison_settled(cluster), timeout=60,
                           what="every poison message held")
        workload.settle_held()
    workload.drain(max_seconds=60)
    report = workload.checker.report()
    FAULT_FIGURES.append(f"{name} seed={workload.config.seed}: {report.summary()}")
    print(f"\n[{name} seed={workload.config.seed}] {report.summary()}")
    print(f"[{name} seed={workload.config.seed}] json {json.dumps(report.as_dict())}")
    assert not workload.errors, workload.errors
    assert report.lost == 0, report.summary()
    assert report.unexpected == 0, report.summary()
    assert report.ok(), report.summary()
    assert report.acknowledged > 0
    cluster.wait_until(lambda: all_agree(cluster), timeout=15, what="final agreement")
    assert all(v == 0 for held in agree(cluster).values() for v in held.values())
    return report


def poison_settled(cluster: LocalCluster) -> bool:
    """Nothing left but held messages (poison that reached its limit)."""
    stats = [cluster.stats(n) for n in cluster.ids]
    return all(s["depth"] == s["held"] for s in stats)


def test_poison_is_held_not_lost_across_an_owner_kill(pool, seed, soak) -> None:
    """Workers nack every poison message; after --max-deliveries=2 each is
    held, also when its owner is killed -9 and replaced on the way: the
    checker finds every poison token held (none lost, none delivered
    forever), the rest delivered."""
    rng = random.Random(seed)
    cluster = LocalCluster(pool, ("a", "b", "c"), "--max-deliveries=2").start()
    workload = workload_for(cluster, seed, soak, poison_rate=0.2).start()
    for _ in range(2 if soak else 1):
        time.sleep(rng.uniform(0.5, 1.5))
        cluster.replace(rng.choice(cluster.ids))
    report = finish("poison-held", cluster, workload, poison=True)
    held = set(workload.held_tokens)
    acknowledged_poison = {token for token, outcome in workload.checker.outcomes().items()
                           if token.startswith("poison-") and outcome == "ok"}
    # Every acknowledged poison message ended held (an indeterminate push
    # that was queued may too).  Another message is held only when its
    # leases ended unacked twice (workers that "crashed", a lease voided by
    # the owner's kill): delivered, never acked.
    assert acknowledged_poison and acknowledged_poison <= held, report.summary()
    delivered = workload.checker.deliveries_by_token()
    for token in held - acknowledged_poison:
        assert token.startswith("poison-") or (
            delivered.get(token, 0) >= 1 and token not in workload.answered_204), token
    assert report.held == len(held)


def test_every_node_killed_at_once_with_data_dirs(pool, seed, soak) -> None:
    """A power cut of the whole cluster: with --data-dir on every node,
    all three are killed -9 at the same instant under load and restarted.
    Nothing answered 201 is lost; nothing answered 204 comes back."""
    rng = random.Random(seed)
    cluster = LocalCluster(pool, ("a", "b", "c"),
                           node_args=lambda n: [f"--data-dir={pool.workdir / (n + '-data')}"])
    cluster.start()
    workload = workload_for(cluster, seed, soak).start()
    for _ in range(2 if soak else 1):
        time.sleep(rng.uniform(0.8, 2.0))
        for node_id in cluster.ids:  # as one: signals sent back to back
            cluster[node_id].signal(signal.SIGKILL)
        acked_before = set(workload.answered_204)
        delivered_before = workload.checker.deliveries_by_token()
        for node_id in cluster.ids:
            cluster[node_id].kill()  # reap
            cluster.replace(node_id, wait="")
        for node_id in cluster.ids:
            cluster[node_id].wait_for("/ready", 60)
    report = finish("all-at-once", cluster, workload)
    delivered_after = workload.checker.deliveries_by_token()
    came_back = [t for t in acked_before
                 if delivered_after.get(t, 0) > delivered_before.get(t, 0)]
    assert came_back == [], f"acked (204) before the crash, delivered after: {came_back[:5]}"
    assert report.acknowledged > 0


def test_batches_held_as_runs_survive_a_power_cut_and_a_lost_disk(pool, seed, soak) -> None:
    """Copies kept as runs (a batch push reaches each replica as one run
    of bytes, journaled as it came): every node is killed -9 at once under
    a load of batch pushes, and one of them comes back with an empty data
    directory (its disk was lost).  Its messages are only in its peers'
    journals, as runs: it must recover every one answered 201 from them.
    Workers take and ack in batches too (``GET /get?count=10``, one ``POST
    /ack``), mostly on nodes that do not own what they ack: nothing a batch
    ack answered as acked before the cut may be delivered after it."""
    rng = random.Random(seed)
    data = {n: pool.workdir / f"{n}-data" for n in ("a", "b", "c")}
    cluster = LocalCluster(pool, ("a", "b", "c"),
                           node_args=lambda n: [f"--data-dir={data[n]}"])
    cluster.start()
    workload = workload_for(cluster, seed, soak, batch_size=25, messages=3000 if soak else 1000,
                            push_interval=0.1, idempotency_keys=False, take_count=10).start()
    time.sleep(rng.uniform(0.8, 2.0))
    for node_id in cluster.ids:  # as one: signals sent back to back
        cluster[node_id].signal(signal.SIGKILL)
    acked_before = set(workload.answered_204)
    delivered_before = workload.checker.deliveries_by_token()
    lost_disk = rng.choice(cluster.ids)
    data[lost_disk] = pool.workdir / f"{lost_disk}-data-new"
    for node_id in cluster.ids:
        cluster[node_id].kill()  # reap
        cluster.replace(node_id, wait="")
    for node_id in cluster.ids:
        cluster[node_id].wait_for("/ready", 60)
    finish("batch-runs", cluster, workload)
    assert workload.batches_created >= 4, "too few batches: the scenario tested little"
    assert acked_before, "no batch ack answered before the cut: the scenario tested little"
    delivered_after = workload.checker.deliveries_by_token()
    came_back = [t for t in acked_before
                 if delivered_after.get(t, 0) > delivered_before.get(t, 0)]
    assert came_back == [], f"acked before the cut, delivered after: {came_back[:5]}"


def test_owner_killed_right_after_a_201(pool, seed, soak) -> None:
    rng = random.Random(seed)
    cluster = LocalCluster(pool).start()
    workload = workload_for(cluster, seed, soak).start()
    for _ in range(3 if soak else 2):
        time.sleep(rng.uniform(0.2, 1.0))
        victim = rng.choice(cluster.ids)
        token = f"last-words-{victim}-{rng.random()}"
        workload.checker.attempt(token)
        reply = cluster.push(victim, token.encode())
        if reply.status == 201:
            workload.checker.pushed(token, "ok", reply.json()["id"])
        else:
            workload.checker.pushed(token, "refused")
        cluster.replace(victim, wait="")  # kill -9 at once, then a fresh node
        cluster[victim].wait_for("/ready", 30)
    finish("kill-after-201", cluster, workload)


def test_all_but_one_killed_then_replaced_one_by_one(pool, seed, soak) -> None:
    rng = random.Random(seed)
    cluster = LocalCluster(pool).start()
    workload = workload_for(cluster, seed, soak).start()
    time.sleep(rng.uniform(0.5, 1.5))
    survivor = rng.choice(cluster.ids)
    victims = [n for n in cluster.ids if n != survivor]
    for victim in victims:
        cluster[victim].kill()
    time.sleep(rng.uniform(0.5, 2.0))  # pushes are refused meanwhile
    for victim in victims:
        # The first one back recovers, but cannot take writes until the
        # last one is back too (min-copies 3).
        cluster.replace(victim, wait="recovered")
        time.sleep(rng.uniform(0.2, 1.0))
    finish("all-but-one", cluster, workload)


def test_rolling_kill_under_load(pool, seed, soak) -> None:
    rng = random.Random(seed)
    cluster = LocalCluster(pool).start()
    workload = workload_for(cluster, seed, soak).start()
    order = list(cluster.ids)
    rng.shuffle(order)
    for victim in order * (2 if soak else 1):
        time.sleep(rng.uniform(0.2, 1.0))
        cluster.replace(victim)
    finish("rolling-kill", cluster, workload)


def test_flapping_replica_alone_holds_every_201(pool, seed, soak) -> None:
    """The stream's acknowledgements: a replica whose links keep resetting
    (Stream boxes lost in flight, links renumbered from 1 when they come
    back) must never count as holding what it did not get, and a push
    refused meanwhile must stay withdrawn.  At last its links are reset
    while pushes to the owner are in flight, and the owner and the other
    replica are killed -9 at once, before the flapping replica could sync:
    it alone must hold every message answered 201, and the replacements
    recover all of them from it.  A push refused with 503 in that last
    burst (the scenario's or the workload's) is indeterminate: it is
    withdrawn with a tombstone, but the two nodes that had it die before it
    reaches the cut replica, which may hold the copy (a refusal outlives
    two of three nodes lost at once only with --data-dir)."""
    rng = random.Random(seed)
    cluster = LocalCluster(pool, fault_proxy=True).start()
    workload = workload_for(cluster, seed, soak).start()
    flapping = rng.choice(cluster.ids)
    owner, other = [n for n in cluster.ids if n != flapping]
    pushes = itertools.count(1)
    stop = threading.Event()

    def push_to_owner(final: bool = False) -> bool | None:
        """One push through the owner, counted by the checker; None when
        the owner is gone (killed while it answered: indeterminate).  In
        the ``final`` burst a 503 is indeterminate too (see above)."""
        token = f"flap-{owner}-{next(pushes)}-{seed}"
        workload.checker.attempt(token)
        try:
            reply = cluster.push(owner, token.encode())
        except OSError:
            return None
        ok = reply.status == 201
        if ok or not final:
            workload.checker.pushed(token, "ok" if ok else "refused",
                                    reply.json().get("id") if ok else None)
        return ok

    def keep_pushing() -> None:
        while not stop.is_set() and push_to_owner(final=True) is not None:
            pass

    for _ in range(6 if soak else 3):
        cluster.cut(flapping, "reset")
        time.sleep(rng.uniform(0.05, 0.3))
        cluster.heal()
        time.sleep(rng.uniform(0.2, 0.6))
        for _ in range(5):  # a burst through the owner while links come back
            push_to_owner()
    cluster.wait_until(push_to_owner, timeout=20, what=f"{owner} to answer a push 201")
    pushers = [threading.Thread(target=keep_pushing, daemon=True) for _ in range(4)]
    for pusher in pushers:
        pusher.start()
    time.sleep(rng.uniform(0.1, 0.3))
    workload.refusals_unsure(True)
    cluster.cut(flapping, "reset")  # boxes in flight to it are lost ...
    time.sleep(rng.uniform(0.0, 0.05))
    cluster[owner].kill()  # ... and it is about to be the only holder
    cluster[other].kill()
    stop.set()
    for pusher in pushers:
        pusher.join(10)
    cluster.heal()
    for victim in (owner, other):
        cluster.replace(victim, wait="")
    for victim in (owner, other):
        cluster[victim].wait_for("/ready", 30)
    workload.refusals_unsure(False)
    print(f"\n[flapping-replica seed={seed}] {flapping} flapped and was cut under "
          f"{next(pushes) - 1} pushes to {owner}; {owner} and {other} killed together")
    finish("flapping-replica", cluster, workload)


def test_owner_cut_off_from_its_peers_never_answers_201(pool, seed, soak) -> None:
    rng = random.Random(seed)
    cluster = LocalCluster(pool, fault_proxy=True).start()
    workload = workload_for(cluster, seed, soak).start()
    time.sleep(rng.uniform(0.3, 1.0))
    victim = rng.choice(cluster.ids)
    mode = rng.choice(["blackhole", "reset"])
    cluster.cut(victim, mode)
    # Clients still reach it over HTTP; no push may be accepted without copies.
    answers = []
    deadline = time.monotonic() + (6 if soak else 3)
    while time.monotonic() < deadline:
        token = f"cut-{victim}-{len(answers)}-{seed}"
        workload.checker.attempt(token)
        reply = cluster.push(victim, token.encode())
        answers.append(reply.status)
        workload.checker.pushed(token, "ok" if reply.status == 201 else "refused",
                                reply.json().get("id"))
        time.sleep(0.02)
    assert answers and set(answers) == {503}, answers
    ready = cluster[victim].http("GET", "/ready")
    assert ready.status == 503
    cluster.heal()
    cluster.wait_until(lambda: cluster[victim].http("GET", "/ready").status == 200,
                       timeout=20, what=f"{victim} ready after healing")
    print(f"\n[cut-off seed={seed}] {victim} cut ({mode}): {len(answers)} pushes, all 503")
    finish("cut-off", cluster, workload)


def test_paused_node_is_fenced_after_its_replacement_took_over(pool, seed, soak) -> None:
    rng = random.Random(seed)
    cluster = LocalCluster(pool, fault_proxy=True).start()
    workload = workload_for(cluster, seed, soak).start()
    time.sleep(rng.uniform(0.3, 1.0))
    victim = rng.choice(cluster.ids)
    old = cluster[victim]
    old.signal(signal.SIGSTOP)
    try:
        twin = cluster.start_twin(victim)  # new ports; peers now reach the twin
        workload.ports[cluster.ids.index(victim)] = twin.http_port
        time.sleep(rng.uniform(0.2, 1.0))
    finally:
        old.signal(signal.SIGCONT)
    # The stale twin wakes up, learns of the newer epoch, and serves nothing.
    cluster.wait_until(
        lambda: "fenced" in (old.http("GET", "/ready").json().get("reason") or ""),
        timeout=20, what="the stale twin to be fenced",
    )
    assert old.http("GET", "/get").status == 204
    stale = old.http("POST", "/push", b"from the past")
    assert stale.status == 503
    assert twin.http("GET", "/stats").json()["epoch"] > 0
    report = finish("stale-twin", cluster, workload)
    # A push retried on another node while its first node stalls is queued once.
    assert report.queued_twice == 0, report.summary()
    assert old.http("GET", "/stats").json()["ready_to_serve"] is False


def impatient_workload(ports: list[int], seed: int, messages: int) -> Workload:
    """Producers that give up on a request after 0.4 s and retry a push
    (with its Idempotency-Key) up to 30 times; workers that never crash."""
    return Workload(
        ports,
        WorkloadConfig(seed=seed, messages=messages, request_timeout=0.4, push_retries=30,
                       push_interval=0.02, max_seconds=90, crash_rate=0.0),
    ).start()


def stall_nodes_now_and_then(cluster: LocalCluster, rng: random.Random, soak: bool) -> None:
    """Pause a node (SIGSTOP) for 0.5 to 1.2 s, shorter than
    replication_timeout, a few times."""
    for _ in range(4 if soak else 2):
        time.sleep(rng.uniform(0.1, 0.4))
        victim = cluster[rng.choice(cluster.ids)]
        victim.signal(signal.SIGSTOP)
        time.sleep(rng.uniform(0.5, 1.2))
        victim.signal(signal.SIGCONT)


def finish_after_timeouts(name: str, cluster: LocalCluster, workload: Workload) -> Report:
    """Once every push is answered: some client must have given up on one
    (else the scenario tested nothing); then drain calmly and check."""
    workload.wait_produced()
    assert workload.push_timeouts > 0, "no client gave up on a push: the scenario tested nothing"
    print(f"\n[{name} seed={workload.config.seed}] {workload.push_timeouts} pushes whose "
          "client gave up and retried with their Idempotency-Key")
    workload.config.request_timeout = 8.0
    report = finish(name, cluster, workload)
    # Each retry was recognised, wherever it landed: no token queued twice.
    assert report.queued_twice == 0, report.summary()
    return report


def test_pushes_whose_clients_hang_up_are_kept_or_withdrawn_everywhere(
        pool, seed, soak) -> None:
    """Clients that give up on a push (0.4 s) and hang up while a replica
    is stalled: each push must still end as if its client had waited,
    accepted once copied or withdrawn everywhere.  An owner that dropped
    such a push with no tombstone left copies on its peers that it did not
    have: the nodes never agreed again (finish checks that they do).  A
    retry that reaches the stalled replica before the first push's copy
    must still be recognised (the replica asks its peers about the key)."""
    cluster = LocalCluster(pool).start()
    workload = impatient_workload(cluster.http_ports(), seed, 300 if soak else 120)
    stall_nodes_now_and_then(cluster, random.Random(seed), soak)
    finish_after_timeouts("hang-ups", cluster, workload)


def test_idempotent_retries_through_the_proxy_after_timeouts(pool, proxies, seed, soak) -> None:
    binary = require_tool("haproxy")
    cluster = LocalCluster(pool).start()
    from .procs import free_port

    proxy = proxies.start("haproxy", free_port(), cluster.http_ports(), binary)
    workload = impatient_workload([proxy.port], seed, 400 if soak else 150)
    # Pushes time out at the client, which retries with the same key.
    stall_nodes_now_and_then(cluster, random.Random(seed), soak)
    finish_after_timeouts("idempotent-retries", cluster, workload)

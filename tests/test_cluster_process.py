"""Three real ``twistd dqid`` nodes on loopback: replication, death,
replacement and any-node requests."""

from __future__ import annotations

import time

import pytest

from dqid.timings import DEFAULT_TIMINGS

from .cluster import LocalCluster

pytestmark = pytest.mark.process


def push_ok(cluster: LocalCluster, node: str, body: bytes, **kw) -> str:
    reply = cluster.push(node, body, **kw)
    assert reply.status == 201, (reply.status, reply.body)
    return reply.json()["id"]


def test_push_is_held_by_every_peer_and_acked_anywhere(pool) -> None:
    cluster = LocalCluster(pool).start()
    first = push_ok(cluster, "a", b"one")
    second = push_ok(cluster, "a", b"two")
    # Replicated before 201: the peers hold both already.
    assert cluster.held_everywhere("a") == {"b": 2, "c": 2}

    # Ack through a node that does not own the message.
    assert cluster["b"].http("POST", f"/ack/{first}").status == 204
    assert cluster["c"].http("POST", f"/ack/{first}").status == 404
    cluster.wait_until(lambda: cluster.held_everywhere("a") == {"b": 1, "c": 1},
                       what="holders to drop the acked copy")
    assert cluster.stats("a")["depth"] == 1

    # A get on a node with nothing ready is served from a peer.
    assert cluster.stats("c")["ready"] == 0
    got = cluster["c"].http("GET", "/get")
    assert got.status == 200
    assert (got.headers["dqid-id"], got.body) == (second, b"two")
    assert cluster["b"].http("POST", f"/ack/{second}").status == 204
    cluster.wait_until(lambda: cluster.held_everywhere("a") == {"b": 0, "c": 0},
                       what="held to fall back to 0")
    assert cluster.stats("a")["depth"] == 0


def test_idempotency_key_is_recognised_on_another_node(pool) -> None:
    cluster = LocalCluster(pool).start()
    headers = {"Idempotency-Key": "order-17"}
    first = push_ok(cluster, "a", b"charge 17", headers=headers)
    retry = cluster.push("b", b"charge 17", headers)
    assert (retry.status, retry.json()["id"]) == (200, first)
    clash = cluster.push("c", b"charge 18", headers)
    assert clash.status == 409
    assert set(cluster.drain()) == {first}


def test_owner_killed_and_replaced_gets_every_message_back(pool) -> None:
    cluster = LocalCluster(pool).start()
    big = b"x" * 200_000
    ids = {push_ok(cluster, "a", f"job {i}".encode()): f"job {i}".encode() for i in range(20)}
    ids[push_ok(cluster, "a", big)] = big
    leased = cluster["a"].http("GET", "/get?visibility=600")
    assert leased.status == 200

    fresh = cluster.replace("a")
    stats = fresh.http("GET", "/stats").json()
    assert stats["depth"] == len(ids)
    assert stats["ready"] == len(ids), "leases of the dead incarnation are void"
    new_id = push_ok(cluster, "a", b"after")
    assert new_id not in ids
    old_epoch = {i.split(".")[1] for i in ids}
    assert new_id.split(".")[1] not in old_epoch, "a replacement never reuses an id"

    # FIFO per owner survives recovery: the first job comes first.
    first = fresh.http("GET", "/get?visibility=60")
    assert first.body == b"job 0"
    fresh.http("POST", f"/ack/{first.headers['dqid-id']}")
    drained = cluster.drain()
    assert drained == {i: b for i, b in ids.items() if b != b"job 0"} | {new_id: b"after"}


def test_push_without_enough_copies_is_refused_and_never_delivered(pool) -> None:
    cluster = LocalCluster(pool).start()
    cluster["c"].kill()
    cluster.wait_until(lambda: not cluster.stats("a")["peers"]["c"]["connected"],
                       what="a to see c down")
    refused = cluster.push("a", b"must not appear")
    assert refused.status == 503
    assert refused.json()["error"] == "not_replicated"
    assert refused.headers["retry-after"]
    assert cluster["a"].http("GET", "/ready").status == 503

    cluster.replace("c")
    accepted = push_ok(cluster, "a", b"after recovery")
    assert set(cluster.drain().values()) == {b"after recovery"}
    assert accepted


def test_min_copies_two_accepts_with_a_node_down_and_it_catches_up(pool) -> None:
    cluster = LocalCluster(pool, ("a", "b", "c"), "--min-copies=2").start()
    cluster["c"].kill()
    cluster.wait_until(lambda: not cluster.stats("a")["peers"]["c"]["connected"],
                       what="a to see c down")
    kept = [push_ok(cluster, "a", f"kept {i}".encode()) for i in range(5)]
    gone = push_ok(cluster, "a", b"acked while c was down")
    assert cluster["b"].http("POST", f"/ack/{gone}").status == 204

    cluster.replace("c")
    cluster.wait_until(lambda: cluster.stats("c")["peers"]["a"]["held"] == 5,
                       what="c to catch up on a's queue")
    # Now a may die: c and b hold everything a accepted.
    fresh = cluster.replace("a")
    assert fresh.http("GET", "/stats").json()["depth"] == 5
    assert set(cluster.drain()) == set(kept)


def test_rolling_kill_and_restart_of_every_node_loses_nothing(pool) -> None:
    cluster = LocalCluster(pool).start()
    expected: dict[str, bytes] = {}
    for round_no, victim in enumerate(["a", "b", "c"]):
        for node in cluster.ids:
            body = f"round {round_no} via {node}".encode()
            expected[push_ok(cluster, node, body)] = body
        cluster.replace(victim)
        for other in cluster.ids:
            cluster["a"].wait_for("/ready")
            cluster.wait_until(
                lambda: cluster[other].http("GET", "/ready").status == 200,
                what=f"{other} ready after {victim} restarted",
            )
    assert cluster.drain() == expected


def test_push_that_times_out_is_withdrawn_from_every_holder(pool) -> None:
    import signal
    import time

    cluster = LocalCluster(pool).start()
    cluster["c"].signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        # Sent before the heartbeats notice c: b copies it, c never answers.
        refused = cluster.push("a", b"withdrawn")
        assert refused.status == 503, refused.body
        assert refused.json()["error"] == "not_replicated"
        assert time.monotonic() - started < 8
    finally:
        cluster["c"].signal(signal.SIGCONT)
    cluster.wait_until(lambda: cluster.stats("a")["peers"]["c"]["connected"]
                       and cluster.stats("c")["peers"]["a"]["synced"],
                       what="c to come back and sync")
    assert cluster.held_everywhere("a") == {"b": 0, "c": 0}
    kept = push_ok(cluster, "a", b"kept")
    assert set(cluster.drain()) == {kept}


def test_lease_changes_and_long_polls_work_through_any_node(pool) -> None:
    import threading
    import time

    cluster = LocalCluster(pool).start()
    message_id = push_ok(cluster, "a", b"lease me")
    got = cluster["b"].http("GET", "/get?visibility=30")
    assert got.headers["dqid-id"] == message_id
    receipt = got.headers["dqid-receipt"]
    assert cluster["c"].http(
        "POST", f"/touch/{message_id}?visibility=60&receipt={receipt}").status == 204
    assert cluster["c"].http("POST", f"/touch/{message_id}?receipt=other").status == 409
    assert cluster["b"].http("POST", f"/nack/{message_id}?receipt={receipt}").status == 204
    assert cluster.stats("a")["ready"] == 1
    # The late worker's receipt no longer acts on the message.
    assert cluster["c"].http("POST", f"/nack/{message_id}?receipt={receipt}").status == 409
    again = cluster["c"].http("GET", "/get")
    assert (again.headers["dqid-id"], again.headers["dqid-deliveries"]) == (message_id, "2")
    assert again.headers["dqid-receipt"] != receipt
    assert cluster["c"].http("POST", f"/ack/{message_id}").status == 204
    assert cluster["b"].http(
        "POST", f"/touch/{message_id}?receipt={again.headers['dqid-receipt']}").status == 404

    # A long poll parked on c is answered by a push that lands on a.
    answer: dict = {}

    def long_poll() -> None:
        started = time.monotonic()
        reply = cluster["c"].http("GET", "/get?wait=15", timeout=20)
        answer.update(status=reply.status, body=reply.body,
                      waited=time.monotonic() - started)

    poller = threading.Thread(target=long_poll)
    poller.start()
    cluster.wait_until(lambda: cluster.stats("c")["waiting_gets"] == 1, what="parked poll")
    pushed_at = time.monotonic()
    push_ok(cluster, "a", b"wake up")
    poller.join(20)
    assert answer["status"] == 200 and answer["body"] == b"wake up"
    assert time.monotonic() - pushed_at < 3


def test_batches_keep_the_single_message_guarantees(pool) -> None:
    import json

    cluster = LocalCluster(pool, ("a", "b", "c"), "--size=10").start()

    def batch(node: str, bodies: list[str]):
        payload = json.dumps({"messages": [{"body": b} for b in bodies]}).encode()
        return cluster[node].http("POST", "/push/batch", payload)

    first = batch("a", [f"batch {i}" for i in range(8)])
    assert first.status == 201
    ids = first.json()["ids"]
    assert len(ids) == 8
    # Replicated before 201, like a single push.
    assert cluster.held_everywhere("a") == {"b": 8, "c": 8}
    # All or nothing: 3 more do not fit in --size=10, so none is queued.
    refused = batch("a", ["x", "y", "z"])
    assert refused.status == 429
    assert cluster.stats("a")["depth"] == 8
    assert cluster.held_everywhere("a") == {"b": 8, "c": 8}

    # A node down: a batch is refused as a whole and never delivered.
    cluster["c"].kill()
    cluster.wait_until(lambda: not cluster.stats("a")["peers"]["c"]["connected"],
                       what="a to see c down")
    assert batch("a", ["lost 1", "lost 2"]).status == 503
    cluster.replace("c")

    # Batch get through a node that owns none of them; batch ack elsewhere.
    got = cluster["b"].http("GET", "/get?count=5&visibility=60")
    assert got.status == 200
    taken = got.json()["messages"]
    assert [m["id"] for m in taken] == ids[:5]
    acked = cluster["c"].http(
        "POST", "/ack", json.dumps({"ids": [m["id"] for m in taken] + ["a.1.999"]}).encode()
    ).json()
    assert acked == {"acked": ids[:5], "unknown": ["a.1.999"]}
    cluster.wait_until(lambda: cluster.held_everywhere("a") == {"b": 3, "c": 3},
                       what="holders to drop the acked copies")
    assert set(cluster.drain()) == set(ids[5:])


def test_a_held_message_survives_its_owners_kill_and_replacement(pool) -> None:
    cluster = LocalCluster(pool, ("a", "b", "c"), "--max-deliveries=2").start()
    poison = push_ok(cluster, "a", b"poison")
    later = cluster["a"].http("POST", "/push?delay=3600", b"tomorrow").json()["id"]
    for worker in ("b", "c"):  # two deliveries, through two nodes, both nacked
        got = cluster[worker].http("GET", "/get?visibility=30")
        assert got.headers["dqid-id"] == poison
        receipt = got.headers["dqid-receipt"]
        assert cluster[worker].http("POST", f"/nack/{poison}?receipt={receipt}").status == 204
    assert cluster.stats("a")["held"] == 1
    cluster.wait_until(
        lambda: cluster["b"].http("GET", f"/messages/{poison}").headers.get("dqid-state")
        == "held", what="b to see the message held")
    listed = cluster["c"].http("GET", "/held").json()["messages"]
    assert [m["id"] for m in listed] == [poison]
    # The peers' copies learn it with the next Stream box, within
    # states_linger (50 ms): then kill -9 a.
    time.sleep(10 * DEFAULT_TIMINGS.states_linger)
    cluster.replace("a")
    stats = cluster.stats("a")
    assert (stats["held"], stats["delayed"], stats["ready"], stats["depth"]) == (1, 1, 0, 2)
    assert cluster["a"].http("GET", "/get").status == 204  # held and delayed: nothing
    peeked = cluster["b"].http("GET", f"/messages/{poison}")
    assert (peeked.body, peeked.headers["dqid-state"], peeked.headers["dqid-deliveries"]) == (
        b"poison", "held", "2")
    assert cluster["b"].http("GET", f"/messages/{later}").headers["dqid-state"] == "delayed"
    # A person decides: kick it, through any node; it is delivered again.
    assert cluster["c"].http("POST", f"/kick/{poison}").status == 204
    again = cluster["b"].http("GET", "/get")
    assert (again.headers["dqid-id"], again.headers["dqid-deliveries"]) == (poison, "3")
    assert cluster["b"].http("POST", f"/ack/{poison}").status == 204

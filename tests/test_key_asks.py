"""KeyAsks alone (dqid.key_asks): a fake node and a fake cluster, no AMP.

The rules: a key not known here is asked of the peers; while this node
asks, a peer with a higher id asking the same waits for this node's push,
one with a lower id is answered "none" and this node asks again."""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from dqid.idempotency import IdempotencyIndex, body_digest
from dqid.key_asks import KeyAsks

from .helpers import assertNoResult, successResultOf

DIGEST = body_digest(b"body")


@dataclass
class FakeRemote:
    asks: list[Deferred] = field(default_factory=list)

    def find_key(self, key: str, digest: bytes) -> Deferred:
        self.asks.append(Deferred())
        return self.asks[-1]

    async def confirm_key(self, key: str, digest: bytes, first: str) -> str | None:
        return first


@dataclass
class FakeNode:
    node_id: str = "b"
    clock: Clock = field(default_factory=Clock)
    idempotency: IdempotencyIndex = field(default_factory=IdempotencyIndex)
    remote: FakeRemote | None = field(default_factory=FakeRemote)
    outcomes: dict[str, Deferred] = field(default_factory=dict)

    def outcome_of(self, message_id: str) -> Deferred:
        return self.outcomes.get(message_id, succeed(None))


def asks() -> tuple[FakeNode, KeyAsks]:
    node = FakeNode()
    return node, KeyAsks(node)


def first_under(keys: KeyAsks, key: str = "k") -> Deferred:
    return Deferred.fromCoroutine(keys.first_under(key, DIGEST))


def own_key(keys: KeyAsks, asker: str, key: str = "k") -> Deferred:
    return Deferred.fromCoroutine(keys.own_key(key, DIGEST, asker))


def test_a_key_unknown_here_is_asked_and_stays_marked_until_queued():
    node, keys = asks()
    d = first_under(keys)
    assert len(node.remote.asks) == 1 and "k" in keys
    node.remote.asks[0].callback(None)
    assert successResultOf(d) is None and "k" in keys  # the caller queues now
    keys.asked("k")
    assert "k" not in keys


def test_a_peer_that_has_the_key_answers_its_id():
    node, keys = asks()
    d = first_under(keys)
    node.remote.asks[0].callback("a.1.1")
    assert successResultOf(d) == "a.1.1" and "k" not in keys


def test_a_higher_asker_waits_for_the_push_queued_here_and_its_outcome():
    node, keys = asks()
    first_under(keys)
    answer = own_key(keys, asker="c")
    assertNoResult(answer)
    node.remote.asks[0].callback(None)  # nobody has it: b queues b.1.1
    node.idempotency.remember("k", DIGEST, "b.1.1")
    node.outcomes["b.1.1"] = accepted = Deferred()
    keys.asked("k")
    assertNoResult(answer)
    accepted.callback(None)
    assert successResultOf(answer) == "b.1.1"


def test_a_lower_asker_is_answered_none_and_this_node_asks_again():
    node, keys = asks()
    d = first_under(keys)
    assert successResultOf(own_key(keys, asker="a")) is None
    node.remote.asks[0].callback(None)
    assert len(node.remote.asks) == 2  # asked again: a may have queued
    assertNoResult(d)
    node.remote.asks[1].callback("a.1.1")
    assert successResultOf(d) == "a.1.1"


def test_a_second_push_here_under_the_key_waits_for_the_first_ask():
    node, keys = asks()
    first = first_under(keys)
    second = first_under(keys)
    assert len(node.remote.asks) == 1
    node.remote.asks[0].callback(None)
    assert successResultOf(first) is None
    node.idempotency.remember("k", DIGEST, "b.1.1")
    keys.asked("k")
    assert successResultOf(second) == "b.1.1"


def test_a_standalone_node_asks_nobody():
    node, keys = asks()
    node.remote = None
    assert successResultOf(first_under(keys)) is None and "k" not in keys


def test_a_peer_is_answered_our_own_push_even_after_a_copy_under_the_key_came():
    node, keys = asks()
    node.idempotency.remember("k", DIGEST, "b.1.1")
    node.idempotency.remember_copy("k", DIGEST, "a.1.7")  # queued twice already
    assert successResultOf(own_key(keys, asker="c")) == "b.1.1"

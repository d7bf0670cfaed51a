"""The Idempotency-Key header of POST /push: retries, conflicts, how long
a key is remembered.

See :mod:`tests.web_harness` for the harness."""

from __future__ import annotations

import pytest

from .web_harness import assert_error, h, make


# -- Idempotency-Key ------------------------------------------------------------


def test_idempotent_retry_answers_200_with_the_first_id(h):
    message_id = h.push(b"body", key="k1")
    reply = h.call("POST", "/push", b"body", {"Idempotency-Key": "k1"})
    assert reply.code == 200
    assert reply.json() == {"id": message_id}
    stats = h.stats()
    assert stats["depth"] == 1
    assert stats["counters"]["pushed"] == 1


def test_idempotent_retry_is_answered_even_when_the_queue_is_now_full(make):
    h = make(size=1)
    message_id = h.push(b"body", key="k1")
    assert_error(h.call("POST", "/push", b"other"), 429, "queue_full")
    reply = h.call("POST", "/push", b"body", {"Idempotency-Key": "k1"})
    assert reply.code == 200
    assert reply.json() == {"id": message_id}
    assert h.stats()["depth"] == 1


def test_idempotency_key_with_another_body_is_409(h):
    h.push(b"body", key="k1")
    assert_error(
        h.call("POST", "/push", b"another body", {"Idempotency-Key": "k1"}),
        409, "idempotency_conflict",
    )
    assert h.stats()["depth"] == 1


def test_different_keys_make_different_messages(h):
    assert h.push(b"body", key="k1") != h.push(b"body", key="k2")
    assert h.stats()["depth"] == 2


def test_idempotency_key_is_remembered_while_the_message_is_queued(h):
    message_id = h.push(b"body", key="k1")
    h.clock.advance(3600)
    reply = h.call("POST", "/push", b"body", {"Idempotency-Key": "k1"})
    assert (reply.code, reply.json()) == (200, {"id": message_id})
    assert h.stats()["depth"] == 1


def test_idempotency_key_is_forgotten_five_minutes_after_the_ack(h):
    message_id = h.push(b"body", key="k1")
    assert h.take().header("Dqid-Id") == message_id
    assert h.call("POST", f"/ack/{message_id}").code == 204

    h.clock.advance(299)
    reply = h.call("POST", "/push", b"body", {"Idempotency-Key": "k1"})
    assert (reply.code, reply.json()) == (200, {"id": message_id})
    assert_error(
        h.call("POST", "/push", b"other", {"Idempotency-Key": "k1"}),
        409, "idempotency_conflict",
    )
    assert h.stats()["depth"] == 0  # the retry queued nothing

    h.clock.advance(2)
    reply = h.call("POST", "/push", b"body", {"Idempotency-Key": "k1"})
    assert reply.code == 201
    assert reply.json()["id"] != message_id
    assert h.stats()["depth"] == 1


def test_a_push_refused_as_full_does_not_claim_its_key(make):
    h = make(size=1)
    first = h.push(b"a")
    assert_error(
        h.call("POST", "/push", b"b", {"Idempotency-Key": "k2"}), 429, "queue_full"
    )
    assert h.call("POST", f"/ack/{first}").code == 204
    # The refused push left no trace: the key takes a new body.
    assert h.call("POST", "/push", b"c", {"Idempotency-Key": "k2"}).code == 201


@pytest.mark.parametrize("key", [b"", b"k" * 256, b"caf\xc3\xa9", b"tab\there"])
def test_bad_idempotency_key_is_400(h, key):
    assert_error(
        h.call("POST", "/push", b"body", {b"Idempotency-Key": [key]}), 400, "bad_request"
    )
    assert h.stats()["depth"] == 0


def test_longest_idempotency_key_is_accepted(h):
    h.push(b"body", key="k" * 255)

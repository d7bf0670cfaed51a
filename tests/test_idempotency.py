"""Unit tests of the Idempotency-Key index (dqid.idempotency): time passed in.

DESIGN.md: a retry with the same key and body answers the first id; same key,
other body is a conflict (409).  A key is remembered while its message is
queued and for 5 minutes after its ack; a withdrawn push frees the key.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dqid.idempotency import IdempotencyConflict, IdempotencyIndex, body_digest

BODY = body_digest(b"the body")
OTHER = body_digest(b"another body")


def index_with(key: str = "k", digest: bytes = BODY, message_id: str = "n.1.1",
               retain: float = 300.0) -> IdempotencyIndex:
    index = IdempotencyIndex(retain)
    index.remember(key, digest, message_id)
    return index


# -- body_digest --------------------------------------------------------------


def test_body_digest_is_stable_and_compact():
    assert body_digest(b"x") == body_digest(b"x")
    assert isinstance(body_digest(b"x"), bytes)
    assert len(body_digest(b"x" * 100_000)) == 16


@given(st.binary(max_size=64), st.binary(max_size=64))
def test_body_digest_tells_bodies_apart(a, b):
    assert (body_digest(a) == body_digest(b)) == (a == b)


def test_body_digest_differs_on_a_single_late_byte():
    body = bytes(1000)
    assert body_digest(body) != body_digest(body[:-1] + b"\x01")


# -- lookup and remember --------------------------------------------------------


def test_new_key_is_unknown():
    index = IdempotencyIndex()
    assert index.lookup("k", BODY, 0.0) is None
    assert len(index) == 0


def test_default_window_is_five_minutes():
    assert IdempotencyIndex().retain_after_ack == 300.0


def test_same_key_and_body_answers_the_first_id():
    index = index_with()
    assert index.lookup("k", BODY, 0.0) == "n.1.1"
    assert index.lookup("k", BODY, 5.0) == "n.1.1"  # any number of retries
    assert len(index) == 1


def test_same_key_other_body_is_a_conflict_naming_the_first_id():
    index = index_with()
    with pytest.raises(IdempotencyConflict) as raised:
        index.lookup("k", OTHER, 0.0)
    assert raised.value.key == "k"
    assert raised.value.message_id == "n.1.1"
    # the conflict does not replace what was remembered
    assert index.lookup("k", BODY, 0.0) == "n.1.1"


def test_keys_are_independent():
    index = index_with("k1", BODY, "n.1.1")
    index.remember("k2", OTHER, "n.1.2")
    assert index.lookup("k1", BODY, 0.0) == "n.1.1"
    assert index.lookup("k2", OTHER, 0.0) == "n.1.2"
    assert index.lookup("k3", BODY, 0.0) is None
    assert len(index) == 2


def test_key_is_remembered_while_its_message_is_queued():
    """No ack, no forgetting: not after an hour, not after a year."""
    index = index_with()
    for now in (299.0, 301.0, 3600.0, 3.2e7):
        assert index.lookup("k", BODY, now) == "n.1.1"
        index.sweep(now)
    assert len(index) == 1


# -- released: the window after the ack ---------------------------------------------


def test_key_is_remembered_for_the_window_after_the_ack():
    index = index_with()
    index.released("k", 1000.0)
    assert index.lookup("k", BODY, 1000.0) == "n.1.1"
    assert index.lookup("k", BODY, 1299.999) == "n.1.1"
    with pytest.raises(IdempotencyConflict):
        index.lookup("k", OTHER, 1299.999)


def test_key_is_forgotten_once_the_window_after_the_ack_has_passed():
    index = index_with()
    index.released("k", 1000.0)
    assert index.lookup("k", BODY, 1300.0) is None
    assert len(index) == 0


def test_a_forgotten_key_is_free_for_a_new_body():
    index = index_with()
    index.released("k", 0.0)
    assert index.lookup("k", OTHER, 301.0) is None  # no conflict any more
    index.remember("k", OTHER, "n.1.2")
    assert index.lookup("k", OTHER, 302.0) == "n.1.2"
    with pytest.raises(IdempotencyConflict):
        index.lookup("k", BODY, 302.0)


def test_the_window_is_configurable():
    index = index_with(retain=10.0)
    index.released("k", 50.0)
    assert index.lookup("k", BODY, 59.9) == "n.1.1"
    assert index.lookup("k", BODY, 60.0) is None


def test_a_second_release_does_not_extend_the_window():
    index = index_with()
    index.released("k", 0.0)
    index.released("k", 200.0)
    assert index.lookup("k", BODY, 300.0) is None


def test_release_of_an_unknown_key_is_a_no_op():
    index = index_with()
    index.released("nope", 0.0)
    assert len(index) == 1
    assert index.lookup("nope", BODY, 1.0) is None
    assert index.lookup("k", BODY, 1000.0) == "n.1.1"


def test_each_key_has_its_own_window():
    index = index_with("early", BODY, "n.1.1")
    index.remember("late", BODY, "n.1.2")
    index.remember("queued", BODY, "n.1.3")
    index.released("early", 0.0)
    index.released("late", 100.0)
    index.sweep(300.0)
    assert len(index) == 2
    assert index.lookup("early", BODY, 300.0) is None
    assert index.lookup("late", BODY, 399.0) == "n.1.2"
    assert index.lookup("late", BODY, 400.0) is None
    assert index.lookup("queued", BODY, 10_000.0) == "n.1.3"


# -- forget: a withdrawn push -----------------------------------------------------


def test_forget_frees_the_key_of_a_withdrawn_push():
    index = index_with()
    index.discard("k", "n.1.1")
    assert len(index) == 0
    assert index.lookup("k", OTHER, 0.0) is None


def test_forget_with_another_id_keeps_the_key():
    """A late withdrawal of an older push must not free a newer one's key."""
    index = index_with()
    index.discard("k", "n.1.9")
    assert index.lookup("k", BODY, 0.0) == "n.1.1"
    assert len(index) == 1


def test_forget_of_an_unknown_key_is_a_no_op():
    index = index_with()
    index.discard("nope", "n.1.1")
    assert len(index) == 1


def test_a_stale_window_does_not_forget_a_key_remembered_again():
    index = index_with("k", BODY, "n.1.1")
    index.released("k", 0.0)  # would forget at 300
    index.discard("k", "n.1.1")
    index.remember("k", OTHER, "n.1.2")  # a new, still queued message
    index.sweep(300.0)
    assert index.lookup("k", OTHER, 301.0) == "n.1.2"
    # and the new entry gets its own window when it is acked
    index.released("k", 400.0)
    assert index.lookup("k", OTHER, 699.0) == "n.1.2"
    assert index.lookup("k", OTHER, 700.0) is None


# -- sweep ----------------------------------------------------------------------


def test_sweep_drops_expired_keys_without_a_lookup():
    index = IdempotencyIndex(10.0)
    for n in range(5):
        index.remember(f"k{n}", BODY, f"n.1.{n}")
        index.released(f"k{n}", float(n))
    index.sweep(11.5)  # k0 (10) and k1 (11) are due
    assert len(index) == 3
    index.sweep(11.9)
    assert len(index) == 3
    index.sweep(100.0)
    assert len(index) == 0


def test_sweep_keeps_unreleased_keys():
    index = index_with()
    index.sweep(1e12)
    assert len(index) == 1


def test_a_copy_does_not_displace_a_key_that_names_a_queued_message():
    index = IdempotencyIndex(retain_after_ack=300.0)
    index.remember("k", BODY, "b.1.1")  # this node's own push
    index.remember_copy("k", BODY, "a.1.9")  # a peer's copy under the same key
    assert index.lookup("k", BODY, now=0.0) == "b.1.1"


def test_a_copy_takes_a_key_that_is_new_or_released():
    index = IdempotencyIndex(retain_after_ack=300.0)
    index.remember_copy("new", BODY, "a.1.1")
    assert index.lookup("new", BODY, now=0.0) == "a.1.1"
    index.remember("k", BODY, "b.1.1")
    index.released("k", now=0.0)  # acked: kept for the window only
    index.remember_copy("k", BODY, "a.1.2")
    assert index.lookup("k", BODY, now=1.0) == "a.1.2"

"""Mutual challenge-response between peers (dqid.handshake, dqid.auth_commands).

DESIGN.md, Security: every AMP connection starts with mutual
challenge-response, HMAC-SHA256 over fresh nonces from both sides, bound to
both node ids; the key never crosses the wire.  Issue 9: a recorded
handshake must not work twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.protocols import amp
from twisted.test import iosim

from dqid.auth_commands import AuthChallenge, AuthProve
from dqid.handshake import (
    DIALLER,
    LISTENER,
    NONCE_BYTES,
    PROOF_BYTES,
    Answer,
    Challenge,
    DiallerHandshake,
    HandshakeFailed,
    ListenerHandshake,
    make_proof,
    transcript,
)
from dqid.ids import NODE_ID_RE

KEY = b"k" * 32
OTHER_KEY = b"K" * 32


@dataclass
class Recording:
    """Everything a wiretap sees of one successful handshake."""

    challenge: Challenge
    answer: Answer
    proof: bytes


def exchange(dialler: DiallerHandshake, listener: ListenerHandshake) -> Recording:
    challenge = dialler.challenge()
    answer = listener.challenged(challenge.node, challenge.nonce)
    proof = dialler.answered(answer.node, answer.nonce, answer.proof)
    assert listener.proved(proof) == dialler.node
    return Recording(challenge, answer, proof)


def test_correct_exchange_proves_both_sides():
    dialler = DiallerHandshake(KEY, "a", expected_peer="b")
    listener = ListenerHandshake(KEY, "b", peers={"a", "c"})
    assert not dialler.done and not listener.done
    recording = exchange(dialler, listener)
    assert dialler.done and listener.done
    assert dialler.peer == "b" and listener.peer == "a"
    assert len(recording.challenge.nonce) == len(recording.answer.nonce) == NONCE_BYTES
    assert len(recording.answer.proof) == len(recording.proof) == PROOF_BYTES


def test_key_never_crosses_the_wire():
    key = b"the-cluster-secret-0123456789"
    recording = exchange(DiallerHandshake(key, "a"), ListenerHandshake(key, "b"))
    sent = b"".join([
        recording.challenge.node.encode(), recording.challenge.nonce,
        recording.answer.node.encode(), recording.answer.nonce,
        recording.answer.proof, recording.proof,
    ])
    for size in (8, len(key)):
        for start in range(len(key) - size + 1):
            assert key[start:start + size] not in sent


def test_nonces_are_fresh_on_every_connection():
    nonces = set()
    for _ in range(20):
        recording = exchange(DiallerHandshake(KEY, "a"), ListenerHandshake(KEY, "b"))
        nonces.update((recording.challenge.nonce, recording.answer.nonce))
    assert len(nonces) == 40


def test_dialler_and_listener_proofs_differ():
    """The role is bound in, so the two proofs of one exchange are distinct."""
    recording = exchange(DiallerHandshake(KEY, "a"), ListenerHandshake(KEY, "b"))
    assert recording.proof != recording.answer.proof


def test_listener_with_wrong_key_is_refused_by_the_dialler():
    dialler = DiallerHandshake(KEY, "a")
    listener = ListenerHandshake(OTHER_KEY, "b")
    challenge = dialler.challenge()
    answer = listener.challenged(challenge.node, challenge.nonce)
    with pytest.raises(HandshakeFailed, match="'b' did not prove"):
        dialler.answered(answer.node, answer.nonce, answer.proof)
    assert dialler.failed and not dialler.done and dialler.peer is None


def test_dialler_with_wrong_key_is_refused_by_the_listener():
    """Even if a wrong-key dialler ignored its own check and sent a proof."""
    listener = ListenerHandshake(KEY, "b")
    nonce = b"n" * NONCE_BYTES
    answer = listener.challenged("a", nonce)
    forged = make_proof(OTHER_KEY, DIALLER, nonce, answer.nonce, "a", "b")
    with pytest.raises(HandshakeFailed, match="'a' did not prove"):
        listener.proved(forged)
    assert listener.failed and not listener.done and listener.peer is None


def test_reflected_listener_proof_is_refused():
    """An attacker sends the listener's own proof back as the dialler's."""
    listener = ListenerHandshake(KEY, "b")
    answer = listener.challenged("a", b"n" * NONCE_BYTES)
    with pytest.raises(HandshakeFailed):
        listener.proved(answer.proof)


def test_reflection_across_two_connections_is_refused():
    """The attacker dials b twice, trying to make b compute a dialler proof for it.

    b as a listener only ever computes listener proofs, so whatever the
    attacker collects from one connection cannot serve as a dialler proof on
    another, even with the nonces lined up.
    """
    first = ListenerHandshake(KEY, "b")
    answer1 = first.challenged("a", b"x" * NONCE_BYTES)
    second = ListenerHandshake(KEY, "b")
    answer2 = second.challenged("a", answer1.nonce)
    with pytest.raises(HandshakeFailed):
        first.proved(answer2.proof)


def test_recorded_handshake_replayed_to_a_new_listener_is_refused():
    recording = exchange(DiallerHandshake(KEY, "a"), ListenerHandshake(KEY, "b"))
    replayed_to = ListenerHandshake(KEY, "b")
    fresh = replayed_to.challenged(recording.challenge.node, recording.challenge.nonce)
    assert fresh.nonce != recording.answer.nonce
    with pytest.raises(HandshakeFailed):
        replayed_to.proved(recording.proof)
    assert not replayed_to.done and replayed_to.peer is None


def test_recorded_answer_replayed_to_a_new_dialler_is_refused():
    """An attacker posing as listener b replays b's old answer."""
    recording = exchange(DiallerHandshake(KEY, "a"), ListenerHandshake(KEY, "b"))
    dialler = DiallerHandshake(KEY, "a", expected_peer="b")
    assert dialler.challenge().nonce != recording.challenge.nonce
    with pytest.raises(HandshakeFailed):
        dialler.answered(recording.answer.node, recording.answer.nonce,
                         recording.answer.proof)


def test_proof_for_other_ids_is_refused():
    """A proof is bound to both ids: one made for (a -> b) does not pass as (c -> b)."""
    nonce_d, nonce_l = b"d" * NONCE_BYTES, b"l" * NONCE_BYTES
    for dialler, target in (("a", "b"), ("c", "d"), ("b", "c")):
        listener = ListenerHandshake(KEY, "b", random_bytes=lambda n: nonce_l)
        listener.challenged("c", nonce_d)
        with pytest.raises(HandshakeFailed):
            listener.proved(make_proof(KEY, DIALLER, nonce_d, nonce_l, dialler, target))
    listener = ListenerHandshake(KEY, "b", random_bytes=lambda n: nonce_l)
    listener.challenged("c", nonce_d)
    assert listener.proved(make_proof(KEY, DIALLER, nonce_d, nonce_l, "c", "b")) == "c"


def test_dialler_refuses_a_listener_with_another_id():
    dialler = DiallerHandshake(KEY, "a", expected_peer="b")
    listener = ListenerHandshake(KEY, "c")  # knows the key, but is not b
    challenge = dialler.challenge()
    answer = listener.challenged(challenge.node, challenge.nonce)
    with pytest.raises(HandshakeFailed, match="dialled 'b' but the listener is 'c'"):
        dialler.answered(answer.node, answer.nonce, answer.proof)


def test_listener_refuses_a_non_member_before_proving_anything():
    listener = ListenerHandshake(KEY, "b", peers={"a"})
    with pytest.raises(HandshakeFailed, match="not a member"):
        listener.challenged("z", b"n" * NONCE_BYTES)
    assert listener.failed


@pytest.mark.parametrize("node", ["", "x" * 65, "a b", "a.b", "é", "a\n"])
def test_invalid_peer_ids_are_refused(node):
    with pytest.raises(HandshakeFailed) as caught:
        ListenerHandshake(KEY, "b").challenged(node, b"n" * NONCE_BYTES)
    assert "\n" not in str(caught.value)
    dialler = DiallerHandshake(KEY, "a")
    dialler.challenge()
    with pytest.raises(HandshakeFailed):
        dialler.answered(node, b"n" * NONCE_BYTES, b"p" * PROOF_BYTES)


def test_peer_claiming_our_own_id_is_refused():
    with pytest.raises(HandshakeFailed, match="own id"):
        ListenerHandshake(KEY, "b").challenged("b", b"n" * NONCE_BYTES)
    dialler = DiallerHandshake(KEY, "a")
    dialler.challenge()
    with pytest.raises(HandshakeFailed, match="own id"):
        dialler.answered("a", b"n" * NONCE_BYTES, b"p" * PROOF_BYTES)


@pytest.mark.parametrize("nonce", [b"", b"n" * (NONCE_BYTES - 1), b"n" * (NONCE_BYTES + 1),
                                   "n" * NONCE_BYTES, None])
def test_nonce_of_wrong_length_or_type_is_refused(nonce):
    with pytest.raises(HandshakeFailed):
        ListenerHandshake(KEY, "b").challenged("a", nonce)
    dialler = DiallerHandshake(KEY, "a")
    dialler.challenge()
    with pytest.raises(HandshakeFailed):
        dialler.answered("b", nonce, b"p" * PROOF_BYTES)


@pytest.mark.parametrize("proof", [b"", b"p", b"p" * 31, b"p" * 33, b"p" * 1000, None, "p" * 32])
def test_malformed_proofs_are_refused(proof):
    listener = ListenerHandshake(KEY, "b")
    listener.challenged("a", b"n" * NONCE_BYTES)
    with pytest.raises(HandshakeFailed):
        listener.proved(proof)


def test_steps_out_of_order_fail_and_stay_failed():
    listener = ListenerHandshake(KEY, "b")
    with pytest.raises(HandshakeFailed, match="out of order"):
        listener.proved(b"p" * PROOF_BYTES)
    assert listener.failed
    with pytest.raises(HandshakeFailed):  # no second chance after a failure
        listener.challenged("a", b"n" * NONCE_BYTES)

    dialler = DiallerHandshake(KEY, "a")
    with pytest.raises(HandshakeFailed, match="out of order"):
        dialler.answered("b", b"n" * NONCE_BYTES, b"p" * PROOF_BYTES)
    with pytest.raises(HandshakeFailed):
        dialler.challenge()


def test_no_step_can_be_repeated():
    dialler = DiallerHandshake(KEY, "a")
    challenge = dialler.challenge()
    with pytest.raises(HandshakeFailed):
        dialler.challenge()
    assert dialler.failed

    dialler = DiallerHandshake(KEY, "a")
    listener = ListenerHandshake(KEY, "b")
    recording = exchange(dialler, listener)
    with pytest.raises(HandshakeFailed):  # a second challenge on a proven link
        listener.challenged(challenge.node, challenge.nonce)
    with pytest.raises(HandshakeFailed):
        listener.proved(recording.proof)
    with pytest.raises(HandshakeFailed):
        dialler.answered(recording.answer.node, recording.answer.nonce, recording.answer.proof)


def test_failed_listener_after_bad_proof_refuses_the_right_one():
    """A guess costs the whole connection: no retries on one handshake."""
    dialler = DiallerHandshake(KEY, "a")
    listener = ListenerHandshake(KEY, "b")
    challenge = dialler.challenge()
    answer = listener.challenged(challenge.node, challenge.nonce)
    good = dialler.answered(answer.node, answer.nonce, answer.proof)
    with pytest.raises(HandshakeFailed):
        listener.proved(bytes(PROOF_BYTES))
    with pytest.raises(HandshakeFailed):
        listener.proved(good)
    assert listener.peer is None


def test_bad_construction_is_a_programming_error():
    with pytest.raises(ValueError):
        DiallerHandshake(b"", "a")
    with pytest.raises(ValueError):
        ListenerHandshake(KEY, "not valid")
    with pytest.raises(ValueError):
        DiallerHandshake(KEY, "a", random_bytes=lambda n: b"short").challenge()


def test_transcript_fields_cannot_run_into_each_other():
    """Moving bytes between adjacent fields always changes the transcript."""
    nonce = b"n" * NONCE_BYTES
    assert transcript(DIALLER, nonce, nonce, "ab", "c") != transcript(
        DIALLER, nonce, nonce, "a", "bc")
    assert transcript(DIALLER, b"ab", b"c", "x", "y") != transcript(
        DIALLER, b"a", b"bc", "x", "y")
    assert transcript(DIALLER, nonce, nonce, "a", "b") != transcript(
        LISTENER, nonce, nonce, "a", "b")


@settings(max_examples=200)
@given(st.tuples(*[st.binary(max_size=12)] * 4), st.tuples(*[st.binary(max_size=12)] * 4))
def test_transcript_is_injective(first, second):
    def build(fields):
        role, d_nonce, l_nonce, ids = fields
        dialler, _, listener = ids.partition(b"|")
        return transcript(role, d_nonce, l_nonce,
                          dialler.decode("latin-1"), listener.decode("latin-1"))

    def key(fields):
        role, d_nonce, l_nonce, ids = fields
        dialler, _, listener = ids.partition(b"|")
        return (role, d_nonce, l_nonce, dialler, listener)

    if key(first) != key(second):
        assert build(first) != build(second)


# -- hypothesis: a correct exchange succeeds, any change fails -----------------

node_ids = st.from_regex(NODE_ID_RE, fullmatch=True)
keys = st.binary(min_size=16, max_size=64)
nonces = st.binary(min_size=NONCE_BYTES, max_size=NONCE_BYTES)


def flip(data: bytes, index: int, bit: int) -> bytes:
    index %= len(data)
    return data[:index] + bytes([data[index] ^ (1 << bit)]) + data[index + 1:]


@st.composite
def scenarios(draw):
    dialler_id, listener_id = draw(st.lists(node_ids, min_size=2, max_size=2, unique=True))
    return draw(keys), dialler_id, listener_id, draw(nonces), draw(nonces)


def pair(key_d, key_l, dialler_id, listener_id, nonce_d, nonce_l):
    return (DiallerHandshake(key_d, dialler_id, expected_peer=listener_id,
                             random_bytes=lambda n: nonce_d),
            ListenerHandshake(key_l, listener_id, random_bytes=lambda n: nonce_l))


@settings(max_examples=150)
@given(scenarios())
def test_correct_exchange_always_succeeds(scenario):
    key, dialler_id, listener_id, nonce_d, nonce_l = scenario
    dialler, listener = pair(key, key, dialler_id, listener_id, nonce_d, nonce_l)
    exchange(dialler, listener)
    assert dialler.peer == listener_id and listener.peer == dialler_id


@settings(max_examples=150)
@given(scenarios(), keys)
def test_different_keys_always_fail(scenario, other_key):
    key, dialler_id, listener_id, nonce_d, nonce_l = scenario
    if other_key == key:
        other_key = flip(key, 0, 0)
    for key_d, key_l in ((key, other_key), (other_key, key)):
        dialler, listener = pair(key_d, key_l, dialler_id, listener_id, nonce_d, nonce_l)
        challenge = dialler.challenge()
        answer = listener.challenged(challenge.node, challenge.nonce)
        with pytest.raises(HandshakeFailed):
            dialler.answered(answer.node, answer.nonce, answer.proof)
        # The listener, too, refuses what a wrong-key dialler would prove.
        forged = make_proof(key_d, DIALLER, nonce_d, nonce_l, dialler_id, listener_id)
        with pytest.raises(HandshakeFailed):
            listener.proved(forged)


TAMPERED_FIELDS = [
    "challenge.node", "challenge.nonce", "answer.node", "answer.nonce",
    "answer.proof", "proof",
]


@settings(max_examples=300)
@given(scenarios(), st.sampled_from(TAMPERED_FIELDS), st.integers(0, 10**6),
       st.integers(0, 7), node_ids)
def test_any_changed_id_nonce_or_proof_byte_fails(scenario, field, index, bit, other_id):
    """An on-path attacker changes one thing in flight: someone always refuses."""
    key, dialler_id, listener_id, nonce_d, nonce_l = scenario
    dialler, listener = pair(key, key, dialler_id, listener_id, nonce_d, nonce_l)

    def changed_id(node: str) -> str:
        return other_id if other_id != node else node + "x" if len(node) < 64 else "y"

    challenge = dialler.challenge()
    c_node, c_nonce = challenge.node, challenge.nonce
    if field == "challenge.node":
        c_node = changed_id(c_node)
    elif field == "challenge.nonce":
        c_nonce = flip(c_nonce, index, bit)
    try:
        answer = listener.challenged(c_node, c_nonce)
    except HandshakeFailed:
        assert field == "challenge.node"  # the changed id is the listener's own
        return
    a_node, a_nonce, a_proof = answer.node, answer.nonce, answer.proof
    if field == "answer.node":
        a_node = changed_id(a_node)
    elif field == "answer.nonce":
        a_nonce = flip(a_nonce, index, bit)
    elif field == "answer.proof":
        a_proof = flip(a_proof, index, bit)
    try:
        proof = dialler.answered(a_node, a_nonce, a_proof)
    except HandshakeFailed:
        assert field != "proof"
        return
    if field == "proof":
        proof = flip(proof, index, bit)
    with pytest.raises(HandshakeFailed):
        listener.proved(proof)
    assert not listener.done and listener.peer is None


@settings(max_examples=100)
@given(scenarios())
def test_replayed_exchange_never_passes_a_fresh_listener(scenario):
    key, dialler_id, listener_id, nonce_d, nonce_l = scenario
    dialler, listener = pair(key, key, dialler_id, listener_id, nonce_d, nonce_l)
    recording = exchange(dialler, listener)
    fresh = ListenerHandshake(key, listener_id)  # a real, random nonce
    fresh.challenged(recording.challenge.node, recording.challenge.nonce)
    with pytest.raises(HandshakeFailed):
        fresh.proved(recording.proof)


# -- the commands over AMP ----------------------------------------------------


class Listener(amp.AMP):
    """Answers the two commands as a dqid listener would."""

    def __init__(self, key: bytes, node: str) -> None:
        super().__init__()
        self.handshake = ListenerHandshake(key, node)

    @AuthChallenge.responder
    def challenge(self, node: str, nonce: bytes) -> dict:
        answer = self.handshake.challenged(node, nonce)
        return {"node": answer.node, "nonce": answer.nonce, "proof": answer.proof}

    @AuthProve.responder
    def prove(self, proof: bytes) -> dict:
        self.handshake.proved(proof)
        return {}


def amp_pair(listener_key: bytes):
    client, server, pump = iosim.connectedServerAndClient(
        lambda: Listener(listener_key, "b"), amp.AMP)
    return client, server, pump


def call(client: amp.AMP, pump: iosim.IOPump, command, **kw):
    results: list = []
    client.callRemote(command, **kw).addBoth(results.append)
    pump.flush()
    (result,) = results
    return result


def test_handshake_over_amp_succeeds():
    client, server, pump = amp_pair(KEY)
    dialler = DiallerHandshake(KEY, "a", expected_peer="b")
    challenge = dialler.challenge()
    answer = call(client, pump, AuthChallenge, node=challenge.node, nonce=challenge.nonce)
    proof = dialler.answered(answer["node"], answer["nonce"], answer["proof"])
    assert call(client, pump, AuthProve, proof=proof) == {}
    assert server.handshake.done and server.handshake.peer == "a"
    assert not pump.serverIO.disconnecting


def test_bad_proof_over_amp_is_auth_failed_and_closes_the_connection():
    client, server, pump = amp_pair(KEY)
    dialler = DiallerHandshake(OTHER_KEY, "a")
    challenge = dialler.challenge()
    call(client, pump, AuthChallenge, node=challenge.node, nonce=challenge.nonce)
    failure = call(client, pump, AuthProve, proof=b"p" * PROOF_BYTES)
    assert failure.check(HandshakeFailed)
    assert "did not prove" in str(failure.value)
    assert pump.serverIO.disconnecting or pump.serverIO.disconnected
    assert not server.handshake.done


def test_out_of_order_over_amp_is_auth_failed():
    client, server, pump = amp_pair(KEY)
    failure = call(client, pump, AuthProve, proof=b"p" * PROOF_BYTES)
    assert failure.check(HandshakeFailed)
    assert pump.serverIO.disconnecting or pump.serverIO.disconnected

"""Mutual challenge-response that starts every AMP connection between peers.

Pure state, no reactor: the protocol feeds in what arrived and sends what
comes back.  Both sides prove they hold the cluster key without sending it::

    dialler                                         listener
    ---- AuthChallenge(node=D, nonce=Nd) ------------------>
    <--- (node=L, nonce=Nl, proof=MAC("listener", ...)) ----   checks nothing yet
    checks the listener's proof
    ---- AuthProve(proof=MAC("dialler", ...)) ------------->   checks the dialler's proof

Each MAC is HMAC-SHA256 under the cluster key over a transcript that binds
the role, both nonces and both node ids, every field length-prefixed so no
two different transcripts encode to the same bytes.  The role label makes
the dialler's and the listener's proofs differ, so a proof reflected back
to its sender fails; each side's fresh 32-byte nonce makes a recorded
exchange useless on any later connection (the other side's nonce differs,
so a replayed proof never matches).  Proofs are compared with
:func:`hmac.compare_digest`.

A handshake object is single use: any failure, or any step out of order,
raises :class:`HandshakeFailed` and leaves the object failed for good.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from typing import Callable, Collection

from .ids import is_valid_node_id

NONCE_BYTES = 32
PROOF_BYTES = hashlib.sha256().digest_size
SCHEME = b"dqid-auth-1"  # changes if the transcript ever does
DIALLER = b"dqid-dialler"
LISTENER = b"dqid-listener"

RandomBytes = Callable[[int], bytes]


class HandshakeFailed(Exception):
    """The peer did not prove the cluster key, or broke the handshake's order.

    The message is one line for the log; it never holds key material.
    """


@dataclass(frozen=True, slots=True)
class Challenge:
    """What the dialler sends first (``AuthChallenge``'s arguments)."""

    node: str
    nonce: bytes


@dataclass(frozen=True, slots=True)
class Answer:
    """The listener's reply to a challenge (``AuthChallenge``'s response)."""

    node: str
    nonce: bytes
    proof: bytes


def transcript(role: bytes, dialler_nonce: bytes, listener_nonce: bytes,
               dialler: str, listener: str) -> bytes:
    """The bytes a proof covers: every field with a 4-byte length before it."""
    fields = (SCHEME, role, dialler_nonce, listener_nonce,
              dialler.encode("utf-8"), listener.encode("utf-8"))
    return b"".join(struct.pack(">I", len(field)) + field for field in fields)


def make_proof(key: bytes, role: bytes, dialler_nonce: bytes, listener_nonce: bytes,
               dialler: str, listener: str) -> bytes:
    message = transcript(role, dialler_nonce, listener_nonce, dialler, listener)
    return hmac.new(key, message, hashlib.sha256).digest()


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes) or not key:
        raise ValueError("the cluster key must be non-empty bytes")
    return key


def _check_peer_id(node: object, own: str) -> str:
    if not isinstance(node, str) or not is_valid_node_id(node):
        raise HandshakeFailed(f"peer sent an invalid node id {str(node)[:80]!r}")
    if node == own:
        raise HandshakeFailed(f"peer claims this node's own id {node!r}")
    return node


def _check_nonce(nonce: object) -> bytes:
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
        raise HandshakeFailed(f"peer sent a nonce that is not {NONCE_BYTES} bytes")
    return nonce


def _proof_matches(sent: object, expected: bytes) -> bool:
    return isinstance(sent, bytes) and hmac.compare_digest(sent, expected)


class _Handshake:
    """What both sides share: the key, this node's id, the step reached."""

    def __init__(self, key: bytes, node: str, random_bytes: RandomBytes) -> None:
        if not is_valid_node_id(node):
            raise ValueError(f"invalid node id {node!r}")
        self._key = _check_key(key)
        self.node = node
        self._random_bytes = random_bytes
        self._step = "start"
        self.peer: str | None = None  # the proven peer id, once done

    @property
    def done(self) -> bool:
        """True once the peer has proven the key (and only then)."""
        return self._step == "done"

    @property
    def failed(self) -> bool:
        return self._step == "failed"

    def _expect(self, step: str, doing: str) -> None:
        if self._step != step:
            was = self._step
            self._step = "failed"
            raise HandshakeFailed(f"{doing} out of order (handshake {was})")

    def _fail(self, reason: str) -> HandshakeFailed:
        self._step = "failed"
        return HandshakeFailed(reason)

    def _fresh_nonce(self) -> bytes:
        nonce = self._random_bytes(NONCE_BYTES)
        if len(nonce) != NONCE_BYTES:
            raise ValueError("random source gave a nonce of the wrong length")
        return nonce


class DiallerHandshake(_Handshake):
    """The side that opened the connection.

    ``expected_peer``, when given, is the node id this dial meant to reach:
    a listener that proves the key under another id is refused.
    """

    def __init__(self, key: bytes, node: str, expected_peer: str | None = None,
                 random_bytes: RandomBytes = os.urandom) -> None:
        super().__init__(key, node, random_bytes)
        self.expected_peer = expected_peer
        self._nonce = b""

    def challenge(self) -> Challenge:
        """Step 1: the ``AuthChallenge`` to send."""
        self._expect("start", "challenge")
        self._nonce = self._fresh_nonce()
        self._step = "challenged"
        return Challenge(self.node, self._nonce)

    def answered(self, node: str, nonce: bytes, proof: bytes) -> bytes:
        """Step 2: check the listener's answer; the proof to send in ``AuthProve``.

        Raises :class:`HandshakeFailed` if the listener did not prove the key
        (the connection is then to be closed, and nothing sent).
        """
        self._expect("challenged", "answer")
        try:
            listener = _check_peer_id(node, self.node)
            listener_nonce = _check_nonce(nonce)
        except HandshakeFailed:
            self._step = "failed"
            raise
        if self.expected_peer is not None and listener != self.expected_peer:
            raise self._fail(
                f"dialled {self.expected_peer!r} but the listener is {listener!r}")
        expected = make_proof(self._key, LISTENER, self._nonce, listener_nonce,
                              self.node, listener)
        if not _proof_matches(proof, expected):
            raise self._fail(f"listener {listener!r} did not prove the cluster key")
        self.peer = listener
        self._step = "done"
        return make_proof(self._key, DIALLER, self._nonce, listener_nonce,
                          self.node, listener)


class ListenerHandshake(_Handshake):
    """The side that accepted the connection.

    ``peers``, when given, are the node ids allowed to dial in; another id is
    refused before any proof is computed for it.
    """

    def __init__(self, key: bytes, node: str, peers: Collection[str] | None = None,
                 random_bytes: RandomBytes = os.urandom) -> None:
        super().__init__(key, node, random_bytes)
        self.peers = peers
        self._dialler = ""
        self._dialler_nonce = b""
        self._nonce = b""

    def challenged(self, node: str, nonce: bytes) -> Answer:
        """Step 1: answer the dialler's ``AuthChallenge``."""
        self._expect("start", "challenge")
        try:
            dialler = _check_peer_id(node, self.node)
            dialler_nonce = _check_nonce(nonce)
        except HandshakeFailed:
            self._step = "failed"
            raise
        if self.peers is not None and dialler not in self.peers:
            raise self._fail(f"{dialler!r} is not a member of this cluster")
        self._dialler, self._dialler_nonce = dialler, dialler_nonce
        self._nonce = self._fresh_nonce()
        self._step = "answered"
        proof = make_proof(self._key, LISTENER, dialler_nonce, self._nonce,
                           dialler, self.node)
        return Answer(self.node, self._nonce, proof)

    def proved(self, proof: bytes) -> str:
        """Step 2: check the dialler's ``AuthProve``; the proven peer id."""
        self._expect("answered", "proof")
        expected = make_proof(self._key, DIALLER, self._dialler_nonce, self._nonce,
                              self._dialler, self.node)
        if not _proof_matches(proof, expected):
            raise self._fail(f"{self._dialler!r} did not prove the cluster key")
        self.peer = self._dialler
        self._step = "done"
        return self._dialler

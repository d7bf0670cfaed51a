"""The two AMP commands that authenticate a connection between peers.

They come before any other command on a connection (before ``Hello``): the
dialler calls :class:`AuthChallenge`, checks the answer with
:class:`dqid.handshake.DiallerHandshake`, then calls :class:`AuthProve`.
The listener answers them with :class:`dqid.handshake.ListenerHandshake`.
:class:`~dqid.handshake.HandshakeFailed` is a *fatal* error: AMP sends the
error box (code ``AUTH_FAILED``) and then closes the connection.
"""

from __future__ import annotations

from twisted.protocols import amp

from .handshake import HandshakeFailed

AUTH_ERRORS = {HandshakeFailed: b"AUTH_FAILED"}


class AuthChallenge(amp.Command):
    """The dialler's id and fresh nonce; the listener answers with its own and its proof.

    ``proof`` is HMAC-SHA256 under the cluster key over both nonces, both
    ids and the listener's role (see :mod:`dqid.handshake`).
    """

    arguments = [
        (b"node", amp.Unicode()),
        (b"nonce", amp.String()),
    ]
    response = [
        (b"node", amp.Unicode()),
        (b"nonce", amp.String()),
        (b"proof", amp.String()),
    ]
    fatalErrors = AUTH_ERRORS


class AuthProve(amp.Command):
    """The dialler's proof of the cluster key, over the same transcript in its own role."""

    arguments = [
        (b"proof", amp.String()),
    ]
    response: list = []
    fatalErrors = AUTH_ERRORS

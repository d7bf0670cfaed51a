"""The AMP protocol between peers: responders delegate to a Handlers.

Every connection starts with the mutual challenge-response of
:mod:`dqid.handshake` (``AuthChallenge``, ``AuthProve``): until the other
side has proven the cluster key, no other command is answered, and a
failure closes the connection and is logged with the remote address,
changing nothing.  Then the side that dialled sends
:class:`~dqid.amp_commands.Hello`, and from then on either side may call any
command on the connection.  This module knows the commands, not the
cluster: it is written against :class:`Handlers`, which the cluster is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from . import amp_commands as cmd
from . import amp_framing
from .amp_commands import negotiate
from .amp_framing import BoxReader
from .auth_commands import AuthChallenge, AuthProve
from .handshake import DiallerHandshake, HandshakeFailed, ListenerHandshake
from .node import LeaseChange
from .tombstones import Tombstones
from .wire import (
    MAX_EPOCH, WireError, checked_count, checked_epoch, checked_message_id,
    checked_node_id, checked_seconds, decode_tombstones,
)

__all__ = ["Handlers", "PeerAuth", "PeerFactory", "PeerProtocol", "negotiate"]

# Largest values a peer may send: a lease (as the HTTP API allows), a take.
MAX_VISIBILITY = 43200.0
MAX_TAKE = 1000
MAX_HELD = 1000
MAX_IDS = 100_000

# Unanswered commands and the methods that take them (see _receive_unanswered).
_UNANSWERED = {cmd.Stream.commandName: (cmd.Stream, "stream"),
               cmd.Copied.commandName: (cmd.Copied, "copied")}

_AUTH_COMMANDS = frozenset({AuthChallenge.commandName, AuthProve.commandName})

# The longest box read before the other side has proven the cluster key (the
# handshake's boxes take about 200 bytes): an outsider cannot make a node
# hold more than that of what it sends.
UNAUTHENTICATED_BOX_BYTES = 4096


@dataclass(frozen=True)
class PeerAuth:
    """What a connection needs to prove itself and check the other side."""

    key: bytes  # the cluster key; never sent
    node: str  # this node's id
    members: frozenset[str]  # the other nodes' ids, allowed to dial in
    clock: IReactorTime
    timeout: float  # a connection not authenticated by then is closed


class Handlers(Protocol):
    """What answers the commands of a peer (the cluster)."""

    def say_hello(self, link: "PeerProtocol") -> None: ...

    def link_down(self, link: "PeerProtocol") -> None: ...

    def on_hello(self, link: "PeerProtocol", version_min: int, version_max: int,
                 node: str, epoch: int, cluster: list[str]) -> dict: ...

    def on_announce(self, link: "PeerProtocol", node: str, epoch: int) -> None: ...

    def on_heartbeat(self, link: "PeerProtocol", epoch: int, ready: int,
                     serving: bool) -> dict: ...

    def on_stream(self, link: "PeerProtocol", epoch: int, seq: int | None,
                  records: bytes | None, run: bytes | None, states: bytes | None,
                  tombstones: bytes | None) -> None: ...

    def on_copied(self, link: "PeerProtocol", upto: int, holder: bool,
                  refused: str | None) -> None: ...

    def on_ack(self, ids: list[str]) -> Deferred: ...

    def on_lease(self, message_id: str, change: LeaseChange) -> str: ...

    def on_peek(self, message_id: str) -> dict: ...

    def on_held_list(self, count: int) -> bytes: ...

    def on_key_lookup(self, asker: str, key: str, digest: bytes) -> Deferred: ...

    def on_take(self, count: int, visibility: float) -> dict: ...

    def on_sync_start(self, seen: Tombstones | None) -> dict: ...

    def on_sync_page(self, token: str) -> dict: ...

    def on_node_stats(self) -> bytes: ...


class PeerProtocol(amp.AMP):
    log = Logger()

    def __init__(self, handlers: Handlers, auth: PeerAuth,
                 dialled: str | None = None) -> None:
        super().__init__()
        self.handlers = handlers
        self.auth = auth
        self.dialled = dialled  # the peer id we connected out to, if any
        self.peer_id: str | None = None
        self.peer_epoch = 0
        self.version = 0
        self.software: str | None = None  # the peer's dqid release, from Hello
        self.authenticated = False  # the other side proved the cluster key
        self._handshake: DiallerHandshake | ListenerHandshake | None = None
        self._auth_timer: IDelayedCall | None = None
        self._address: str | None = None
        self._reader = BoxReader(box_limit=UNAUTHENTICATED_BOX_BYTES)

    def connectionMade(self) -> None:
        super().connectionMade()
        # Small request/answer boxes: without this, Nagle's algorithm and
        # the peer's delayed ACK hold many of them ~40 ms.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        self.remote_address()
        self._auth_timer = self.auth.clock.callLater(self.auth.timeout, self._auth_timed_out)
        if self.dialled is not None:
            self._challenge()

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        if self.authenticated:
            self.handlers.link_down(self)
        elif self._auth_timer is not None:  # not refused here: the other side left
            self.log.warn("refused peer connection from {address}: it closed and "
                          "did not prove the cluster key (a wrong key?)",
                          address=self.remote_address())
        self._cancel_auth_timer()

    def dataReceived(self, data: bytes) -> None:
        """AMP's boxes, read a buffer at a time (:mod:`dqid.amp_framing`)
        rather than a string at a time; what is done with each box is
        AMP's, except that the stream's unanswered boxes, once the peer is
        authenticated, go straight to their method."""
        if self.innerProtocol is not None:  # never switched here; as AMP does
            self.innerProtocol.dataReceived(data)
            return
        self._justStartedTLS = False
        reader = self._reader
        boxes = reader.feed(data)
        while boxes:
            for box in boxes:
                self._box_received(box)
            boxes = reader.feed(b"")
        if reader.key_too_long:
            self.lengthLimitExceeded(amp_framing.MAX_KEY_LENGTH + 1)
        elif reader.box_too_long and self.transport is not None:
            self._refuse(f"a box of over {UNAUTHENTICATED_BOX_BYTES} bytes before authentication")

    def _box_received(self, box: dict[bytes, bytes]) -> None:
        unanswered = _UNANSWERED.get(box.get(amp.COMMAND, b"")) if self.authenticated else None
        if unanswered is None or amp.ASK in box:
            self.ampBoxReceived(amp.AmpBox(box))
            return
        command, method = unanswered
        try:
            self._receive_unanswered(command, method, box)
        except Exception as error:  # as dispatchCommand: logged, dropped
            self._bad_input(WireError(f"arguments not understood: {error!r}"[:200]),
                            command.__name__)

    def dispatchCommand(self, box: amp.AmpBox) -> Deferred:
        """As AMP does, except that arguments AMP cannot parse (a forged
        chunk count, a word where a number goes, a missing argument) answer
        BAD_INPUT with a log line and keep the link, like the responders'
        own checks.  AMP parses while it calls the responder, before the
        responder's code runs, so a parse error is the one raised at once;
        an error of the responder's code comes back in its Deferred."""
        name = box[amp.COMMAND]
        responder = self.locateResponder(name)
        if responder is None:
            return fail(amp.RemoteAmpError(
                amp.UNHANDLED_ERROR_CODE, f"Unhandled Command: {name!r}", False,
                local=Failure(amp.UnhandledCommand())))
        try:
            return responder(box)
        except Exception as error:
            command = name.decode("ascii", "replace")
            self._bad_input(WireError(f"arguments not understood: {error!r}"[:200]), command)
            if amp.ASK not in box:  # unanswered (Stream, Copied): dropped
                return succeed(None)
            return fail(amp.RemoteAmpError(b"BAD_INPUT", "arguments not understood"))

    # -- authentication ------------------------------------------------------

    def remote_address(self) -> str:
        """HOST:PORT of the other side (kept from when it connected)."""
        if self._address is None:
            peer = getattr(self.transport, "getPeer", None)
            address = peer() if peer is not None else None
            host, port = getattr(address, "host", None), getattr(address, "port", None)
            self._address = f"{host}:{port}" if host is not None else str(address)
        return self._address

    def _refuse(self, why: str) -> None:
        """The other side did not authenticate: log, close, change nothing
        (and read nothing more of what it sent)."""
        self.log.warn("refused peer connection from {address}: {why}",
                      address=self.remote_address(), why=why)
        self._cancel_auth_timer()
        self._reader.stop()
        self.transport.loseConnection()

    def _cancel_auth_timer(self) -> None:
        if self._auth_timer is not None and self._auth_timer.active():
            self._auth_timer.cancel()
        self._auth_timer = None

    def _auth_timed_out(self) -> None:
        self._auth_timer = None
        if not self.authenticated:
            self._refuse("no authentication in time")

    def _authenticated(self, peer: str) -> None:
        self.authenticated = True
        self._reader.box_limit = None  # a peer's boxes carry its records
        self._cancel_auth_timer()
        self.log.debug("peer {peer} at {address} proved the cluster key",
                       peer=peer, address=self.remote_address())

    def _challenge(self) -> None:
        auth = self.auth
        handshake = self._handshake = DiallerHandshake(auth.key, auth.node, self.dialled)
        challenge = handshake.challenge()
        d = self.callRemote(AuthChallenge, node=challenge.node, nonce=challenge.nonce)
        d.addCallback(self._challenge_answered, handshake)
        d.addCallback(lambda _: self.handlers.say_hello(self) if self.authenticated else None)
        d.addErrback(self._dial_auth_failed)

    def _challenge_answered(self, answer: dict, handshake: DiallerHandshake) -> Deferred:
        if answer["node"] != self.dialled:
            self.log.error(
                "peer at {address} says it is {node}, not {expected}; check --peer",
                address=self.remote_address(), node=answer["node"], expected=self.dialled)
        proof = handshake.answered(answer["node"], answer["nonce"], answer["proof"])
        d = self.callRemote(AuthProve, proof=proof)
        d.addCallback(lambda _: self._authenticated(answer["node"]))
        return d

    def _dial_auth_failed(self, failure: Failure) -> None:
        self._refuse(f"authentication failed: {failure.getErrorMessage()}")

    def locateResponder(self, name: bytes) -> Callable[[amp.AmpBox], Deferred] | None:
        """Answer nothing but the handshake until the peer is authenticated;
        then the unanswered commands take the lean path."""
        if self.authenticated or name in _AUTH_COMMANDS:
            unanswered = _UNANSWERED.get(name) if self.authenticated else None
            if unanswered is not None:
                command, method = unanswered
                return lambda box: succeed(self._receive_unanswered(command, method, box))
            return super().locateResponder(name)
        self._refuse(f"{name.decode('ascii', 'replace')!r} before authentication")
        return lambda box: Deferred()  # never answered; the connection closes

    @AuthChallenge.responder
    def auth_challenge(self, node: str, nonce: bytes) -> dict:
        if self.dialled is not None or self._handshake is not None:
            self._refuse("a second or crossed challenge")
            raise HandshakeFailed("unexpected challenge")
        auth = self.auth
        handshake = self._handshake = ListenerHandshake(auth.key, auth.node, auth.members)
        try:
            answer = handshake.challenged(node, nonce)
        except HandshakeFailed as error:
            self._refuse(str(error))
            raise
        return {"node": answer.node, "nonce": answer.nonce, "proof": answer.proof}

    @AuthProve.responder
    def auth_prove(self, proof: bytes) -> dict:
        handshake = self._handshake
        if not isinstance(handshake, ListenerHandshake):
            self._refuse("a proof without a challenge")
            raise HandshakeFailed("unexpected proof")
        try:
            peer = handshake.proved(proof)
        except HandshakeFailed as error:
            self._refuse(str(error))
            raise
        self._authenticated(peer)
        return {}

    # -- the replication stream: unanswered commands, on the lean path -----

    def send(self, command: type[amp.Command], **values: Any) -> None:
        """Send an unanswered command (Stream, Copied); nothing comes back,
        and on a closed link nothing goes."""
        if self.transport is not None:
            self.transport.write(cmd.encode_unanswered(command, values))

    def _receive_unanswered(self, command: type[amp.Command], method: str,
                            box: Mapping[bytes, bytes]) -> None:
        try:
            values = cmd.decode_unanswered(command, box)
        except WireError as error:
            self._bad_input(error, command.__name__)
        else:
            getattr(self, method)(**values)

    # -- the cluster's commands ----------------------------------------------

    def _from_peer(self) -> str:
        if self.peer_id is None:
            raise cmd.NotHolder("say Hello first")
        return self.peer_id

    def _bad_input(self, error: WireError, command: str) -> WireError:
        self.log.warn("bad {command} from peer {peer} at {address}: {error}",
                      command=command, peer=self.peer_id, address=self.remote_address(),
                      error=str(error))
        return error

    @cmd.Hello.responder
    def hello(self, version_min: int, version_max: int, node: str, epoch: int,
              cluster: list[str], software: str | None = None) -> dict:
        try:
            checked_node_id(node)
            checked_epoch(epoch)
            for member in cluster:
                checked_node_id(member)
        except WireError as error:
            raise self._bad_input(error, "Hello") from None
        # Only logged: kept short and printable (None from an older dqid).
        self.software = None if software is None else "".join(
            c for c in software[:64] if c.isprintable())
        return self.handlers.on_hello(self, version_min, version_max, node, epoch, cluster)

    @cmd.Announce.responder
    def announce(self, node: str, epoch: int) -> dict:
        self._from_peer()
        try:
            checked_epoch(epoch)
        except WireError as error:
            raise self._bad_input(error, "Announce") from None
        self.handlers.on_announce(self, node, epoch)
        return {}

    @cmd.Heartbeat.responder
    def heartbeat(self, node: str, epoch: int, ready: int, serving: bool) -> dict:
        self._from_peer()
        try:
            checked_epoch(epoch)
            checked_count(ready, MAX_EPOCH)
        except WireError as error:
            raise self._bad_input(error, "Heartbeat") from None
        return self.handlers.on_heartbeat(self, epoch, ready, serving)

    def stream(self, epoch: int, seq: int | None = None, records: bytes | None = None,
               run: bytes | None = None, states: bytes | None = None,
               tombstones: bytes | None = None) -> None:
        # Unanswered: a bad box is logged and dropped, the link stays.
        if self.peer_id is None:
            self._bad_input(WireError("Stream before Hello"), "Stream")
            return
        try:
            checked_epoch(epoch)
            if seq is not None:
                checked_count(seq, MAX_EPOCH)
        except WireError as error:
            self._bad_input(error, "Stream")
            return
        if run is not None and self.version < cmd.PACKED_RUNS:
            self._bad_input(WireError(f"a packed run in protocol {self.version}"), "Stream")
            return
        self.handlers.on_stream(self, epoch, seq, records, run, states, tombstones)

    def copied(self, upto: int, holder: bool, refused: str | None = None) -> None:
        if self.peer_id is None:
            self._bad_input(WireError("Copied before Hello"), "Copied")
            return
        try:
            checked_count(upto, MAX_EPOCH)
            if refused is not None and refused not in cmd.REFUSAL_CODES:
                raise WireError(f"not a refusal: {refused[:20]!r}")
        except WireError as error:
            self._bad_input(error, "Copied")
            return
        self.handlers.on_copied(self, upto, holder, refused)

    @cmd.Ack.responder
    def ack(self, ids: list[str]) -> dict:
        self._from_peer()
        try:
            checked_count(len(ids), MAX_IDS)
        except WireError as error:
            raise self._bad_input(error, "Ack") from None
        answered = self.handlers.on_ack(ids)
        return answered.addCallback(lambda outcome: {"acked": outcome[0],
                                                     "unknown": outcome[1]})

    @cmd.Lease.responder
    def lease(self, id: str, action: str, receipt: str | None = None,
              visibility: float | None = None, delay: float | None = None) -> dict:
        self._from_peer()
        try:
            checked_message_id(id)
            if action not in ("nack", "touch", "kick"):
                raise WireError(f"not a lease action: {action[:20]!r}")
            if (action == "kick") != (receipt is None):
                raise WireError("nack and touch need a receipt, kick has none")
            change = LeaseChange(
                action, receipt,
                visibility=checked_seconds(visibility, 0.001, MAX_VISIBILITY)
                if action == "touch" else 0.0,
                delay=checked_seconds(delay, 0.0, MAX_VISIBILITY) if delay is not None
                else 0.0)
        except WireError as error:
            raise self._bad_input(error, "Lease") from None
        return {"outcome": self.handlers.on_lease(id, change)}

    @cmd.Peek.responder
    def peek(self, id: str) -> dict:
        self._from_peer()
        try:
            checked_message_id(id)
        except WireError as error:
            raise self._bad_input(error, "Peek") from None
        return self.handlers.on_peek(id)

    @cmd.HeldList.responder
    def held_list(self, count: int) -> dict:
        self._from_peer()
        try:
            checked_count(count, MAX_HELD)
        except WireError as error:
            raise self._bad_input(error, "HeldList") from None
        return {"records": self.handlers.on_held_list(count)}

    @cmd.KeyLookup.responder
    def key_lookup(self, key: str, digest: bytes) -> Any:
        return self.handlers.on_key_lookup(self._from_peer(), key, digest)

    @cmd.Take.responder
    def take(self, count: int, visibility: float) -> dict:
        self._from_peer()
        try:
            checked_count(count, MAX_TAKE)
            checked_seconds(visibility, 0.001, MAX_VISIBILITY)
        except WireError as error:
            raise self._bad_input(error, "Take") from None
        return self.handlers.on_take(count, visibility)

    @cmd.SyncStart.responder
    def sync_start(self, seen: bytes | None) -> dict:
        self._from_peer()
        try:
            summary = None if seen is None else decode_tombstones(seen)
        except WireError as error:
            raise self._bad_input(error, "SyncStart") from None
        return self.handlers.on_sync_start(summary)

    @cmd.SyncPage.responder
    def sync_page(self, token: str) -> dict:
        self._from_peer()
        return self.handlers.on_sync_page(token)

    @cmd.NodeStats.responder
    def node_stats(self) -> dict:
        self._from_peer()
        return {"stats": self.handlers.on_node_stats()}


class PeerFactory(Factory):
    """Builds PeerProtocols for one side of the link."""

    noisy = False

    def __init__(self, handlers: Handlers, auth: PeerAuth,
                 dialled: str | None = None) -> None:
        self.handlers = handlers
        self.auth = auth
        self.dialled = dialled

    def buildProtocol(self, addr: Any) -> PeerProtocol:
        protocol = PeerProtocol(self.handlers, self.auth, self.dialled)
        protocol.factory = self
        return protocol

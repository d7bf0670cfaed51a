"""The test certificates of tests/tls_certs.py work for mutual TLS in Twisted.

DESIGN.md, Security: with ``--peer-tls-cert/-key/-ca`` the AMP listener and
every dial use TLS, each side verifying the other's certificate against the
CA.  Here, over a real loopback socket in the real reactor:
``PrivateCertificate.loadPEM(key + cert).options(Certificate.loadPEM(ca))``
on both ends links two nodes of one CA and each sees the other's node id as
the common name; a certificate from a foreign CA is refused, whichever end
holds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ClientEndpoint, SSL4ServerEndpoint
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate
from twisted.python.failure import Failure
from zope.interface import implementer

from .tls_certs import NodeFiles, make_pki

WITHIN = 10.0  # seconds before a test fails rather than hangs


def tls_options(node: NodeFiles, trusted_ca):
    """What a node with ``--peer-tls-cert/-key/-ca`` would build."""
    ca = Certificate.loadPEM(trusted_ca.read_bytes())
    return PrivateCertificate.loadPEM(node.key_and_cert_pem()).options(ca)


@dataclass
class Side:
    """What one end of a connection saw."""

    peer_name: bytes | None = None
    received: bytes = b""
    reason: Failure | None = None
    lost: Deferred = field(default_factory=Deferred)  # fires with None
    settled: Deferred = field(default_factory=Deferred)  # echoed or lost, first


@implementer(IHandshakeListener)
class Echo(Protocol):
    def __init__(self, side: Side) -> None:
        self.side = side

    def handshakeCompleted(self) -> None:
        self.side.peer_name = Certificate.peerFromTransport(self.transport).getSubject().commonName

    def dataReceived(self, data: bytes) -> None:
        self.side.received += data
        self.transport.write(data)

    def connectionLost(self, reason: Failure) -> None:
        self.side.reason = reason
        self.side.lost.callback(None)
        if not self.side.settled.called:
            self.side.settled.callback(None)


@implementer(IHandshakeListener)
class Ping(Protocol):
    def __init__(self, side: Side) -> None:
        self.side = side

    def connectionMade(self) -> None:
        self.transport.write(b"ping")  # sent once the handshake is done

    def handshakeCompleted(self) -> None:
        self.side.peer_name = Certificate.peerFromTransport(self.transport).getSubject().commonName

    def dataReceived(self, data: bytes) -> None:
        self.side.received += data
        if self.side.received == b"ping" and not self.side.settled.called:
            self.side.settled.callback(None)

    def connectionLost(self, reason: Failure) -> None:
        self.side.reason = reason
        self.side.lost.callback(None)
        if not self.side.settled.called:
            self.side.settled.callback(None)


async def connect(server_options, client_options) -> tuple[Side, Side]:
    """One connection over 127.0.0.1; both sides' view once it is closed."""
    server, client = Side(), Side()
    port = await SSL4ServerEndpoint(reactor, 0, server_options, interface="127.0.0.1").listen(
        Factory.forProtocol(lambda: Echo(server)))
    try:
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port, client_options)
        protocol = await endpoint.connect(Factory.forProtocol(lambda: Ping(client)))
        # Either the echo comes back (the link works) or the link is dropped.
        await client.settled.addTimeout(WITHIN, reactor)
        protocol.transport.loseConnection()
        await client.lost.addTimeout(WITHIN, reactor)
        await server.lost.addTimeout(WITHIN, reactor)
    finally:
        await port.stopListening()
    return server, client


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"), ["a", "b"], foreign=["b", "a"])


def test_files_are_pem_with_private_keys_private(pki):
    assert pki.ca.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    for node in (*pki.nodes.values(), *pki.foreign.values()):
        assert node.cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
        assert b"PRIVATE KEY" in node.key.read_bytes()
        assert node.key.stat().st_mode & 0o077 == 0
        cert = Certificate.loadPEM(node.cert.read_bytes())
        assert cert.getSubject().commonName == node.node_id.encode()


@pytest_twisted.ensureDeferred
async def test_two_nodes_of_one_ca_link_and_see_each_others_id(pki):
    server, client = await connect(tls_options(pki.nodes["a"], pki.ca),
                                   tls_options(pki.nodes["b"], pki.ca))
    assert client.received == b"ping" and server.received == b"ping"
    assert server.peer_name == b"b" and client.peer_name == b"a"


@pytest_twisted.ensureDeferred
async def test_client_with_a_foreign_ca_certificate_is_refused(pki):
    server, client = await connect(tls_options(pki.nodes["a"], pki.ca),
                                   tls_options(pki.foreign["b"], pki.ca))
    assert server.received == b"" and server.peer_name is None
    assert client.received == b""


@pytest_twisted.ensureDeferred
async def test_server_with_a_foreign_ca_certificate_is_refused(pki):
    server, client = await connect(tls_options(pki.foreign["a"], pki.ca),
                                   tls_options(pki.nodes["b"], pki.ca))
    assert client.received == b"" and client.peer_name is None
    assert server.received == b""


@pytest_twisted.ensureDeferred
async def test_a_foreign_pair_that_trusts_its_own_ca_cannot_join(pki):
    """Trusting only the cluster's CA, a node refuses even a fully consistent outsider."""
    server, client = await connect(tls_options(pki.nodes["a"], pki.ca),
                                   tls_options(pki.foreign["b"], pki.foreign_ca))
    assert server.received == b"" and client.received == b""
    assert server.peer_name is None

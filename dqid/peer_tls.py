"""Mutual TLS between peers (``--peer-tls-cert/-key/-ca``).

Both the AMP listener and every dial use TLS, and each side verifies the
other's certificate against the one CA: the listener asks every dialler for
a certificate the CA signed, and a dialler checks the listener's
certificate for the host it dialled (a name or an IP address in its
subjectAltName).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.protocols.tls import TLSMemoryBIOFactory


class PeerTLSError(Exception):
    """A certificate, key or CA file cannot be used; one line for the operator."""


def _read(option: str, path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise PeerTLSError(f"{option}: cannot read {path}: {error.strerror}") from None


@dataclass(frozen=True)
class PeerTLS:
    certificate: PrivateCertificate  # this node's, with its key
    authority: Certificate  # the CA every peer's certificate is signed by

    @classmethod
    def load(cls, cert_path: str, key_path: str, ca_path: str) -> "PeerTLS":
        cert = _read("--peer-tls-cert", cert_path)
        key = _read("--peer-tls-key", key_path)
        ca = _read("--peer-tls-ca", ca_path)
        try:
            authority = Certificate.loadPEM(ca)
        except Exception as error:
            raise PeerTLSError(f"--peer-tls-ca: {ca_path} is not a PEM certificate "
                               f"({error})") from None
        try:
            certificate = PrivateCertificate.loadPEM(cert + b"\n" + key)
        except Exception as error:
            raise PeerTLSError(f"--peer-tls-cert/--peer-tls-key: {cert_path} and "
                               f"{os.path.basename(key_path)} are not a PEM certificate "
                               f"and its key ({error})") from None
        return cls(certificate, authority)

    def server_factory(self, factory: IProtocolFactory) -> TLSMemoryBIOFactory:
        """``factory`` behind TLS that demands a client certificate of the CA."""
        options = self.certificate.options(self.authority)
        return TLSMemoryBIOFactory(options, False, factory)

    def client_endpoint(self, endpoint: IStreamClientEndpoint, host: str) -> Any:
        """``endpoint`` behind TLS that presents this node's certificate and
        verifies ``host``'s against the CA."""
        options = optionsForClientTLS(host, trustRoot=self.authority,
                                      clientCertificate=self.certificate)
        return wrapClientTLS(options, endpoint)

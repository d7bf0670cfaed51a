"""Throw-away certificates for TLS tests: a CA, node certificates it signs,
and a second, foreign CA with certificates of its own.

Every certificate is for 127.0.0.1 and localhost (subject alternative
names) with the node id as its common name, and may serve both ends of a
link (server and client auth).  Keys are EC P-256, quick to make.  Files are
PEM, keys mode 0600::

    pki = make_pki(tmp_path, ["a", "b"], foreign=["a"])
    pki.nodes["a"].cert, pki.nodes["a"].key, pki.ca       # --peer-tls-cert/-key/-ca
    pki.foreign["a"]                                       # same id, other CA
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_FOR = datetime.timedelta(days=30)


@dataclass(frozen=True)
class NodeFiles:
    """One node's certificate and key, and the CA that signed them."""

    node_id: str
    cert: Path
    key: Path
    ca: Path

    def key_and_cert_pem(self) -> bytes:
        """Key and certificate in one PEM, as ``PrivateCertificate.loadPEM`` wants."""
        return self.key.read_bytes() + self.cert.read_bytes()


@dataclass
class Authority:
    """A CA: its key and certificate, kept in memory to sign with."""

    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str) -> "Authority":
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        public = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + VALID_FOR)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False,
                    key_encipherment=False, data_encipherment=False, key_agreement=False,
                    key_cert_sign=True, crl_sign=True, encipher_only=False,
                    decipher_only=False),
                critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(name, key, cert)

    def issue(self, node_id: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A key and a certificate for ``node_id`` on 127.0.0.1 / localhost."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        public = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
            .issuer_name(self.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + VALID_FOR)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False,
                    key_encipherment=False, data_encipherment=False, key_agreement=True,
                    key_cert_sign=False, crl_sign=False, encipher_only=False,
                    decipher_only=False),
                critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                       ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
            .add_extension(
                x509.SubjectAlternativeName([
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                ]),
                critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return key, cert


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.chmod(path, mode)
    return path


@dataclass
class Pki:
    """Certificates on disk: ``nodes`` signed by ``ca``, ``foreign`` by ``foreign_ca``."""

    directory: Path
    ca: Path
    foreign_ca: Path
    nodes: dict[str, NodeFiles] = field(default_factory=dict)
    foreign: dict[str, NodeFiles] = field(default_factory=dict)


def write_node(directory: Path, authority: Authority, ca_path: Path, node_id: str,
               prefix: str = "") -> NodeFiles:
    key, cert = authority.issue(node_id)
    return NodeFiles(
        node_id,
        cert=_write(directory / f"{prefix}{node_id}.crt", cert_pem(cert), 0o644),
        key=_write(directory / f"{prefix}{node_id}.key", key_pem(key), 0o600),
        ca=ca_path,
    )


def make_pki(directory: Path, node_ids: Iterable[str] = ("a", "b", "c"),
             foreign: Iterable[str] = ("a",)) -> Pki:
    """A CA and ``node_ids``' certificates, plus a foreign CA and ``foreign``'s."""
    directory.mkdir(parents=True, exist_ok=True)
    authority = Authority.create("dqid test CA")
    outsider = Authority.create("foreign test CA")
    pki = Pki(
        directory,
        ca=_write(directory / "ca.crt", cert_pem(authority.cert), 0o644),
        foreign_ca=_write(directory / "foreign-ca.crt", cert_pem(outsider.cert), 0o644),
    )
    for node_id in node_ids:
        pki.nodes[node_id] = write_node(directory, authority, pki.ca, node_id)
    for node_id in foreign:
        pki.foreign[node_id] = write_node(directory, outsider, pki.foreign_ca, node_id,
                                          prefix="foreign-")
    return pki
